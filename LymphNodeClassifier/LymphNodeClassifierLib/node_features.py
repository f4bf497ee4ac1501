"""Hand-crafted shape and attenuation features of every node (radiomics style), measured in physical space.

The suspect finder's default second reader: a logistic regression on these few dozen numbers
learns from a few hundred noisy labels what a CNN needs thousands of clean ones for, so its
out-of-fold probabilities rank wrong labels far better on small cohorts (`suspects.py`). They
follow what radiologists read on a node: size, roundness (long/short ratio), margin, central
low attenuation (necrosis), fat (hilum) and heterogeneity.

Per node (one label value of the label map on the CT grid):
- crop: the node's bounding box plus at least `MARGIN_MM` on every side (clipped to the CT);
- shape of the mask (`sitk.LabelShapeStatisticsImageFilter`) after resampling the mask to an
  isotropic `SHAPE_SPACING_MM` grid (linear interpolation, > 0.5), so 5 mm slices do not dominate
  the shape: elongation, flatness, roundness, sphericity (pi^(1/3) (6V)^(2/3) / surface), Feret
  diameter over the equivalent-sphere diameter, log volume;
- partial-volume moments: each voxel in the mask dilated by one voxel weighs
  w = clip((HU - fat) / (node - fat), 0, 1) (fat = median of the surrounding fat, node = median
  inside the mask), i.e. the fraction of the voxel the node fills; the weighted covariance of the
  voxel centres in LPS millimetres minus the covariance of one voxel box (spacing^2 / 12 along each
  voxel axis, turned by the direction matrix) is the node's own second moment, independent of
  slice thickness and orientation. Its eigenvalue ratios (log) measure elongation without the
  annotator's outline (`pv_elongation_*`);
- attenuation inside the mask: mean, standard deviation, 10th / 90th percentile, the fractions
  below 20 HU (low attenuation: necrosis) and below -30 HU (fat: hilum); the same mean and
  standard deviation on the mask eroded by one voxel in-plane (no partial volume with the
  surrounding fat), its skewness and kurtosis, and its standard deviation over the surrounding
  fat's (heterogeneity above the image noise);
- the radiology axes of `nodes.extract_nodes` (long / short axis on the axial plane, log mm).

`node_features(ct, component_image, node)` returns one dict (`FEATURE_NAMES` order; NaN where a
feature is undefined, e.g. the shape of a node of one or two voxels or one voxel thick);
`feature_matrix(dataset, case_ids, label_values)` the (N, F) array for the rows of a PatchSet.
No model is stored with the features: the finder fits a new logistic regression in every fold.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, stats
from scipy.spatial import ConvexHull, QhullError

from .dataset import Dataset
from .errors import CancelledError, InputError
from .geometry import direction_matrix
from .nodes import NodeInfo
from .patchset import case_nodes
from .validate import InputPolicy

MARGIN_MM = 4.0  # context around the node (at least the fat ring + 1 voxel, see _crop)
RING_RADIUS_VOXELS = (3, 3, 1)  # the surrounding-fat ring: the mask dilated by this (i, j, k) minus the mask
SHAPE_SPACING_MM = 0.5  # isotropic grid of the mask's shape statistics (finer than any in-plane CT spacing)
MAX_SHAPE_VOXELS = 4_000_000  # a large lesion gets a coarser isotropic grid instead of a huge one
LOW_ATTENUATION_HU = 20.0  # below: fluid / necrosis rather than enhancing node tissue
FAT_HU = -30.0  # below: fat
DEFAULT_FAT_HU = -100.0  # when no surrounding fat is found
MIN_FAT_HU_GAP = 30.0  # node - fat contrast used for the partial-volume weights, at least

# Changes whenever a feature's definition changes: a fused model's card records it, and inference
# refuses a model whose features this code no longer computes the same way.
FEATURES_VERSION = "1"
FEATURE_NAMES = (
    "log_volume_mm3", "elongation", "flatness", "roundness", "sphericity", "feret_to_equivalent_diameter",
    "pv_elongation_major_middle", "pv_elongation_middle_minor", "pv_elongation_major_minor",
    "mean_hu", "std_hu", "p10_hu", "p90_hu", "low_attenuation_fraction", "fat_fraction",
    "core_mean_hu", "core_std_hu", "core_skewness", "core_kurtosis", "core_std_over_fat_std",
    "log_long_axis_mm", "log_short_axis_mm",
)


def _crop(image: sitk.Image, node: NodeInfo) -> tuple[slice, ...]:
    """Index slices (i, j, k) of the node's bounding box grown by MARGIN_MM, inside the image."""
    i0, j0, k0, i1, j1, k1 = node.bbox_index
    out = []
    for axis, (lo, hi, spacing, size) in enumerate(zip((i0, j0, k0), (i1, j1, k1), image.GetSpacing(), image.GetSize())):
        # at least the fat ring's dilation radius + 1 voxel, so the ring is never cut by the crop
        pad = max(RING_RADIUS_VOXELS[axis] + 1, int(math.ceil(MARGIN_MM / spacing)))
        out.append(slice(max(0, lo - pad), min(size, hi + pad + 1)))
    return tuple(out)


