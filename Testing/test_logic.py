"""MRML logic on a real slicer-core scene: segments, table, Grad-CAM node, re-runs, tilted CTs."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
vtk = pytest.importorskip("vtk")

from LymphNodeClassifierLib.errors import InputError  # noqa: E402
from LymphNodeClassifierLogic import ClassificationLogic  # noqa: E402
from LymphNodeClassifierLogic import scenarios  # noqa: E402
from LymphNodeClassifierLogic.convert import sitk_image_from_volume_node, update_volume_node_from_sitk_image  # noqa: E402
from LymphNodeClassifierLogic.module_logics import segmentations_logic  # noqa: E402
from helpers import export_untrained_model, rotation  # noqa: E402
from test_segfile import assert_in_general_anatomy  # noqa: E402

BUNDLED_MODEL = Path(scenarios.DEFAULT_MODEL_PATH)
needs_sample = pytest.mark.skipif(
    not (scenarios.SAMPLE_DATASET / "dataset.json").is_file(), reason="the bundled sample case is missing"
)


@pytest.fixture(scope="module")
def untrained_model(tmp_path_factory) -> Path:
    return export_untrained_model(tmp_path_factory.mktemp("model") / "untrained.pt")


def tilted_case(scene):
    """A fat-background CT on a tilted anisotropic grid with three soft-tissue ellipsoid nodes."""
    size = (90, 80, 24)
    spacing = (0.7, 0.8, 2.5)
    direction = rotation(0, 14) @ rotation(2, 9)
    ct = sitk.Image(size, sitk.sitkInt16)
    ct.SetSpacing(spacing)
    ct.SetOrigin((-30.0, -25.0, 100.0))
    ct.SetDirection(tuple(direction.ravel()))
    kji = np.indices(size[::-1]).reshape(3, -1).T
    ijk = kji[:, ::-1].astype(float)
    points = (direction @ (ijk * spacing).T).T + np.array(ct.GetOrigin())
    rng = np.random.default_rng(1)
    hu = np.full(len(points), -100.0) + rng.normal(0, 10, len(points))
    hu[ijk[:, 0] < 4] = -1000.0  # air along one edge, as a CT has (the input check wants HU values)
    labels = np.zeros(len(points), dtype=np.uint16)
    centres = [np.array(ct.TransformContinuousIndexToPhysicalPoint(c)) for c in ((25.0, 25.0, 11.0), (60.0, 30.0, 12.0), (45.0, 60.0, 10.0))]
    for value, (centre, semi_axes) in enumerate(zip(centres, ((6, 4, 5), (5, 5, 6), (8, 5, 6))), start=1):
        inside = np.sum(((points - centre) / semi_axes) ** 2, axis=1) <= 1.0
        hu[inside] = 40 + rng.normal(0, 10, inside.sum())
        labels[inside] = value
    ct = sitk.GetImageFromArray(hu.reshape(size[::-1]).astype(np.int16))
    ct.SetSpacing(spacing)
    ct.SetOrigin((-30.0, -25.0, 100.0))
    ct.SetDirection(tuple(direction.ravel()))
    label_image = sitk.GetImageFromArray(labels.reshape(size[::-1]))
    label_image.CopyInformation(ct)
    ct_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "tilted CT")
    update_volume_node_from_sitk_image(ct_node, ct)
    labels_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "tilted labels")
    update_volume_node_from_sitk_image(labels_node, label_image)
    return ct_node, labels_node, centres


def physical_centroid(image: sitk.Image, mask: np.ndarray, weights=None) -> np.ndarray:
    kji = np.argwhere(mask)
    points = np.array([image.TransformIndexToPhysicalPoint(tuple(int(v) for v in p[::-1])) for p in kji])
    w = np.ones(len(points)) if weights is None else weights[mask]
    return (points * w[:, None]).sum(axis=0) / w.sum()


def test_tilted_ct_outputs_land_on_the_nodes(untrained_model):
    scene = slicer.vtkMRMLScene()
    ct_node, labels_node, centres = tilted_case(scene)
    # the untrained model calls every node benign and its benign-class CAM happens to be empty:
    # the geometry checks explain the metastatic class
    outputs = ClassificationLogic().classify(ct_node, labels_node, model_path=untrained_model, device="cpu", gradcam_target="metastatic")
    scenarios.check_outputs(outputs, 3)
    scenarios.check_gradcam_on_ct_grid(outputs, ct_node)
    scenarios.check_nodes_at_label_centroids(outputs, labels_node)

    # Each segment, exported back to a label map, sits where its ellipsoid is in physical space.
    logic = segmentations_logic(scene)
    segmentation = outputs.segmentation_node.GetSegmentation()
    exported = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    for node in outputs.nodes:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentation.GetSegmentIdBySegmentName(scenarios_segment_name(outputs, node)))
        assert logic.ExportSegmentsToLabelmapNode(outputs.segmentation_node, ids, exported, ct_node)
        image = sitk_image_from_volume_node(exported)
        centre = physical_centroid(image, sitk.GetArrayFromImage(image) > 0)
        nearest = min(centres, key=lambda c: np.linalg.norm(c - centre))
        assert np.linalg.norm(nearest - centre) < 1.0, f"segment of node {node.node_id} is {np.linalg.norm(nearest - centre):.1f} mm off"

    # Grad-CAM is zero far from every node and each node's patch region holds CAM values.
    cam = sitk_image_from_volume_node(outputs.gradcam_node)
    cam_values = sitk.GetArrayFromImage(cam)
    kji = np.argwhere(cam_values > 0)
    points = np.array([cam.TransformIndexToPhysicalPoint(tuple(int(v) for v in p[::-1])) for p in kji[:: max(1, len(kji) // 2000)]])
    distance_to_nearest_node = np.min([np.linalg.norm(points - c, axis=1) for c in centres], axis=0)
    half_patch_diagonal = 0.79 * 64 / 2 * np.sqrt(3)
    assert distance_to_nearest_node.max() <= half_patch_diagonal + 2.0


def scenarios_segment_name(outputs, node) -> str:
    segmentation = outputs.segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        if segment.GetName().startswith(f"Node {node.node_id} "):
            return segment.GetName()
    raise AssertionError(f"no segment for node {node.node_id}")


def test_rerun_replaces_outputs_and_node_table_without_model(untrained_model):
    scene = slicer.vtkMRMLScene()
    ct_node, labels_node, _ = tilted_case(scene)
    logic = ClassificationLogic()
    table_node = logic.extract_node_table(ct_node, labels_node)
    assert table_node.GetTable().GetNumberOfRows() == 3
    assert table_node.GetTable().GetColumnByName("probability") is None
    first = logic.classify(ct_node, labels_node, model_path=untrained_model, device="cpu")
    before = scene.GetNumberOfNodes()
    second = logic.classify(ct_node, labels_node, model_path=untrained_model, device="cpu")
    assert scene.GetNumberOfNodes() == before
    assert second.table_node is first.table_node is table_node
    assert second.table_node.GetTable().GetColumnByName("probability") is not None


def converter_rules() -> list[str]:
    """The segmentation converter rules registered in this process (Slicer's global factory)."""
    rules = slicer.vtkSegmentationConverterFactory.GetInstance().GetConverterRules()
    return sorted(f"{rule.GetName()}" for rule in rules)


def test_classifying_again_registers_no_converter_rules_or_node_classes(untrained_model):
    """Issue 9 item 6: one Segmentations logic, not a new one (and four more converter rules) per Classify."""
    scene = slicer.vtkMRMLScene()
    ct_node, labels_node, _ = tilted_case(scene)
    segmentation_input = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "painted")
    logic = ClassificationLogic()
    first = logic.classify(ct_node, labels_node, model_path=untrained_model, device="cpu", gradcam=False)
    assert segmentations_logic(scene).ImportLabelmapToSegmentationNode(labels_node, segmentation_input)
    logic.classify(ct_node, segmentation_input, model_path=untrained_model, device="cpu", gradcam=False)
    rules, classes = converter_rules(), scene.GetNumberOfRegisteredNodeClasses()
    assert rules, "no converter rule is registered at all"
    # no check for duplicates in the whole list: the factory is process-wide, and another test's
    # offscreen Slicer app (trame-slicer) registers its own Segmentations logic's rules too
    for labels in (labels_node, segmentation_input, labels_node):
        again = logic.classify(ct_node, labels, model_path=untrained_model, device="cpu", gradcam=False)
        assert again.segmentation_node is first.segmentation_node
        assert converter_rules() == rules, "classifying again added segmentation converter rules"
        assert scene.GetNumberOfRegisteredNodeClasses() == classes, "classifying again registered node classes"
    segmentation = first.segmentation_node.GetSegmentation()  # issue 9 item 9: a terminology Slicer's lists hold
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        value = vtk.reference("")
        assert segment.GetTag(segment.GetTerminologyEntryTagName(), value)
        assert_in_general_anatomy(str(value))
    other_scene = slicer.vtkMRMLScene()  # another scene (and a new ClassificationLogic) adds none either
    ct_other, labels_other, _ = tilted_case(other_scene)
    ClassificationLogic().classify(ct_other, labels_other, model_path=untrained_model, device="cpu", gradcam=False)
    assert converter_rules() == rules


