"""The `.seg.nrrd` written without Slicer opens in Slicer's own reader, colour-coded and in place."""

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeClassifierLib.nodes import extract_nodes
from LymphNodeClassifierLib.segfile import PROBABILITY_TAG, probability_color, write_segmentation_file

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
vtk = pytest.importorskip("vtk")

from LymphNodeClassifierLogic.convert import sitk_image_from_volume_node  # noqa: E402


def two_node_label_image() -> sitk.Image:
    array = np.zeros((12, 40, 50), dtype=np.uint16)
    array[3:7, 5:12, 6:15] = 4
    array[5:10, 25:33, 30:44] = 9
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.7, 2.5))
    image.SetOrigin((10.0, -40.0, 300.0))
    angle = np.deg2rad(12)
    tilt = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    image.SetDirection(tuple(tilt.ravel()))
    return image


def test_segmentation_file_reads_back_in_slicer(tmp_path):
    labels = two_node_label_image()
    nodes, components = extract_nodes(labels)
    probabilities = [0.12, 0.93]
    path = tmp_path / "nodes.seg.nrrd"
    write_segmentation_file(path, components, nodes, probabilities)

    scene = slicer.vtkMRMLScene()
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(segmentation_node), "Slicer could not read the segmentation file"
    segmentation = segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(nodes) == 2

    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    for index, (node, probability) in enumerate(zip(nodes, probabilities)):
        segment = segmentation.GetSegment(f"node_{node.node_id}")
        assert segment is not None
        assert segment.GetName() == f"Node {node.node_id} - {round(100 * probability)} %"
        np.testing.assert_allclose(segment.GetColor(), probability_color(probability), atol=1e-3)
        value = vtk.reference("")
        assert segment.GetTag(PROBABILITY_TAG, value)
        assert float(str(value)) == pytest.approx(probability)

        # The segment's voxels land where the node is, in physical space (tilted grid).
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(f"node_{node.node_id}")
        assert logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap)
        exported = sitk_image_from_volume_node(labelmap)
        mask = sitk.GetArrayFromImage(exported) > 0
        kji = np.argwhere(mask)
        centre = np.mean([exported.TransformIndexToPhysicalPoint(tuple(int(v) for v in p[::-1])) for p in kji], axis=0)
        np.testing.assert_allclose(centre, node.centroid_lps, atol=1e-3)

    # The probability ordering shows up as colour: more metastatic = redder, less green.
    low, high = (segmentation.GetSegment(f"node_{n.node_id}").GetColor() for n in nodes)
    assert high[0] >= low[0] and high[1] < low[1]