def _shape(mask: sitk.Image) -> dict[str, float]:
    """Shape statistics of a binary mask on an isotropic grid covering the same box."""
    spacing = np.array(mask.GetSpacing())
    size = np.array(mask.GetSize())
    extent = spacing * size
    iso = max(SHAPE_SPACING_MM, float(np.prod(extent) / MAX_SHAPE_VOXELS) ** (1 / 3))
    new_size = np.maximum(1, np.round(extent / iso)).astype(int)
    new_spacing = extent / new_size
    # the new grid's first voxel centre sits half a new voxel inside the old grid's outer face
    origin = mask.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in (-0.5 + 0.5 * new_spacing / spacing)))
    smooth = sitk.Resample(
        sitk.Cast(mask, sitk.sitkFloat32), [int(v) for v in new_size], sitk.Transform(), sitk.sitkLinear,
        origin, tuple(float(v) for v in new_spacing), mask.GetDirection(), 0.0,
    )
    binary = sitk.Cast(smooth > 0.5, sitk.sitkUInt8)
    statistics = sitk.LabelShapeStatisticsImageFilter()
    statistics.ComputePerimeterOn()
    statistics.ComputeFeretDiameterOff()  # ITK compares every pair of boundary voxels: feret_diameter does it on the hull
    statistics.Execute(binary)
    if not statistics.HasLabel(1):  # a node of a voxel or two vanishes at 0.5: its volume only, no shape
        return {"log_volume_mm3": math.log(max(float(np.prod(spacing)) * float(sitk.GetArrayViewFromImage(mask).sum()), 1e-3)),
                **{name: math.nan for name in ("elongation", "flatness", "roundness", "sphericity", "feret_to_equivalent_diameter")}}
    volume = statistics.GetPhysicalSize(1)
    surface = statistics.GetPerimeter(1)
    equivalent_diameter = 2.0 * statistics.GetEquivalentSphericalRadius(1)
    moments = statistics.GetPrincipalMoments(1)
    feret = feret_diameter(binary)
    flat = min(moments) <= 0  # a node one voxel thick: no third axis, elongation / flatness undefined
    return {
        "log_volume_mm3": math.log(max(volume, 1e-3)),
        "elongation": math.nan if flat else statistics.GetElongation(1),
        "flatness": math.nan if flat else statistics.GetFlatness(1),
        "roundness": statistics.GetRoundness(1) if surface > 0 else math.nan,
        # the digital surface over-estimates a sphere's area, so this stays below 1 except for tiny nodes
        "sphericity": min(1.0, (math.pi ** (1 / 3)) * (6 * volume) ** (2 / 3) / surface) if surface > 0 else math.nan,
        "feret_to_equivalent_diameter": feret / equivalent_diameter if feret > 0 else math.nan,
    }


