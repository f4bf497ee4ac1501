"""Per-node patches: placement, orientation, padding and equivalence with the whole-volume baseline.

Independent truths: SimpleITK's TransformPhysicalPointToContinuousIndex plus scipy's trilinear
`map_coordinates` for what a pixel should contain, and objects placed at known physical points
for where things should appear.
"""

import time

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import binary_dilation, map_coordinates

from LymphNodeClassifierLib.errors import InputError
from LymphNodeClassifierLib.nodes import extract_nodes
from LymphNodeClassifierLib.patches import PatchSpec, extract_patches, resample_whole_volume_then_crop
from LymphNodeClassifierLib.windowing import apply_window
from helpers import TILTED

WINDOW = (-135.0, 215.0)
BACKGROUND_HU = 40.0  # windowed to 0.5, so air padding (0) is distinguishable




def empty_ct(size, spacing, direction, centre_lps) -> sitk.Image:
    """A CT grid of BACKGROUND_HU whose middle (slightly off a voxel centre) is at `centre_lps`."""
    affine = np.asarray(direction, dtype=float) @ np.diag(spacing)
    origin = np.asarray(centre_lps) - affine @ ((np.asarray(size) - 1) / 2 + (0.23, 0.37, 0.11))
    ct = sitk.Image([int(s) for s in size], sitk.sitkFloat32) + BACKGROUND_HU
    ct.SetSpacing(tuple(float(s) for s in spacing))
    ct.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    ct.SetOrigin(tuple(float(v) for v in origin))
    return ct


def voxel_points(image: sitk.Image) -> np.ndarray:
    """LPS of every voxel centre, `[k, j, i, 3]`, from SimpleITK's index -> physical transform."""
    affine = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    k, j, i = np.indices(image.GetSize()[::-1])
    points = np.stack([i, j, k], axis=-1) @ affine.T + np.array(image.GetOrigin())
    corner = tuple(s - 1 for s in image.GetSize())
    np.testing.assert_allclose(points[corner[::-1]], image.TransformIndexToPhysicalPoint(corner), atol=1e-6)
    return points


def with_array(like: sitk.Image, array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    return image


def add_sphere(array: np.ndarray, points: np.ndarray, centre, radius_mm: float, value: float) -> None:
    array[np.linalg.norm(points - np.asarray(centre), axis=-1) <= radius_mm] = value


def sample_independently(ct: sitk.Image, points_lps: np.ndarray, air_hu: float) -> np.ndarray:
    """HU at LPS points by SimpleITK's physical -> index transform and scipy trilinear interpolation."""
    flat = points_lps.reshape(-1, 3)
    indices = np.array([ct.TransformPhysicalPointToContinuousIndex(tuple(map(float, p))) for p in flat])
    array = sitk.GetArrayViewFromImage(ct).astype(np.float64)
    values = map_coordinates(array, [indices[:, 2], indices[:, 1], indices[:, 0]], order=1, mode="nearest")
    outside = ((indices < -0.5) | (indices > np.array(ct.GetSize()) - 0.5)).any(axis=1)
    values[outside] = air_hu
    return values.reshape(points_lps.shape[:-1])


def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(size), np.arange(size), indexing="ij")  # rows, cols


CASES = {
    # name: (CT size, CT spacing, CT direction, patch spacing)
    "identity": ((80, 80, 60), (0.7, 0.7, 1.0), np.eye(3), (0.79, 0.79, 0.79)),
    "tilted": ((80, 80, 60), (0.7, 0.7, 1.0), TILTED, (0.79, 0.79, 0.79)),
    "anisotropic": ((80, 80, 24), (0.7, 0.7, 5.0), np.eye(3), (0.98, 0.98, 5.0)),
}

NODE_LPS = np.array([12.3, -40.6, 105.2])
BLOB_HU = 400.0
NODE_HU = 150.0