def test_window_differing_from_card_is_reported_and_displayed(untrained_model):
    scene = slicer.vtkMRMLScene()
    ct_node, labels_node, _ = tilted_case(scene)
    outputs = ClassificationLogic().classify(ct_node, labels_node, model_path=untrained_model, window=(-160.0, 240.0), device="cpu", gradcam=False)
    display = ct_node.GetDisplayNode()
    assert display.GetWindow() == pytest.approx(400.0) and display.GetLevel() == pytest.approx(40.0)
    assert any("trained with" in message for message in outputs.result.messages)
    assert outputs.gradcam_node is None


def test_bad_inputs_give_one_clear_error(untrained_model):
    scene = slicer.vtkMRMLScene()
    ct_node, labels_node, _ = tilted_case(scene)
    logic = ClassificationLogic()
    with pytest.raises(InputError, match="CT volume"):
        logic.classify(labels_node, labels_node, model_path=untrained_model)
    with pytest.raises(InputError, match="label"):
        logic.classify(ct_node, None, model_path=untrained_model)
    empty = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "empty")
    update_volume_node_from_sitk_image(empty, sitk.Image(sitk_image_from_volume_node(labels_node)) * 0)
    with pytest.raises(InputError, match="empty"):
        logic.classify(ct_node, empty, model_path=untrained_model)
    with pytest.raises(InputError, match="does not exist"):
        logic.classify(ct_node, labels_node, model_path="/nonexistent/model.pt")


@needs_sample
def test_sample_case_scenario_with_untrained_model(untrained_model):
    summary = scenarios.scenario_classify_sample_case(slicer.vtkMRMLScene(), model_path=untrained_model)
    assert summary["nodes"] >= 2


@needs_sample
def test_segmentation_input_scenario(untrained_model):
    scenarios.scenario_segmentation_input(slicer.vtkMRMLScene(), model_path=untrained_model)


@needs_sample
@pytest.mark.skipif(not BUNDLED_MODEL.is_file(), reason="the bundled model is not built yet")
def test_all_scenarios_with_bundled_model():
    scenarios.run_all(slicer.vtkMRMLScene())
