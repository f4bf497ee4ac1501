"""LPS/RAS, index <-> physical helpers and label-vs-CT validation, checked against SimpleITK."""

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeClassifierLib.errors import InputError
from LymphNodeClassifierLib.geometry import (
    continuous_indices_of_physical_points,
    index_to_physical_matrix,
    lps_to_ras,
    physical_points_of_indices,
    prepare_label_image,
    ras_to_lps,
    same_geometry,
)
from helpers import TILTED, rotation




def make_ct(size=(20, 18, 12), spacing=(0.7, 0.8, 2.0), origin=(-10.0, 5.0, 30.0), direction=np.eye(3)) -> sitk.Image:
    ct = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 100, size[::-1]).astype(np.int16))
    ct.SetSpacing(spacing)
    ct.SetOrigin(origin)
    ct.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    return ct


def test_lps_ras_flip_first_two_axes_and_round_trip():
    points = np.random.default_rng(1).normal(size=(4, 2, 3))
    ras = lps_to_ras(points)
    np.testing.assert_allclose(ras[..., 0], -points[..., 0])
    np.testing.assert_allclose(ras[..., 1], -points[..., 1])
    np.testing.assert_allclose(ras[..., 2], points[..., 2])
    np.testing.assert_allclose(ras_to_lps(ras), points)
    with pytest.raises(ValueError):
        lps_to_ras(np.zeros((3, 2)))


@pytest.mark.parametrize("direction", [np.eye(3), TILTED, np.diag([-1.0, -1.0, 1.0]) @ rotation(2, 90)])
def test_index_to_physical_matches_simpleitk(direction):
    ct = make_ct(direction=direction)
    indices = np.random.default_rng(2).uniform(-1, 20, size=(50, 3))
    expected = np.array([ct.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in indices])
    np.testing.assert_allclose(physical_points_of_indices(ct, indices), expected, atol=1e-9)
    homogeneous = np.column_stack([indices, np.ones(len(indices))]) @ index_to_physical_matrix(ct).T
    np.testing.assert_allclose(homogeneous[:, :3], expected, atol=1e-9)
    back = np.array([ct.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in expected])
    np.testing.assert_allclose(continuous_indices_of_physical_points(ct, expected), back, atol=1e-9)


def test_physical_points_keep_the_leading_shape():
    ct = make_ct(direction=TILTED)
    grid = np.stack(np.meshgrid(np.arange(3), np.arange(4), np.arange(2), indexing="ij"), axis=-1).astype(float)
    points = physical_points_of_indices(ct, grid)
    assert points.shape == (3, 4, 2, 3)
    np.testing.assert_allclose(points[2, 3, 1], ct.TransformIndexToPhysicalPoint((2, 3, 1)), atol=1e-9)


def test_same_geometry():
    ct = make_ct()
    assert same_geometry(ct, sitk.Image(ct))
    moved = sitk.Image(ct)
    moved.SetOrigin((-10.0, 5.0, 30.5))
    assert not same_geometry(ct, moved)
    tilted = sitk.Image(ct)
    tilted.SetDirection(tuple(TILTED.ravel()))
    assert not same_geometry(ct, tilted)
    assert not same_geometry(ct, make_ct(size=(20, 18, 13)))


def label_like(ct: sitk.Image, array: np.ndarray) -> sitk.Image:
    label = sitk.GetImageFromArray(array)
    label.CopyInformation(ct)
    return label


def test_prepare_label_with_same_geometry_is_unchanged():
    ct = make_ct()
    array = np.zeros(ct.GetSize()[::-1], dtype=np.uint8)
    array[3:5, 4:8, 5:9] = 7
    label, resampled, message = prepare_label_image(ct, label_like(ct, array))
    assert not resampled and message is None
    assert same_geometry(label, ct)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), array)


def test_prepare_label_accepts_float_label_with_integer_values():
    ct = make_ct()
    array = np.zeros(ct.GetSize()[::-1], dtype=np.float32)
    array[3:5, 4:8, 5:9] = 3.0
    label, _, _ = prepare_label_image(ct, label_like(ct, array))
    assert label.GetPixelID() in (sitk.sitkUInt16, sitk.sitkUInt32)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), array.astype(np.uint16))


def test_label_on_other_grid_is_resampled_to_the_ct_at_the_right_place():
    ct = make_ct(size=(40, 40, 20), spacing=(0.7, 0.7, 2.0), direction=TILTED)
    # the label: a different, axis-aligned grid with a block around a known physical point
    label = sitk.Image((30, 30, 30), sitk.sitkUInt8)
    label.SetSpacing((1.0, 1.0, 1.0))
    centre_lps = np.array(ct.TransformContinuousIndexToPhysicalPoint((20.0, 20.0, 10.0)))
    label.SetOrigin(tuple(centre_lps - 15.0))
    array = np.zeros((30, 30, 30), dtype=np.uint8)
    array[11:20, 11:20, 11:20] = 4  # 9 mm cube centred on index 15 = centre_lps
    label = label_like(label, array)
    prepared, resampled, message = prepare_label_image(ct, label)
    assert resampled and "resampled" in message
    assert same_geometry(prepared, ct)
    prepared_array = sitk.GetArrayFromImage(prepared)
    assert set(np.unique(prepared_array)) == {0, 4}
    k, j, i = np.nonzero(prepared_array)
    mean_point = np.mean([ct.TransformIndexToPhysicalPoint((int(a), int(b), int(c))) for a, b, c in zip(i, j, k)], axis=0)
    assert np.linalg.norm(mean_point - centre_lps) < 1.0  # within a voxel of the true centre