def oriented_phantom(case: str):
    """CT with a node at NODE_LPS and three bright blobs placed around it in patient directions."""
    size, spacing, direction, patch_spacing = CASES[case]
    ct = empty_ct(size, spacing, direction, NODE_LPS)
    points = voxel_points(ct)
    hu = np.full(size[::-1], BACKGROUND_HU, dtype=np.float32)
    labels = np.zeros(size[::-1], dtype=np.uint16)
    node_radius = 6.0
    offset = 12.0 if case != "anisotropic" else 16.0
    blob_radius = 3.0 if case != "anisotropic" else 5.0
    add_sphere(hu, points, NODE_LPS, node_radius, NODE_HU)
    add_sphere(labels, points, NODE_LPS, node_radius, 3)
    # +x = patient left, -y = anterior, +z = superior (LPS)
    add_sphere(hu, points, NODE_LPS + [offset, -offset, 0], blob_radius, BLOB_HU)  # left-anterior (axial)
    add_sphere(hu, points, NODE_LPS + [offset, 0, offset], blob_radius, BLOB_HU)  # left-superior (coronal)
    add_sphere(hu, points, NODE_LPS + [0, offset, offset], blob_radius, BLOB_HU)  # posterior-superior (sagittal)
    return with_array(ct, hu), with_array(ct, labels), PatchSpec(spacing_mm=patch_spacing, size=64)


@pytest.mark.parametrize("case", list(CASES))
def test_node_lands_at_patch_centre_and_pixels_match_simpleitk(case):
    ct, label, spec = oriented_phantom(case)
    nodes, components = extract_nodes(label)
    assert len(nodes) == 1 and nodes[0].label_value == 3
    node = nodes[0]
    # the rasterised sphere's centroid is close to the known point
    assert np.linalg.norm(np.array(node.centroid_lps) - NODE_LPS) < 0.5 * max(ct.GetSpacing())
    patch = extract_patches(ct, components, nodes, spec, WINDOW)[0]
    size = spec.size
    assert patch.image.shape == (3, size, size) and patch.image.dtype == np.float32
    assert patch.mask.shape == (3, size, size) and patch.mask.dtype == np.uint8
    assert 0.0 <= patch.image.min() and patch.image.max() <= 1.0
    assert [plane.name for plane in patch.planes] == ["axial", "coronal", "sagittal"]
    rows, cols = pixel_grid(size)
    half = (size - 1) / 2
    for view, plane in enumerate(patch.planes):
        np.testing.assert_allclose(plane.pixel_to_lps(half, half), node.centroid_lps, atol=1e-6)
        # every pixel holds what an independent trilinear sampler finds at the plane's physical point
        expected = apply_window(sample_independently(ct, plane.pixel_to_lps(rows, cols), spec.air_hu), *WINDOW)
        np.testing.assert_allclose(patch.image[view], expected, atol=1e-4)
        # and the node's mask is centred: mean mask pixel within a pixel of the centre
        r, c = np.nonzero(patch.mask[view])
        assert abs(r.mean() - half) < 1.0 and abs(c.mean() - half) < 1.0


@pytest.mark.parametrize("case", list(CASES))
def test_view_orientation_follows_radiological_convention(case):
    ct, label, spec = oriented_phantom(case)
    window = (-135.0, BLOB_HU + 100)  # keep the blobs distinguishable from the node
    nodes, components = extract_nodes(label)
    patch = extract_patches(ct, components, nodes, spec, window)[0]
    axial, coronal, sagittal = patch.image
    threshold = (BLOB_HU - 50 + 135) / (BLOB_HU + 100 + 135)

    def blob(image):
        rows, cols = np.nonzero(image > threshold)
        assert rows.size > 0, "blob not visible"
        half = (image.shape[0] - 1) / 2
        return rows.mean() - half, cols.mean() - half

    row, col = blob(axial)  # left-anterior blob: anterior = top rows, left = right-hand columns
    assert row < -3 and col > 3
    row, col = blob(coronal)  # left-superior blob: superior = top rows, left = right-hand columns
    assert row < -2 and col > 3
    row, col = blob(sagittal)  # posterior-superior blob: superior = top rows, posterior = right-hand columns
    assert row < -2 and col > 3