def feret_diameter(binary: sitk.Image) -> float:
    """The largest distance (mm) between the centres of two boundary voxels of a binary mask.

    The same value as ITK's LabelShapeStatistics Feret diameter (boundary: a voxel of the mask with
    one of its 26 neighbours outside it or outside the image; distance on the index grid times the
    spacing), but ITK compares every pair of boundary voxels (seconds for a 30 mm node on a 0.5 mm
    grid) while the farthest pair of a point set always lies on its convex hull.
    """
    mask = sitk.GetArrayViewFromImage(binary).astype(bool)  # (k, j, i)
    interior = ndimage.binary_erosion(mask, structure=np.ones((3, 3, 3), dtype=bool), border_value=0)
    points = np.argwhere(mask & ~interior)[:, ::-1] * np.asarray(binary.GetSpacing(), dtype=np.float64)
    if len(points) < 2:
        return 0.0
    try:
        points = points[ConvexHull(points).vertices]
    except QhullError:  # flat or collinear boundary: no 3-D hull, compare all pairs (few points then)
        pass
    farthest = 0.0
    for start in range(0, len(points), 2048):  # row blocks keep the distance matrix small
        block = points[start:start + 2048]
        farthest = max(farthest, float((np.square(block[:, None, :] - points[None, :, :]).sum(axis=2)).max()))
    return math.sqrt(farthest)


def partial_volume_moments(hu: np.ndarray, region: np.ndarray, node_hu: float, fat_hu: float, image: sitk.Image) -> np.ndarray:
    """Eigenvalues (ascending, mm^2) of the node's second moment from partial-volume weights.

    `hu`, `region` are (k, j, i) arrays on `image`'s grid (a crop). A voxel's weight is the
    fraction of it the node fills, estimated linearly between the fat and the node attenuation;
    the covariance of one voxel box (a voxel's own extent) is removed so thick slices do not
    stretch the node along k.
    """
    weight = np.clip((hu - fat_hu) / max(node_hu - fat_hu, MIN_FAT_HU_GAP), 0.0, 1.0) * region
    k, j, i = np.nonzero(weight > 0)
    if k.size < 2:
        return np.full(3, 1e-3)
    w = weight[k, j, i]
    to_lps = direction_matrix(image) @ np.diag(image.GetSpacing())
    points = np.stack([i, j, k], axis=1).astype(np.float64) @ to_lps.T
    centre = (w[:, None] * points).sum(axis=0) / w.sum()
    offsets = points - centre
    covariance = (w[:, None, None] * offsets[:, :, None] * offsets[:, None, :]).sum(axis=0) / w.sum()
    voxel_box = direction_matrix(image) @ np.diag(np.square(image.GetSpacing()) / 12.0) @ direction_matrix(image).T
    return np.sort(np.clip(np.linalg.eigvalsh(covariance - voxel_box), 1e-3, None))


