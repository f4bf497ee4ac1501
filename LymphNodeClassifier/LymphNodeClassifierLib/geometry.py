"""Patient coordinates and image geometry.

SimpleITK images live in LPS. Slicer's RAS = diag(-1, -1, 1) * LPS; the conversion is done here
and nowhere else in the Lib. Physical points always go through origin, spacing and direction.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .errors import InputError

_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])

INTEGER_PIXEL_TYPES = frozenset(
    {
        sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
        sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64,
    }
)
FLOAT_PIXEL_TYPES = frozenset({sitk.sitkFloat32, sitk.sitkFloat64})
UNSIGNED_PIXEL_TYPES = frozenset({sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkUInt32, sitk.sitkUInt64})


def lps_to_ras(points: np.ndarray) -> np.ndarray:
    """Flip the first two axes of LPS points `(..., 3)` to get RAS points."""
    points = np.asarray(points, dtype=np.float64)
    _check_points(points)
    return points * _LPS_TO_RAS


def ras_to_lps(points: np.ndarray) -> np.ndarray:
    """Flip the first two axes of RAS points `(..., 3)` to get LPS points."""
    points = np.asarray(points, dtype=np.float64)
    _check_points(points)
    return points * _LPS_TO_RAS


def _check_points(points: np.ndarray) -> None:
    if points.ndim == 0 or points.shape[-1] != 3:
        raise ValueError(f"expected points of shape (..., 3), got {points.shape}")


def direction_matrix(image: sitk.Image) -> np.ndarray:
    """The image's 3x3 direction matrix (columns are the i, j, k axes in LPS)."""
    return np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)


def index_to_physical_matrix(image: sitk.Image) -> np.ndarray:
    """4x4 affine taking homogeneous (i, j, k, 1) voxel indices to LPS millimetres."""
    matrix = np.eye(4)
    matrix[:3, :3] = direction_matrix(image) @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def physical_points_of_indices(image: sitk.Image, ijk: np.ndarray) -> np.ndarray:
    """LPS points `(..., 3)` of (continuous) voxel indices `(..., 3)` given in (i, j, k) order."""
    ijk = np.asarray(ijk, dtype=np.float64)
    _check_points(ijk)
    matrix = index_to_physical_matrix(image)
    return ijk @ matrix[:3, :3].T + matrix[:3, 3]


def continuous_indices_of_physical_points(image: sitk.Image, points_lps: np.ndarray) -> np.ndarray:
    """Continuous (i, j, k) indices `(..., 3)` of LPS points `(..., 3)`: the inverse of the above."""
    points_lps = np.asarray(points_lps, dtype=np.float64)
    _check_points(points_lps)
    matrix = index_to_physical_matrix(image)
    return np.linalg.solve(matrix[:3, :3], (points_lps - matrix[:3, 3]).reshape(-1, 3).T).T.reshape(points_lps.shape)


def same_geometry(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    """True if both images have the same size and, within `tolerance`, spacing, origin and direction.

    `tolerance` is relative to the smallest spacing for origin and spacing (so 1e-4 of a voxel) and
    absolute for the (unitless) direction cosines.
    """
    if a.GetDimension() != b.GetDimension() or a.GetSize() != b.GetSize():
        return False
    voxel_mm = tolerance * min(min(a.GetSpacing()), min(b.GetSpacing()))
    return (
        np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=0.0, atol=voxel_mm)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0.0, atol=voxel_mm)
        and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0.0, atol=tolerance)
    )


def check_ct_image(ct: sitk.Image) -> None:
    """Raise InputError unless `ct` is a 3D single-channel volume whose voxels are not all equal."""
    if ct.GetDimension() != 3:
        raise InputError(f"The CT volume is {ct.GetDimension()}D; load a 3D CT volume.")
    if ct.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("The CT volume has several values per voxel (colour or vector image); load a grey-value CT volume.")
    if min(ct.GetSize()) < 2:
        raise InputError(f"The CT volume has size {ct.GetSize()}, a single slice; load a 3D CT volume with several slices.")
    if ct.GetPixelID() not in INTEGER_PIXEL_TYPES | FLOAT_PIXEL_TYPES:
        raise InputError(f"The CT volume has pixel type {ct.GetPixelIDTypeAsString()}; load a CT stored as integer or float HU values.")
    minimum, maximum = minimum_maximum(ct)
    if not np.isfinite([minimum, maximum]).all():
        raise InputError("The CT volume contains NaN or infinite values; load a CT volume with valid HU values.")
    if minimum == maximum:
        raise InputError(
            f"The CT volume is empty (every voxel is {minimum:g}); load the actual CT image, not a blank volume."
        )