def test_edge_node_is_padded_with_air():
    size, spacing = (60, 60, 40), (0.7, 0.7, 1.0)
    ct = empty_ct(size, spacing, np.eye(3), (0.0, 0.0, 0.0))
    points = voxel_points(ct)
    corner_voxel = points[20, 30, 0]  # a node centred on the first i column: half of it is outside
    hu = np.full(size[::-1], BACKGROUND_HU, dtype=np.float32)
    labels = np.zeros(size[::-1], dtype=np.uint8)
    add_sphere(hu, points, corner_voxel, 4.0, NODE_HU)
    add_sphere(labels, points, corner_voxel, 4.0, 1)
    ct, label = with_array(ct, hu), with_array(ct, labels)
    nodes, components = extract_nodes(label)
    assert len(nodes) == 1 and nodes[0].touches_edge
    spec = PatchSpec(size=48)
    patch = extract_patches(ct, components, nodes, spec, WINDOW)[0]
    rows, cols = pixel_grid(spec.size)
    axial = patch.planes[0]
    indices = np.array(
        [ct.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in axial.pixel_to_lps(rows, cols).reshape(-1, 3)]
    ).reshape(spec.size, spec.size, 3)
    outside = (indices < -0.5).any(axis=-1) | (indices > np.array(size) - 0.5).any(axis=-1)
    assert 0.3 < outside.mean() < 0.7  # the node sits at the edge: part of the patch is outside the CT
    np.testing.assert_array_equal(patch.image[0][outside], 0.0)  # air, windowed
    assert (patch.image[0][~outside] >= 0.5 - 1e-6).all()  # background or node inside the CT
    assert not patch.mask[0][outside].any()


@pytest.mark.parametrize("shift_voxels", [(0.5, 0.0, 0.0), (0.0, 0.0, 3.0)])
def test_a_component_image_off_the_ct_grid_is_refused(shift_voxels):
    """Node bounding boxes are CT indices: a label grid shifted by half a voxel, or a crop reaching
    past the CT, must be refused instead of giving patches from the wrong voxels."""
    size, spacing = (40, 40, 20), (0.7, 0.7, 1.0)
    ct = empty_ct(size, spacing, TILTED, (5.0, -3.0, 2.0))
    points = voxel_points(ct)
    labels = np.zeros(size[::-1], dtype=np.uint8)
    add_sphere(labels, points, points[10, 20, 20], 4.0, 1)
    label = with_array(ct, labels)
    nodes, components = extract_nodes(label)
    extract_patches(ct, components, nodes, PatchSpec(size=16), WINDOW)  # on the grid: fine
    shifted = sitk.Image(components)
    shifted.SetOrigin(components.TransformContinuousIndexToPhysicalPoint(shift_voxels))
    with pytest.raises(InputError, match="not on the CT's voxel grid"):
        extract_patches(ct, shifted, nodes, PatchSpec(size=16), WINDOW)


def test_axial_mode_uses_plane_of_largest_cross_section():
    size, spacing = (70, 70, 50), (0.7, 0.7, 1.0)
    centre = np.array([5.0, -3.0, 20.0])
    ct = empty_ct(size, spacing, TILTED, centre)
    points = voxel_points(ct)
    hu = np.full(size[::-1], BACKGROUND_HU, dtype=np.float32)
    labels = np.zeros(size[::-1], dtype=np.uint8)
    big_centre, small_centre = centre + [0, 0, 4.0], centre + [0, 0, -5.0]
    for sphere_centre, radius in [(big_centre, 7.0), (small_centre, 4.0)]:  # a pear: wide at the top
        add_sphere(hu, points, sphere_centre, radius, NODE_HU)
        add_sphere(labels, points, sphere_centre, radius, 2)
    ct, label = with_array(ct, hu), with_array(ct, labels)
    nodes, components = extract_nodes(label)
    assert len(nodes) == 1
    node = nodes[0]
    spec = PatchSpec(views="axial", mask_channel=True, size=48)
    patch = extract_patches(ct, components, nodes, spec, WINDOW)[0]
    assert patch.image.shape == (2, 48, 48) and patch.mask.shape == (1, 48, 48)
    assert abs(patch.largest_axial_z_lps - big_centre[2]) <= spec.spacing_mm[2] / 2 + 0.5
    assert patch.largest_axial_area_mm2 == pytest.approx(np.pi * 7.0**2, rel=0.15)
    half = (spec.size - 1) / 2
    plane = patch.planes[0]
    expected_centre = [node.centroid_lps[0], node.centroid_lps[1], patch.largest_axial_z_lps]
    np.testing.assert_allclose(plane.pixel_to_lps(half, half), expected_centre, atol=1e-6)
    rows, cols = pixel_grid(spec.size)
    expected = apply_window(sample_independently(ct, plane.pixel_to_lps(rows, cols), spec.air_hu), *WINDOW)
    np.testing.assert_allclose(patch.image[0], expected, atol=1e-4)
    np.testing.assert_array_equal(patch.image[1], patch.mask[0].astype(np.float32))  # mask channel last
    assert patch.mask[0].sum() * 0.79**2 == pytest.approx(patch.largest_axial_area_mm2)