def node_features(ct: sitk.Image, component_image: sitk.Image, node: NodeInfo) -> dict[str, float]:
    """The features of one node (`FEATURE_NAMES`); `component_image` holds `node.node_id` on the CT grid."""
    box = _crop(component_image, node)
    ct_crop = ct[box]
    mask_image = sitk.Cast(sitk.Equal(component_image[box], node.node_id), sitk.sitkUInt8)
    hu = sitk.GetArrayFromImage(ct_crop).astype(np.float64)
    mask = sitk.GetArrayFromImage(mask_image).astype(bool)
    if not mask.any():
        raise InputError(f"Node {node.label_value} has no voxels in its bounding box; rebuild the label map.")
    inside = hu[mask]
    core_mask = sitk.GetArrayFromImage(sitk.BinaryErode(mask_image, [1, 1, 0])).astype(bool)
    core = hu[core_mask] if core_mask.sum() >= 5 else inside  # tiny nodes: no core without partial volume
    ring = sitk.GetArrayFromImage(sitk.BinaryDilate(mask_image, list(RING_RADIUS_VOXELS))).astype(bool) & ~mask
    fat = hu[ring]
    fat = fat[fat < FAT_HU]
    fat_hu = float(np.median(fat)) if fat.size >= 10 else DEFAULT_FAT_HU
    fat_std = float(fat.std()) if fat.size >= 10 else math.nan
    node_hu = float(np.median(core))
    region = sitk.GetArrayFromImage(sitk.BinaryDilate(mask_image, [1, 1, 1])).astype(bool)
    eigen = partial_volume_moments(hu, region, node_hu, fat_hu, ct_crop)
    out = _shape(mask_image)
    out.update({
        "pv_elongation_major_middle": 0.5 * math.log(eigen[2] / eigen[1]),
        "pv_elongation_middle_minor": 0.5 * math.log(eigen[1] / eigen[0]),
        "pv_elongation_major_minor": 0.5 * math.log(eigen[2] / eigen[0]),
        "mean_hu": float(inside.mean()),
        "std_hu": float(inside.std()),
        "p10_hu": float(np.percentile(inside, 10)),
        "p90_hu": float(np.percentile(inside, 90)),
        "low_attenuation_fraction": float((inside < LOW_ATTENUATION_HU).mean()),
        "fat_fraction": float((inside < FAT_HU).mean()),
        "core_mean_hu": float(core.mean()),
        "core_std_hu": float(core.std()),
        "core_skewness": float(stats.skew(core)) if core.size > 3 and core.std() > 0 else 0.0,
        "core_kurtosis": float(stats.kurtosis(core)) if core.size > 3 and core.std() > 0 else 0.0,
        "core_std_over_fat_std": float(core.std() / fat_std) if fat_std and fat_std > 0 else math.nan,
        "log_long_axis_mm": math.log(max(node.long_axis_mm, 0.1)),
        "log_short_axis_mm": math.log(max(node.short_axis_mm, 0.1)),
    })
    return {name: float(out[name]) for name in FEATURE_NAMES}


def feature_matrix(
    dataset: Dataset,
    case_ids: Sequence[str],
    label_values: Sequence[int],
    progress: Callable[[int, int], None] | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    policy: InputPolicy = InputPolicy(),
) -> np.ndarray:
    """(N, len(FEATURE_NAMES)) float64 features of the nodes `(case_ids[n], label_values[n])`.

    Each case is read under `policy` (the command's --not-hu-ok / geometry options), as its patches were.

    Row n belongs to node n (e.g. the rows of a PatchSet); each case's images are read once.
    NaN marks a feature that could not be measured (e.g. no fat around the node).
    """
    case_ids = [str(c) for c in case_ids]
    label_values = [int(v) for v in label_values]
    if len(case_ids) != len(label_values):
        raise InputError(f"{len(case_ids)} case ids for {len(label_values)} label values; pass one of each per node.")
    rows_of_case: dict[str, list[int]] = {}
    for row, case_id in enumerate(case_ids):
        rows_of_case.setdefault(case_id, []).append(row)
    out = np.full((len(case_ids), len(FEATURE_NAMES)), np.nan)
    for done, (case_id, rows) in enumerate(rows_of_case.items(), start=1):
        if is_cancelled is not None and is_cancelled():
            raise CancelledError("Feature extraction cancelled.")
        if not dataset.has_case(case_id):
            raise InputError(f"Case '{case_id}' is not in the dataset; rebuild the node list from the dataset.")
        case = dataset.case(case_id)
        ct, nodes, component_image = case_nodes(dataset.ct_path(case), dataset.labels_path(case), case, policy)
        by_value = {node.label_value: node for node in nodes}
        for row in rows:
            node = by_value.get(label_values[row])
            if node is None:
                raise InputError(f"Case '{case_id}': node {label_values[row]} has no voxels in the label map; fix the label map or exclude the node.")
            features = node_features(ct, component_image, node)
            out[row] = [features[name] for name in FEATURE_NAMES]
        if progress is not None:
            progress(done, len(rows_of_case))
    return out