def _expect_input_error(ct, label, words):
    with pytest.raises(InputError) as error:
        prepare_label_image(ct, label)
    message = str(error.value).lower()
    assert "\n" not in message
    for word in words:
        assert word in message


def test_fractional_float_label_is_rejected():
    ct = make_ct()
    array = np.zeros(ct.GetSize()[::-1], dtype=np.float32)
    array[3:5, 4:8, 5:9] = 0.6
    _expect_input_error(ct, label_like(ct, array), ["label", "integer"])


def test_empty_label_is_rejected():
    ct = make_ct()
    _expect_input_error(ct, label_like(ct, np.zeros(ct.GetSize()[::-1], dtype=np.uint8)), ["label", "empty"])


def test_label_without_overlap_is_rejected():
    ct = make_ct()
    array = np.zeros(ct.GetSize()[::-1], dtype=np.uint8)
    array[3:5, 4:8, 5:9] = 1
    far_away = label_like(ct, array)
    far_away.SetOrigin((500.0, 500.0, 500.0))
    _expect_input_error(ct, far_away, ["does not overlap"])


def test_negative_label_values_are_rejected():
    ct = make_ct()
    array = np.zeros(ct.GetSize()[::-1], dtype=np.int16)
    array[3:5, 4:8, 5:9] = -2
    _expect_input_error(ct, label_like(ct, array), ["negative"])


def test_2d_and_4d_ct_are_rejected():
    label = make_ct()
    ct_2d = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(18, 20)).astype(np.float32))
    _expect_input_error(ct_2d, label, ["2d", "3d"])
    ct_4d = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(2, 3, 18, 20)).astype(np.float32), isVector=False)
    assert ct_4d.GetDimension() == 4
    _expect_input_error(ct_4d, label, ["4d", "3d"])


def test_single_slice_ct_is_rejected():
    ct = make_ct(size=(20, 18, 1))
    _expect_input_error(ct, label_like(ct, np.ones((1, 18, 20), dtype=np.uint8)), ["single slice"])


def test_constant_ct_is_rejected():
    ct = make_ct()
    blank = sitk.Image(ct.GetSize(), sitk.sitkInt16) - 1024
    blank.CopyInformation(ct)
    array = np.zeros(ct.GetSize()[::-1], dtype=np.uint8)
    array[3:5, 4:8, 5:9] = 1
    _expect_input_error(blank, label_like(ct, array), ["ct", "empty"])


def test_grid_difference_is_described_in_physical_terms():
    from LymphNodeClassifierLib.geometry import describe_grid_difference, rotation_degrees

    ct = make_ct(spacing=(0.7, 0.8, 2.0), direction=TILTED)
    turned = make_ct(spacing=(0.7, 0.8, 2.0), direction=rotation(1, 30) @ TILTED)
    assert rotation_degrees(ct, turned) == pytest.approx(30.0, abs=1e-6)
    assert rotation_degrees(ct, ct) == pytest.approx(0.0, abs=1e-6)
    assert describe_grid_difference(ct, turned) == "rotated 30.0 deg"
    shifted = make_ct(spacing=(0.7, 0.8, 2.0), direction=TILTED, origin=(-10.0 + 18.0, 5.0 + 24.0, 30.0))
    assert describe_grid_difference(ct, shifted) == "origin offset (18, 24, 0) mm (30.0 mm)"
    coarse = make_ct(size=(14, 12, 8), spacing=(1.05, 1.2, 3.0), direction=TILTED)
    assert describe_grid_difference(ct, coarse) == "spacing (1.05, 1.2, 3) mm vs the CT's (0.7, 0.8, 2) mm, size (14, 12, 8) vs (20, 18, 12)"


def test_resampling_says_which_label_values_vanished():
    ct = make_ct(size=(10, 10, 6), spacing=(2.0, 2.0, 4.0))
    fine = sitk.Image([40, 40, 24], sitk.sitkUInt8)
    fine.SetSpacing((0.5, 0.5, 1.0))
    fine.SetOrigin(ct.TransformContinuousIndexToPhysicalPoint((-0.25, -0.25, -0.375)))
    fine[20:28, 20:28, 12:20] = 1  # 4 x 4 x 8 mm: survives
    fine[5, 5, 3] = 2  # 0.5 mm, between the CT's voxel centres
    _, resampled, message = prepare_label_image(ct, fine)
    assert resampled and "Label value 2 had no voxel left on the CT grid" in message
