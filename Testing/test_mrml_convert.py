"""RAS (Slicer) <-> LPS (ITK) conversion, checked against slicer-core's own volume reader.

The same NRRD is read by Slicer's vtkSlicerVolumesLogic (which reports IJK->RAS) and by SimpleITK
(which reports LPS): every voxel must land on the same physical point, for tilted directions and
anisotropic spacing too.
"""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

from LymphNodeClassifierLib.errors import InputError  # noqa: E402
from LymphNodeClassifierLogic.convert import (  # noqa: E402
    ijk_to_ras_matrix,
    load_volume_node,
    sitk_image_from_volume_node,
    update_volume_node_from_sitk_image,
)

SHARED_LUNG = Path(__file__).resolve().parents[2] / "shared" / "data" / "pyradiomics-lung"


def rotation(axis: str, degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    c, s = np.cos(angle), np.sin(angle)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def tilted_image(pixel_type=sitk.sitkInt16) -> sitk.Image:
    rng = np.random.default_rng(3)
    array = rng.integers(-1000, 1000, size=(7, 11, 13)).astype(np.int16)
    image = sitk.Cast(sitk.GetImageFromArray(array), pixel_type)
    image.SetSpacing((0.7, 0.9, 5.0))
    image.SetOrigin((-120.5, 33.25, -410.0))
    image.SetDirection(tuple((rotation("x", 17) @ rotation("z", -8)).ravel()))
    return image


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def lps_points_from_sitk(image: sitk.Image, ijk: np.ndarray) -> np.ndarray:
    return np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(map(float, p))) for p in ijk])


def ras_points_from_node(node, ijk: np.ndarray) -> np.ndarray:
    matrix = ijk_to_ras_matrix(node)
    return (matrix[:3, :3] @ ijk.T).T + matrix[:3, 3]


def assert_same_physical_points(image: sitk.Image, node) -> None:
    ijk = np.array([[0, 0, 0], [12, 10, 6], [3.5, 7.25, 1.0], [12, 0, 6]], dtype=float)
    lps = lps_points_from_sitk(image, ijk)
    ras = ras_points_from_node(node, ijk)
    np.testing.assert_allclose(ras, lps * np.array([-1, -1, 1]), atol=1e-4)


def test_file_read_by_slicer_and_by_simpleitk_agree(tmp_path, scene):
    image = tilted_image()
    path = tmp_path / "tilted.nrrd"
    sitk.WriteImage(image, str(path))
    node = load_volume_node(scene, str(path), "tilted")
    assert_same_physical_points(image, node)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayFromImage(image))


def test_loaded_label_map_gets_a_colour_table(tmp_path, scene):
    """Issue 9 item 6: the Volumes logic is wired to the application's Colors logic, as in Slicer."""
    labels = sitk.GetImageFromArray(np.arange(7 * 11 * 13, dtype=np.uint8).reshape(7, 11, 13) % 4)
    path = tmp_path / "labels.nrrd"
    sitk.WriteImage(labels, str(path))
    for name in ("labels", "labels again"):  # the second load reuses the scene's logics
        node = load_volume_node(scene, str(path), name, labelmap=True)
        assert node.IsA("vtkMRMLLabelMapVolumeNode")
        display = node.GetDisplayNode()
        assert display is not None and display.GetColorNodeID(), "the label map has no colour table"
        color_node = scene.GetNodeByID(display.GetColorNodeID())
        assert color_node is not None and color_node.IsA("vtkMRMLColorNode") and color_node.GetNumberOfColors() >= 4


def test_node_to_sitk_matches_simpleitk_reader(tmp_path, scene):
    image = tilted_image()
    path = tmp_path / "tilted.nrrd"
    sitk.WriteImage(image, str(path))
    converted = sitk_image_from_volume_node(load_volume_node(scene, str(path), "tilted"))
    np.testing.assert_allclose(converted.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(converted.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(converted.GetDirection(), image.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(converted), sitk.GetArrayFromImage(image))


def test_sitk_to_node_round_trip(scene):
    image = tilted_image(sitk.sitkFloat32)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "cam")
    update_volume_node_from_sitk_image(node, image)
    assert_same_physical_points(image, node)
    back = sitk_image_from_volume_node(node)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_transformed_node_is_refused(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    update_volume_node_from_sitk_image(node, tilted_image())
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "t")
    node.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(InputError, match="harden"):
        sitk_image_from_volume_node(node)


@pytest.mark.skipif(not SHARED_LUNG.is_dir(), reason="../shared/data/pyradiomics-lung is absent (only in CI beside the clone)")
def test_real_chest_ct_geometry_agrees(scene):
    path = SHARED_LUNG / "lung1_image.nrrd"
    image = sitk.ReadImage(str(path))
    node = load_volume_node(scene, str(path), "lung1")
    ijk = np.array([[0, 0, 0], [511, 511, 47], [100.5, 300.25, 20]], dtype=float)
    np.testing.assert_allclose(
        ras_points_from_node(node, ijk), lps_points_from_sitk(image, ijk) * np.array([-1, -1, 1]), atol=1e-3
    )