def minimum_maximum(image: sitk.Image) -> tuple[float, float]:
    """Smallest and largest voxel value (NaN if any voxel is NaN). numpy's reductions on the voxel
    view: ~8 ms on a 512x512x110 CT, ITK's MinimumMaximumImageFilter ~30 ms (and it skips NaN)."""
    values = sitk.GetArrayViewFromImage(image)
    if not values.size:
        stats = sitk.MinimumMaximumImageFilter()
        stats.Execute(image)
        return stats.GetMinimum(), stats.GetMaximum()
    return float(values.min()), float(values.max())


def check_label_image(label: sitk.Image) -> float:
    """Raise InputError unless `label` is a 3D single-channel map of non-negative integer values; returns its maximum."""
    if label.GetDimension() != 3:
        raise InputError(f"The label volume is {label.GetDimension()}D; use a 3D label map of the lymph nodes.")
    if label.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("The label volume has several values per voxel; use a single-channel label map (one integer per voxel).")
    pixel_id = label.GetPixelID()
    if pixel_id not in INTEGER_PIXEL_TYPES | FLOAT_PIXEL_TYPES:
        raise InputError(f"The label volume has pixel type {label.GetPixelIDTypeAsString()}; use an integer label map.")
    values = sitk.GetArrayViewFromImage(label)
    if pixel_id in UNSIGNED_PIXEL_TYPES and values.size:
        minimum, maximum = 0.0, float(values.max())  # never negative: one pass over the map, not two (~9 ms on 512x512x110)
    else:
        minimum, maximum = minimum_maximum(label)
    if pixel_id in FLOAT_PIXEL_TYPES:
        if not np.isfinite([minimum, maximum]).all() or not np.array_equal(values, np.round(values)):
            raise InputError(
                "The label volume has non-integer values (it looks like a probability or intensity image); "
                "use a label map with one integer value per node."
            )
    if minimum < 0:
        raise InputError(f"The label volume has negative values (minimum {minimum:g}); use label values 0 (background) and 1, 2, ... for nodes.")
    if maximum == 0:
        raise InputError("The label volume is empty (all voxels are 0); draw or load the lymph node segmentation first.")
    if maximum > np.iinfo(np.uint32).max:
        raise InputError(f"The label volume has values up to {maximum:g}; use label values below 2**32.")
    return maximum


def as_label_pixel_type(label: sitk.Image, maximum: float | None = None) -> sitk.Image:
    """Cast a checked label map to UInt16 (values < 65536) or UInt32; integer-valued floats included.

    `maximum`: the label's largest value when already known (`check_label_image` returns it).
    """
    if maximum is None:
        stats = sitk.MinimumMaximumImageFilter()
        stats.Execute(label)
        maximum = stats.GetMaximum()
    target = sitk.sitkUInt16 if maximum <= np.iinfo(np.uint16).max else sitk.sitkUInt32
    return label if label.GetPixelID() == target else sitk.Cast(label, target)


def rotation_degrees(a: sitk.Image, b: sitk.Image) -> float:
    """The angle (degrees) of the rotation taking `a`'s axes onto `b`'s (0 when the directions agree)."""
    relative = direction_matrix(a).T @ direction_matrix(b)
    return float(np.degrees(np.arccos(np.clip((np.trace(relative) - 1.0) / 2.0, -1.0, 1.0))))


def _mm(values) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def describe_grid_difference(ct: sitk.Image, label: sitk.Image) -> str:
    """What differs between the label's grid and the CT's, in physical terms (origin offset, spacing, rotation, size)."""
    parts = []
    offset = np.subtract(label.GetOrigin(), ct.GetOrigin())
    angle = rotation_degrees(ct, label)
    spacing_same = np.allclose(label.GetSpacing(), ct.GetSpacing(), rtol=1e-4, atol=0.0)
    if angle > 0.01:
        parts.append(f"rotated {angle:.1f} deg")
    if not spacing_same:
        parts.append(f"spacing {_mm(label.GetSpacing())} mm vs the CT's {_mm(ct.GetSpacing())} mm")
    if np.linalg.norm(offset) > 1e-3 * min(ct.GetSpacing()):
        shift = f"origin offset {_mm(offset)} mm ({np.linalg.norm(offset):.1f} mm)"
        # On the same axes and spacing, an offset by whole voxels is a crop of the CT grid (harmless).
        steps = np.linalg.solve(direction_matrix(ct) @ np.diag(ct.GetSpacing()), offset)
        whole = angle <= 0.01 and spacing_same and np.allclose(steps, np.round(steps), atol=1e-3)
        parts.append(shift + (f" = {_mm(np.round(steps))} whole CT voxels (a crop of the CT grid)" if whole else ""))
    if label.GetSize() != ct.GetSize():
        parts.append(f"size {label.GetSize()} vs {ct.GetSize()}")
    return ", ".join(parts) or "sub-tolerance differences"


