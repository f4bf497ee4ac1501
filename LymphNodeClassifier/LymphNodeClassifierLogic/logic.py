"""MRML logic: takes and returns MRML nodes, runs the Lib pipeline in between.

Imports `vtk` and (through its helpers) `slicer`, never `qt`, so it runs inside Slicer and headless on slicer-core.
Outputs (segmentation, table, Grad-CAM volume) are referenced from the CT node, so classifying the
same CT again updates them in place instead of piling up nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import vtk

from LymphNodeClassifierLib.errors import InputError
from LymphNodeClassifierLib.model import LoadedModel, load_model
from LymphNodeClassifierLib.validate import InputPolicy, labels_on_ct
from LymphNodeClassifierLib.nodes import NodeInfo, extract_nodes
from LymphNodeClassifierLib.pipeline import ClassificationResult, StageTimer, classify_images, window_from_card
from LymphNodeClassifierLib.segfile import (
    LYMPH_NODE_TERMINOLOGY,
    NODE_ID_TAG,
    PROBABILITY_TAG,
    probability_color,
    segment_name,
)

from .convert import sitk_image_from_volume_node, update_volume_node_from_sitk_image
from .module_logics import segmentations_logic

MODULE_DIR = Path(__file__).resolve().parents[1]
MODELS_DIR = MODULE_DIR / "Resources" / "Models"
DEFAULT_MODEL_PATH = MODELS_DIR / "lymph_node_phantom.pt"

SEGMENTATION_REFERENCE = "LymphNodeClassifierSegmentation"
TABLE_REFERENCE = "LymphNodeClassifierTable"
GRADCAM_REFERENCE = "LymphNodeClassifierGradCAM"
HEAT_COLOR_NODE_NAME = "LymphNodeClassifier Grad-CAM heat"

TABLE_COLUMNS = [
    ("node_id", "int"), ("label_value", "int"),
    ("centroid_R_mm", "double"), ("centroid_A_mm", "double"), ("centroid_S_mm", "double"),
    ("volume_mm3", "double"), ("short_axis_mm", "double"), ("long_axis_mm", "double"),
    ("touches_edge", "int"), ("probability", "double"), ("prediction", "string"),
]

ProgressCallback = Callable[[float, str], None]


@dataclass
class ClassificationOutputs:
    segmentation_node: object
    table_node: object
    gradcam_node: object | None
    result: ClassificationResult

    @property
    def nodes(self) -> list[NodeInfo]:
        return self.result.nodes


class ClassificationLogic:
    """Classify the lymph nodes of a CT and show them as MRML nodes."""

    def __init__(self) -> None:
        self._model_cache: dict[tuple[str, str], LoadedModel] = {}

    def load_model(self, model_path: str | Path | None = None, device: str = "auto") -> LoadedModel:
        path = Path(model_path) if model_path else DEFAULT_MODEL_PATH
        key = (str(path.resolve()), device)
        if key not in self._model_cache:
            self._model_cache[key] = load_model(path, device)
        return self._model_cache[key]

    def classify(
        self,
        ct_volume_node,
        labels_node,
        model_path: str | Path | None = None,
        window: tuple[float, float] | None = None,
        device: str = "auto",
        gradcam: bool = True,
        progress: ProgressCallback | None = None,
        timer: StageTimer | None = None,
        policy: InputPolicy = InputPolicy(),
        gradcam_target: str = "predicted",
        per_label_value: bool = False,
    ) -> ClassificationOutputs:
        """Run the pipeline and create or update the segmentation, table and Grad-CAM nodes.

        A node is a connected component of the label map, or with `per_label_value` all voxels of one
        label value (a dataset case's `node_definition`, as `classify --dataset` follows it).

        Grad-CAM explains each node's predicted class, or the class `gradcam_target` names
        (`gradcam.CAM_TARGETS`, as `classify --gradcam-class`).

        `labels_node` is a labelmap volume node or a segmentation node (exported on the CT grid).
        `window` (low, high HU) is how the CT is displayed; the model always sees the window of its
        card (the one it was trained with), and a message says so when the two differ.
        """
        ct_image, labels_image = self._input_images(ct_volume_node, labels_node)
        scene = ct_volume_node.GetScene()
        model = self.load_model(model_path, device)
        # The same input checks as every command (validate: HU, geometry policy); notes/warnings land in the result.
        result = classify_images(ct_image, labels_image, model, with_gradcam=gradcam, timer=timer, progress=progress, policy=policy,
                                 gradcam_target=gradcam_target, per_label_value=per_label_value)
        if window is not None:
            show_ct_window(ct_volume_node, window)
            model_window = window_from_card(model.card)
            if not np.allclose(window, model_window):
                result.messages.append(
                    f"The CT is shown at {window[0]:g}..{window[1]:g} HU; the model classified the nodes at the "
                    f"window it was trained with, {model_window[0]:g}..{model_window[1]:g} HU."
                )

        segmentation_node = self._output_node(scene, ct_volume_node, SEGMENTATION_REFERENCE, "vtkMRMLSegmentationNode", "lymph nodes")
        self._fill_segmentation(segmentation_node, ct_volume_node, result)
        table_node = self._output_node(scene, ct_volume_node, TABLE_REFERENCE, "vtkMRMLTableNode", "lymph node table")
        fill_node_table(table_node, result.nodes, result.probabilities, result.predictions)
        gradcam_node = None
        if result.cam_volume is not None:
            gradcam_node = self._output_node(scene, ct_volume_node, GRADCAM_REFERENCE, "vtkMRMLScalarVolumeNode", "Grad-CAM")
            update_volume_node_from_sitk_image(gradcam_node, result.cam_volume)
            self._show_as_heat_map(scene, gradcam_node)
        return ClassificationOutputs(segmentation_node, table_node, gradcam_node, result)

    def extract_node_table(self, ct_volume_node, labels_node):
        """The nodes' geometry (no model): volume, centroid, short/long axis, edge flag, in a table node."""
        ct_image, labels_image = self._input_images(ct_volume_node, labels_node)
        labels_image, _ = labels_on_ct(ct_image, labels_image)
        nodes, _ = extract_nodes(labels_image)
        scene = ct_volume_node.GetScene()
        table_node = self._output_node(scene, ct_volume_node, TABLE_REFERENCE, "vtkMRMLTableNode", "lymph node table")
        fill_node_table(table_node, nodes)
        return table_node

    # -- inputs ----------------------------------------------------------------------------

    def _input_images(self, ct_volume_node, labels_node):
        if ct_volume_node is None or not ct_volume_node.IsA("vtkMRMLScalarVolumeNode") or ct_volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError("Select a CT volume (a scalar volume, not a label map) as input.")
        if labels_node is None:
            raise InputError("Select the label volume or segmentation that masks the lymph nodes.")
        return sitk_image_from_volume_node(ct_volume_node), self._labels_image(labels_node, ct_volume_node)

    def _labels_image(self, labels_node, ct_volume_node):
        if labels_node.IsA("vtkMRMLSegmentationNode"):
            scene = labels_node.GetScene()
            labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__lymph_node_labels_export")
            try:
                exported = segmentations_logic(scene).ExportAllSegmentsToLabelmapNode(labels_node, labelmap, 0)  # extent of the reference
                if not exported or labelmap.GetImageData() is None:
                    raise InputError(f"Segmentation '{labels_node.GetName()}' has no segments to classify; paint the nodes first.")
                return sitk_image_from_volume_node(labelmap)
            finally:
                scene.RemoveNode(labelmap)
        if labels_node.IsA("vtkMRMLScalarVolumeNode"):
            return sitk_image_from_volume_node(labels_node)
        raise InputError("The labels must be a label map volume or a segmentation node.")

    # -- outputs ---------------------------------------------------------------------------

    @staticmethod
    def _output_node(scene, ct_volume_node, reference_role: str, class_name: str, suffix: str):
        node = ct_volume_node.GetNodeReference(reference_role)
        if node is None or node.GetScene() is not scene:
            node = scene.AddNewNodeByClass(class_name, f"{ct_volume_node.GetName()} {suffix}")
            ct_volume_node.SetNodeReferenceID(reference_role, node.GetID())
        return node

    def _fill_segmentation(self, segmentation_node, ct_volume_node, result: ClassificationResult) -> None:
        scene = segmentation_node.GetScene()
        segmentation = segmentation_node.GetSegmentation()
        segmentation.RemoveAllSegments()
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(ct_volume_node)
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__lymph_node_components")
        try:
            update_volume_node_from_sitk_image(labelmap, result.component_image)
            if not segmentations_logic(scene).ImportLabelmapToSegmentationNode(labelmap, segmentation_node):
                raise RuntimeError("Slicer could not import the node label map into the segmentation.")
        finally:
            scene.RemoveNode(labelmap)
        nodes_by_id = {node.node_id: (node, probability) for node, probability in zip(result.nodes, result.probabilities)}
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            node, probability = nodes_by_id[int(segment.GetLabelValue())]
            segment.SetName(segment_name(node, float(probability)))
            segment.SetColor(*probability_color(float(probability)))
            segment.SetTag(PROBABILITY_TAG, f"{float(probability):.6f}")
            segment.SetTag(NODE_ID_TAG, str(node.node_id))
            segment.SetTag(segment.GetTerminologyEntryTagName(), LYMPH_NODE_TERMINOLOGY)
        if segmentation_node.GetDisplayNode() is None:
            segmentation_node.CreateDefaultDisplayNodes()

    @staticmethod
    def _show_as_heat_map(scene, gradcam_node) -> None:
        if gradcam_node.GetDisplayNode() is None:
            gradcam_node.CreateDefaultDisplayNodes()
        display = gradcam_node.GetDisplayNode()
        display.SetAndObserveColorNodeID(heat_color_node(scene).GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        display.SetLowerThreshold(0.05)
        display.SetUpperThreshold(1.0)
        display.ApplyThresholdOn()


def heat_color_node(scene):
    """A black-red-yellow-white colour table for Grad-CAM; made once per scene (slicer-core scenes have none)."""
    existing = scene.GetFirstNodeByName(HEAT_COLOR_NODE_NAME)
    if existing is not None:
        return existing
    color_node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", HEAT_COLOR_NODE_NAME)
    color_node.SetTypeToUser()
    color_node.SetNumberOfColors(256)
    for index in range(256):
        t = index / 255.0
        color_node.SetColor(index, f"{index}", min(1.0, 3 * t), float(np.clip(3 * t - 1, 0, 1)), float(np.clip(3 * t - 2, 0, 1)), 1.0)
    color_node.SetHideFromEditors(False)
    return color_node


def show_ct_window(ct_volume_node, window: tuple[float, float]) -> None:
    """Display the CT at `window` (low, high HU) in the slice views."""
    if ct_volume_node.GetDisplayNode() is None:
        ct_volume_node.CreateDefaultDisplayNodes()
    display = ct_volume_node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(float(window[0]), float(window[1]))


def fill_node_table(table_node, nodes: Sequence[NodeInfo], probabilities=None, predictions=None) -> None:
    """One row per node with its geometry and, after classification, probability and prediction."""
    columns = TABLE_COLUMNS if probabilities is not None else TABLE_COLUMNS[:-2]
    table = vtk.vtkTable()
    arrays = {}
    for name, kind in columns:
        array = {"int": vtk.vtkIntArray, "double": vtk.vtkDoubleArray, "string": vtk.vtkStringArray}[kind]()
        array.SetName(name)
        arrays[name] = array
        table.AddColumn(array)
    for index, node in enumerate(nodes):
        values = {
            "node_id": node.node_id, "label_value": node.label_value,
            "centroid_R_mm": node.centroid_ras[0], "centroid_A_mm": node.centroid_ras[1], "centroid_S_mm": node.centroid_ras[2],
            "volume_mm3": node.volume_mm3, "short_axis_mm": node.short_axis_mm, "long_axis_mm": node.long_axis_mm,
            "touches_edge": int(node.touches_edge),
        }
        if probabilities is not None:
            values["probability"] = float(probabilities[index])
            values["prediction"] = "metastatic" if predictions[index] else "benign"
        for name, kind in columns:
            if kind == "string":
                arrays[name].InsertNextValue(str(values[name]))
            else:
                arrays[name].InsertNextValue(values[name])
    table_node.SetAndObserveTable(table)
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.SetLocked(True)