def test_triplanar_mask_channel_is_the_axial_mask():
    ct, label, spec = oriented_phantom("identity")
    nodes, components = extract_nodes(label)
    spec = PatchSpec(mask_channel=True)
    assert spec.channels == 4
    patch = extract_patches(ct, components, nodes, spec, WINDOW)[0]
    assert patch.image.shape == (4, 64, 64)
    np.testing.assert_array_equal(patch.image[3], patch.mask[0])


@pytest.mark.parametrize(
    "arguments",
    [dict(spacing_mm=(0.79, 0.79)), dict(spacing_mm=(0.79, -1, 0.79)), dict(spacing_mm="abc"), dict(size=2),
     dict(size=64.5), dict(views="coronal"), dict(air_hu=float("nan"))],
)
def test_patch_spec_validation(arguments):
    with pytest.raises(InputError):
        PatchSpec(**arguments)


def test_patch_spec_accepts_anisotropic_and_scalar_spacing():
    assert PatchSpec(spacing_mm=(0.98, 0.98, 5.0)).spacing_mm == (0.98, 0.98, 5.0)
    assert PatchSpec(spacing_mm=1.0).spacing_mm == (1.0, 1.0, 1.0)


def test_bad_window_is_refused():
    ct, label, spec = oriented_phantom("identity")
    nodes, components = extract_nodes(label)
    with pytest.raises(InputError):
        extract_patches(ct, components, nodes, spec, (200.0, -100.0))


# --- equivalence with the whole-volume baseline ------------------------------------------------

GAUSS_HU, GAUSS_SIGMA_MM = 150.0, 4.0


def smooth_phantom(direction):
    """Smooth CT (Gaussian bumps, so interpolation error has a known bound) with 3 nodes."""
    size, spacing = (120, 120, 48), (0.7, 0.7, 1.5)
    ct = empty_ct(size, spacing, direction, (0.0, 0.0, 0.0))
    points = voxel_points(ct)
    centres = np.array([[-10.0, -4.0, 1.0], [8.0, 6.0, -2.0], [4.0, -13.0, 4.0]])
    hu = np.full(size[::-1], BACKGROUND_HU, dtype=np.float64)
    labels = np.zeros(size[::-1], dtype=np.uint8)
    for value, centre in enumerate(centres, start=1):
        squared = np.sum((points - centre) ** 2, axis=-1)
        hu += GAUSS_HU * np.exp(-squared / (2 * GAUSS_SIGMA_MM**2))
        labels[squared <= 3.5**2] = value
    return with_array(ct, hu.astype(np.float32)), with_array(ct, labels), len(centres)