def label_voxels_outside(ct: sitk.Image, label: sitk.Image) -> tuple[int, int]:
    """(label voxels > 0 whose centre lies outside the CT's extent, all label voxels > 0), in physical space."""
    kji = np.nonzero(sitk.GetArrayViewFromImage(label))
    if not kji[0].size:
        return 0, 0
    points = physical_points_of_indices(label, np.stack(kji[::-1], axis=1).astype(np.float64))
    ijk = continuous_indices_of_physical_points(ct, points)
    slack = 1e-3  # voxel units: a centre exactly on the CT's outer face is inside
    inside = np.all((ijk >= -0.5 - slack) & (ijk <= np.array(ct.GetSize()) - 0.5 + slack), axis=1)
    return int((~inside).sum()), int(inside.size)


def prepare_label_image(ct: sitk.Image, label: sitk.Image, strict_geometry: bool = False) -> tuple[sitk.Image, bool, str | None]:
    """Check the CT and the label map and bring the label onto the CT's voxel grid (the geometry policy).

    Identical grids (within `same_geometry`'s tolerance) pass unchanged. Another grid whose labelled
    voxels all lie inside the CT's physical extent is resampled (nearest neighbour) with a message
    saying exactly what differs; with `strict_geometry` it is refused instead. A label map with
    labelled voxels outside the CT is refused (a node cut by the CT's edge would be mismeasured).
    Returns `(label_in_ct_space, resampled, message)`: UInt16/UInt32 on the CT grid.
    """
    check_ct_image(ct)
    label = as_label_pixel_type(label, check_label_image(label))
    if same_geometry(ct, label):
        exact = (label.GetOrigin(), label.GetSpacing(), label.GetDirection()) == (ct.GetOrigin(), ct.GetSpacing(), ct.GetDirection())
        if not exact:  # remove sub-tolerance differences on a copy, never the caller's image (this copies the voxels, so only when needed)
            label = sitk.Image(label)
            label.CopyInformation(ct)
        # Exact: the image itself. A copy-on-write sitk.Image(label) would copy every voxel at its first
        # numpy view (nodes.extract_nodes takes one): ~40 ms on a 512x512x110 label map; nothing changes it in place.
        return label, False, None
    difference = describe_grid_difference(ct, label)
    outside, total = label_voxels_outside(ct, label)
    if outside == total:
        raise InputError(
            f"The label volume does not overlap the CT in physical space ({difference}); check that the label map belongs to this CT."
        )
    if outside:
        raise InputError(
            f"{outside} of {total} labelled voxels ({100.0 * outside / total:.1f} %) lie outside the CT ({difference}); "
            "check that the label map belongs to this CT, or export it on the CT's grid."
        )
    if strict_geometry:
        raise InputError(
            f"The label volume's grid differs from the CT's ({difference}) and --strict-geometry refuses to resample it; "
            "export the label map on the CT's grid, or leave out --strict-geometry."
        )
    resampled = sitk.Resample(label, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())
    message = f"The label map's grid differs from the CT's ({difference}); it was resampled onto the CT grid (nearest neighbour)."
    # A node smaller than a CT voxel can fall between the CT's voxel centres: say so rather than drop it silently.
    lost = np.setdiff1d(np.unique(sitk.GetArrayViewFromImage(label)), np.unique(sitk.GetArrayViewFromImage(resampled)))
    if lost.size:
        message += (f" Label value{'s' if lost.size > 1 else ''} {', '.join(str(int(v)) for v in lost[:10])}{', ...' if lost.size > 10 else ''}"
                    " had no voxel left on the CT grid (smaller than a CT voxel) and are not classified.")
    return resampled, True, message
