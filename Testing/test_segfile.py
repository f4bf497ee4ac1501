"""The `.seg.nrrd` written without Slicer opens in Slicer's own reader, colour-coded and in place,
with a terminology that Slicer's own General Anatomy list holds."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeClassifierLib.nodes import extract_nodes
from LymphNodeClassifierLib.segfile import LYMPH_NODE_TERMINOLOGY, PROBABILITY_TAG, probability_color, write_segmentation_file

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
vtk = pytest.importorskip("vtk")

from LymphNodeClassifierLogic.convert import sitk_image_from_volume_node  # noqa: E402
from LymphNodeClassifierLogic.module_logics import segmentations_logic  # noqa: E402


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
    logic = segmentations_logic(scene)
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


GENERAL_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"


def slicer_general_anatomy_terminology() -> dict | None:
    """Slicer's own "3D Slicer General Anatomy list" JSON, as trame-slicer (or slicer-core) ships it."""
    for package in ("trame_slicer", "slicer"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for folder in spec.submodule_search_locations:
            for path in sorted(Path(folder).rglob("*.json")):
                if "General" not in path.name and "term" not in path.name:
                    continue
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                if isinstance(data, dict) and data.get("SegmentationCategoryTypeContextName") == GENERAL_ANATOMY_CONTEXT:
                    return data
    return None


def assert_in_general_anatomy(terminology_string: str) -> None:
    """The entry's context, category and type are those of one entry of Slicer's General Anatomy list."""
    terminology = slicer_general_anatomy_terminology()
    if terminology is None:
        pytest.skip("neither trame-slicer nor slicer-core ships Slicer's General Anatomy terminology JSON here")
    parts = terminology_string.split("~")
    assert parts[0] == terminology["SegmentationCategoryTypeContextName"], parts[0]
    category_code, type_code = (tuple(part.split("^")) for part in parts[1:3])
    categories = {(c["CodingSchemeDesignator"], c["CodeValue"]): c for c in terminology["SegmentationCodes"]["Category"]}
    assert category_code[:2] in categories, f"category {category_code} is not in Slicer's General Anatomy list"
    category = categories[category_code[:2]]
    assert category_code[2] == category["CodeMeaning"]
    types = {(t["CodingSchemeDesignator"], t["CodeValue"]): t for t in category.get("Type", [])}
    assert type_code[:2] in types, f"type {type_code} is not filed under {category['CodeMeaning']} in Slicer's General Anatomy list"
    assert type_code[2] == types[type_code[:2]]["CodeMeaning"] == "Lymph node"


def test_segments_terminology_is_an_entry_of_slicers_general_anatomy_list(tmp_path):
    labels = two_node_label_image()
    nodes, components = extract_nodes(labels)
    path = tmp_path / "nodes.seg.nrrd"
    write_segmentation_file(path, components, nodes, [0.2, 0.7])
    scene = slicer.vtkMRMLScene()
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(segmentation_node)
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):  # what Slicer read back from the file
        segment = segmentation.GetNthSegment(index)
        value = vtk.reference("")
        assert segment.GetTag(segment.GetTerminologyEntryTagName(), value), "the segment has no terminology"
        assert_in_general_anatomy(str(value))
    assert_in_general_anatomy(LYMPH_NODE_TERMINOLOGY)
