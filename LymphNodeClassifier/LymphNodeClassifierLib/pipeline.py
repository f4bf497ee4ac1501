"""The classification pipeline on images: CT + label map -> nodes -> patches -> model -> results.

One function shared by the Slicer logic and the command line, so both run exactly the same steps.
Every preprocessing parameter comes from the model card, never from defaults: a model only sees
the window, spacing and patch geometry it was trained with.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import SimpleITK as sitk

from .errors import CancelledError
from .gradcam import cam_to_volume, gradcam, label_cam_volume
from .fusion import features_of_nodes, predict_fused, uses_node_features
from .inference import predict
from .model import LoadedModel
from .nodes import NodeInfo, components_on_grid, extract_nodes_cropped
from .patches import DEFAULT_FOV_MARGIN, DEFAULT_STACK_OFFSET_MM, NodePatch, PatchSpec, extract_patches
from .validate import InputPolicy, check_ct, labels_on_ct, node_warnings

ProgressCallback = Callable[[float, str], None]


@dataclass
class ClassificationResult:
    nodes: list[NodeInfo]
    patches: list[NodePatch]
    probabilities: np.ndarray
    predictions: np.ndarray
    decision_threshold: float
    component_crop: sitk.Image  # each node's node_id on the nodes' region of the CT grid (nodes.extract_nodes_cropped)
    grid: sitk.Image  # the CT: the grid `component_image` is on
    cams: np.ndarray | None = None
    cam_volume: sitk.Image | None = None
    cam_classes: np.ndarray | None = None  # per node, the class its Grad-CAM map explains (1 metastatic, 0 benign; gradcam.CLASS_NAMES)
    messages: list[str] = field(default_factory=list)  # notes on the case (e.g. how the label map was resampled)
    warnings: list[list[str]] = field(default_factory=list)  # per node (same order as nodes): reasons not to trust its probability
    image_probabilities: np.ndarray | None = None  # a fused model (fusion.py): the image branch's own probabilities; `probabilities` are the fused ones
    node_features: np.ndarray | None = None  # a fused model: (N, F) node_features.FEATURE_NAMES of each node, as the model got them
    _component_image: sitk.Image | None = field(default=None, init=False, repr=False)

    @property
    def component_image(self) -> sitk.Image:
        """Each node's node_id on the CT's whole voxel grid, built on first use: classifying and the
        output files need only `component_crop`, and a full-size image costs ~40 ms of fresh memory."""
        if self._component_image is None:
            self._component_image = components_on_grid(self.component_crop, self.grid)
        return self._component_image


class StageTimer:
    """Wall-clock seconds per named stage, measured inside the process (for `--timings`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


def patch_spec_from_card(card: dict) -> PatchSpec:
    """The card's patch geometry; a card without `fov_rule` (older models) means "fixed"."""
    preprocessing = card["preprocessing"]
    return PatchSpec(
        spacing_mm=tuple(float(s) for s in preprocessing["spacing_mm"]),
        size=int(preprocessing["patch_size"]),
        views=preprocessing["views"],
        mask_channel=bool(preprocessing["mask_channel"]),
        air_hu=float(preprocessing["air_hu"]),
        fov_rule=preprocessing.get("fov_rule", "fixed"),
        fov_margin=preprocessing.get("fov_margin", DEFAULT_FOV_MARGIN),
        stack_offset_mm=preprocessing.get("stack_offset_mm", DEFAULT_STACK_OFFSET_MM),  # triplanar_stack cards only
    )


def window_from_card(card: dict) -> tuple[float, float]:
    preprocessing = card["preprocessing"]
    return float(preprocessing["window_low"]), float(preprocessing["window_high"])


def classify_images(
    ct: sitk.Image,
    labels: sitk.Image,
    model: LoadedModel,
    with_gradcam: bool = True,
    per_label_value: bool = False,
    timer: StageTimer | None = None,
    progress: ProgressCallback | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    policy: InputPolicy = InputPolicy(),
    gradcam_target: str = "predicted",
) -> ClassificationResult:
    """Classify every node of `labels` (a label map on or around `ct`) with `model`.

    Grad-CAM explains each node's predicted class, or the class `gradcam_target` names (gradcam.CAM_TARGETS).

    The CT and label map are checked by `validate` (HU, geometry policy) under `policy`.
    """
    timer = timer or StageTimer()
    report = progress or (lambda fraction, message: None)

    def checkpoint(fraction: float, message: str) -> None:
        if is_cancelled is not None and is_cancelled():
            raise CancelledError("Classification cancelled.")
        report(fraction, message)

    checkpoint(0.0, "Checking the label volume")
    messages: list[str] = []
    with timer.stage("nodes"):
        check_ct(ct, policy=policy)
        labels_image, notes = labels_on_ct(ct, labels, policy=policy)
        messages.extend(notes)
        nodes, component_crop = extract_nodes_cropped(labels_image, per_label_value=per_label_value)

    checkpoint(0.2, f"Cropping {len(nodes)} node patches")
    with timer.stage("patches"):
        patches = extract_patches(ct, component_crop, nodes, patch_spec_from_card(model.card), window_from_card(model.card))
        batch = np.stack([patch.image for patch in patches]).astype(np.float32)
    grown = [patch.node.node_id for patch in patches if patch.fov_grown]
    if grown:
        messages.append(
            f"{len(grown)} node(s) larger than the model's field of view (node {', '.join(map(str, grown[:10]))}"
            f"{', ...' if len(grown) > 10 else ''}) were sampled "
            "at a coarser spacing so each fits whole in its patch (fov_rule grow_to_fit, as in training)."
        )

    warnings = node_warnings(model.card, nodes, patches)

    checkpoint(0.4, "Running the model")
    image_probabilities = node_features = None
    if uses_node_features(model.card):  # a fused model: the node's measured features, by the code that trained it
        with timer.stage("model"):  # its features are part of the model's input (classify's TIMING_STAGES unchanged)
            node_features = features_of_nodes(ct, components_on_grid(component_crop, ct), [patch.node for patch in patches])
            probabilities, image_probabilities = predict_fused(model, batch, node_features)
    else:
        with timer.stage("model"):
            probabilities = predict(model, batch)
    threshold = float(model.card["decision_threshold"])
    predictions = (probabilities >= threshold).astype(np.int64)

    cams = cam_volume = cam_classes = None
    if with_gradcam:
        checkpoint(0.7, "Computing Grad-CAM")
        with timer.stage("gradcam"):
            # The reported predictions themselves, so each map explains exactly the class shown.
            target = predictions if gradcam_target == "predicted" else gradcam_target
            cams, cam_classes = gradcam(model, batch, target=target, return_classes=True)
            cam_volume = label_cam_volume(cam_to_volume(cams, patches, ct), [node.node_id for node in nodes], cam_classes)

    checkpoint(1.0, "Done")
    return ClassificationResult(
        nodes=nodes,
        patches=patches,
        probabilities=probabilities,
        predictions=predictions,
        decision_threshold=threshold,
        component_crop=component_crop,
        grid=ct,
        cams=cams,
        cam_volume=cam_volume,
        cam_classes=cam_classes,
        messages=messages,
        warnings=warnings,
        image_probabilities=image_probabilities,
        node_features=node_features,
    )
