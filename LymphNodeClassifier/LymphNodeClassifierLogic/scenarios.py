"""End-to-end scenarios on the bundled sample case, shared by the headless tests and Slicer's self-test.

`Testing/test_logic.py` runs them on a slicer-core scene; the module's Test class runs them inside
Slicer when a user presses "Reload and Test". Each scenario raises AssertionError with a message
saying what went wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from LymphNodeClassifierLib.dataset import Dataset
from LymphNodeClassifierLib.geometry import continuous_indices_of_physical_points, ras_to_lps

from .convert import load_volume_node, sitk_image_from_volume_node
from .logic import DEFAULT_MODEL_PATH, PROBABILITY_TAG, ClassificationLogic

SAMPLE_DATASET = Path(__file__).resolve().parents[1] / "Resources" / "SampleData"


def new_scene():
    """Slicer's scene inside the application, a fresh MRML scene headless."""
    return slicer.mrmlScene if hasattr(slicer, "mrmlScene") else slicer.vtkMRMLScene()


def load_sample_case(scene):
    dataset = Dataset.load(SAMPLE_DATASET)
    case = dataset.cases[0]
    ct_node = load_volume_node(scene, str(dataset.ct_path(case)), f"{case.case_id} CT")
    labels_node = load_volume_node(scene, str(dataset.labels_path(case)), f"{case.case_id} labels", labelmap=True)
    return dataset, case, ct_node, labels_node


def segment_probability(segment) -> float:
    value = vtk.reference("")
    assert segment.GetTag(PROBABILITY_TAG, value), f"segment '{segment.GetName()}' has no probability tag"
    return float(str(value))


def check_outputs(outputs, expected_nodes: int) -> None:
    segmentation = outputs.segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == expected_nodes, (
        f"{segmentation.GetNumberOfSegments()} segments for {expected_nodes} nodes"
    )
    table = outputs.table_node.GetTable()
    assert table.GetNumberOfRows() == expected_nodes, f"{table.GetNumberOfRows()} table rows for {expected_nodes} nodes"
    # Colours follow the probability: redder and less green as the probability rises.
    segments = [segmentation.GetNthSegment(index) for index in range(expected_nodes)]
    by_probability = sorted(segments, key=segment_probability)
    reds = [segment.GetColor()[0] for segment in by_probability]
    greens = [segment.GetColor()[1] for segment in by_probability]
    assert all(a <= b + 1e-6 for a, b in zip(reds, reds[1:])), "red does not rise with the probability"
    assert all(a >= b - 1e-6 for a, b in zip(greens, greens[1:])), "green does not fall with the probability"
    for segment in segments:
        probability = segment_probability(segment)
        assert f"{round(100 * probability)} %" in segment.GetName(), f"segment name '{segment.GetName()}' lacks its probability"


def check_gradcam_on_ct_grid(outputs, ct_node) -> None:
    """The CAM volume shares the CT's spacing and direction, its origin lies on the CT grid, values in 0..1."""
    ct = sitk_image_from_volume_node(ct_node)
    cam = sitk_image_from_volume_node(outputs.gradcam_node)
    np.testing.assert_allclose(cam.GetSpacing(), ct.GetSpacing(), rtol=1e-6, err_msg="CAM spacing differs from the CT's")
    np.testing.assert_allclose(cam.GetDirection(), ct.GetDirection(), atol=1e-6, err_msg="CAM direction differs from the CT's")
    origin_index = continuous_indices_of_physical_points(ct, np.array(cam.GetOrigin()))
    np.testing.assert_allclose(origin_index, np.round(origin_index), atol=1e-3, err_msg="CAM origin is not on the CT grid")
    values = sitk.GetArrayViewFromImage(cam)
    assert values.min() >= 0.0 and values.max() <= 1.0 + 1e-6, "CAM values outside 0..1"
    assert values.max() > 0.0, "CAM is empty"


def check_nodes_at_label_centroids(outputs, labels_node) -> None:
    """Each node's RAS centroid lies inside the label map voxels of that node (RAS -> LPS -> index)."""
    labels = sitk_image_from_volume_node(labels_node)
    array = sitk.GetArrayViewFromImage(labels)
    for node in outputs.nodes:
        ijk = np.round(continuous_indices_of_physical_points(labels, ras_to_lps(np.array(node.centroid_ras)))).astype(int)
        assert array[ijk[2], ijk[1], ijk[0]] == node.label_value, f"node {node.node_id}'s centroid is not inside its mask"


def scenario_classify_sample_case(scene=None, model_path=DEFAULT_MODEL_PATH) -> dict:
    """Classify the sample case, check every output, classify again and check nothing piled up."""
    scene = scene or new_scene()
    dataset, case, ct_node, labels_node = load_sample_case(scene)
    logic = ClassificationLogic()
    expected = len(dataset.nodes_of(case.case_id))
    outputs = logic.classify(ct_node, labels_node, model_path=model_path, window=(-135.0, 215.0), device="cpu")
    check_outputs(outputs, expected)
    check_gradcam_on_ct_grid(outputs, ct_node)
    check_nodes_at_label_centroids(outputs, labels_node)

    counts = {cls: scene.GetNumberOfNodesByClass(cls) for cls in ("vtkMRMLSegmentationNode", "vtkMRMLTableNode", "vtkMRMLScalarVolumeNode")}
    again = logic.classify(ct_node, labels_node, model_path=model_path, window=(-135.0, 215.0), device="cpu")
    after = {cls: scene.GetNumberOfNodesByClass(cls) for cls in counts}
    assert after == counts, f"re-running added nodes: {counts} -> {after}"
    assert again.segmentation_node is outputs.segmentation_node and again.table_node is outputs.table_node
    np.testing.assert_allclose(again.result.probabilities, outputs.result.probabilities, atol=1e-6)
    return {"nodes": expected, "probabilities": [float(p) for p in outputs.result.probabilities]}


def scenario_segmentation_input(scene=None, model_path=DEFAULT_MODEL_PATH) -> None:
    """A segmentation node works as input like the label map it came from."""
    scene = scene or new_scene()
    dataset, case, ct_node, labels_node = load_sample_case(scene)
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "painted nodes")
    from .module_logics import segmentations_logic  # the module's logic, not a new one per call (issue 9)

    assert segmentations_logic(scene).ImportLabelmapToSegmentationNode(labels_node, segmentation_node)
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    from_labels = ClassificationLogic().classify(ct_node, labels_node, model_path=model_path, device="cpu", gradcam=False)
    from_segments = ClassificationLogic().classify(ct_node, segmentation_node, model_path=model_path, device="cpu", gradcam=False)
    assert len(from_segments.nodes) == len(from_labels.nodes)
    np.testing.assert_allclose(
        sorted(from_segments.result.probabilities), sorted(from_labels.result.probabilities), atol=1e-4,
        err_msg="a segmentation input classifies differently from its label map",
    )


def run_all(scene=None) -> None:
    """Every scenario, for Slicer's "Reload and Test" (the headless tests call them one by one)."""
    scenario_classify_sample_case(scene)
    scenario_segmentation_input(scene)