@pytest.mark.parametrize("direction", [np.eye(3), TILTED], ids=["identity", "tilted"])
def test_local_patches_match_whole_volume_resampling(direction):
    ct, label, node_count = smooth_phantom(direction)
    nodes, components = extract_nodes(label)
    assert len(nodes) == node_count
    spec = PatchSpec(mask_channel=True)
    local = extract_patches(ct, components, nodes, spec, WINDOW)
    baseline = resample_whole_volume_then_crop(ct, components, nodes, spec, WINDOW)
    # Tolerance: trilinear interpolation on spacings h errs by at most sum(h_a^2) / 8 * max|f''|.
    # A Gaussian bump of height A and width sigma has max|f''| = A / sigma^2; with bumps >= 4 sigma
    # apart the others add < 2 % anywhere, so 1.1 * A / sigma^2 bounds the phantom's curvature.
    # Local: one interpolation of the CT (error <= E_ct). Baseline: the CT interpolated (<= E_ct),
    # then re-interpolated on the patch grid (<= E_ct + E_patch, trilinear weights are convex).
    # So |local - baseline| <= 2 E_ct + E_patch (~0.03 after windowing, which divides by the
    # window width). A crop shifted by one pixel differs by ~0.05, so the test catches it.
    centres = np.array([node.centroid_lps for node in nodes])
    separations = np.linalg.norm(centres[:, None] - centres[None], axis=-1)[np.triu_indices(len(nodes), 1)]
    assert separations.min() >= 4 * GAUSS_SIGMA_MM
    curvature = 1.1 * GAUSS_HU / GAUSS_SIGMA_MM**2
    error_ct = np.sum(np.square(ct.GetSpacing())) / 8 * curvature
    error_patch = np.sum(np.square(spec.spacing_mm)) / 8 * curvature
    tolerance = (2 * error_ct + error_patch) / (WINDOW[1] - WINDOW[0])
    rows, cols = pixel_grid(spec.size)
    for fast, slow in zip(local, baseline):
        assert fast.node == slow.node
        for view, (fast_plane, slow_plane) in enumerate(zip(fast.planes, slow.planes)):
            assert fast_plane == slow_plane
            # compare away from the CT border, where the baseline grid pads differently
            indices = np.array(
                [ct.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in fast_plane.pixel_to_lps(rows, cols).reshape(-1, 3)]
            ).reshape(spec.size, spec.size, 3)
            inside = ((indices >= 1) & (indices <= np.array(ct.GetSize()) - 2)).all(axis=-1)
            assert inside.mean() > 0.5
            difference = np.abs(fast.image[view] - slow.image[view])[inside]
            assert difference.max() <= tolerance, (difference.max(), tolerance)
            # masks: the baseline's extra nearest-neighbour step moves each sample by at most half a
            # patch-voxel diagonal (0.68 mm < one 0.79 mm pixel), so the masks agree up to one pixel
            fast_mask, slow_mask = fast.mask[view].astype(bool), slow.mask[view].astype(bool)
            assert fast_mask.sum() > 20
            assert not (slow_mask & ~binary_dilation(fast_mask, np.ones((3, 3)))).any()
            assert not (fast_mask & ~binary_dilation(slow_mask, np.ones((3, 3)))).any()
        assert fast.largest_axial_z_lps == slow.largest_axial_z_lps or abs(
            fast.largest_axial_area_mm2 - slow.largest_axial_area_mm2
        ) < 0.1 * fast.largest_axial_area_mm2


def test_local_patches_are_much_faster_than_whole_volume_resampling():
    size, spacing = (256, 256, 80), (0.75, 0.75, 2.0)
    ct = empty_ct(size, spacing, np.eye(3), (0.0, 0.0, 0.0))
    labels = np.zeros(size[::-1], dtype=np.uint8)
    for n in range(10):
        k, j, i = 20 + 4 * n, 40 + 17 * n, 50 + 15 * n
        labels[k - 2 : k + 3, j - 6 : j + 7, i - 6 : i + 7] = n + 1
    label = with_array(ct, labels)
    nodes, components = extract_nodes(label)
    spec = PatchSpec()
    start = time.perf_counter()
    extract_patches(ct, components, nodes, spec, WINDOW)
    local_s = time.perf_counter() - start
    start = time.perf_counter()
    resample_whole_volume_then_crop(ct, components, nodes, spec, WINDOW)
    baseline_s = time.perf_counter() - start
    assert local_s < baseline_s / 3, (local_s, baseline_s)
