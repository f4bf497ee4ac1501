"""Per-node report tiles rendered through real Slicer slice views, offscreen (no Qt).

trame-slicer's `SlicerApp` gives a headless Slicer application (MRML scene, application logic,
module logics) and real slice views driven by Slicer's slice logic and displayable managers, the
same code that draws the Red/Yellow/Green views in Slicer. One app and one axial slice view are
made lazily, once per process (creating them costs seconds), and reused for every call; each call
adds its volumes and segmentation to the app's scene and removes them again before returning.

What a tile shows (the axial slice through the node's centroid, centred on it):
- the CT in grey at the model's window (background layer);
- Grad-CAM in heat colours at `cam_opacity` (foreground layer; below `report.CAM_DISPLAY_THRESHOLD`
  transparent, as in the report's patch fallback);
- every node's outline (segmentation, 2D fill off), coloured by its probability
  (`segfile.probability_color`: green -> yellow -> red).

Geometry only goes through `convert.update_volume_node_from_sitk_image` (LPS -> RAS) and
`NodeInfo.centroid_ras`; the view is patient-axial whatever the CT's direction matrix, with
Slicer's radiological convention (patient right on the screen's left, anterior at the top).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from LymphNodeClassifierLib.geometry import continuous_indices_of_physical_points
from LymphNodeClassifierLib.nodes import NodeInfo
from LymphNodeClassifierLib.patches import node_corners_lps
from LymphNodeClassifierLib.report import CAM_DISPLAY_THRESHOLD
from LymphNodeClassifierLib.segfile import probability_color, segment_name

from .convert import update_volume_node_from_sitk_image

VIEW_NAME = "LymphNodeClassifierReport"
OUTLINE_THICKNESS_PX = 2
_NODE_NAME_PREFIX = "__LymphNodeClassifier report"
TILE_FIT_MARGIN = 1.3  # a node wider than the tile's field of view gets this much room around it


class SliceViewsUnavailable(RuntimeError):
    """Slicer slice views cannot be created in this process (no trame-slicer, no OpenGL); the message says why."""


@dataclass(frozen=True)
class RendererInfo:
    startup_seconds: float
    opengl: str


class _SliceViewRenderer:
    """One headless SlicerApp with one offscreen axial slice view, reused for every tile."""

    def __init__(self) -> None:
        start = time.perf_counter()
        try:
            from trame_slicer.core import SlicerApp
            from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition
        except ImportError as error:
            raise SliceViewsUnavailable(f"trame-slicer is not installed ({error}); pip install trame-slicer") from error
        require_offscreen_opengl()
        # trame-slicer observes the interactor's WindowResizeEvent, which VTK 9.6 warns about once per
        # view; keep that deprecation notice out of the command line's output.
        warnings_shown = vtk.vtkObject.GetGlobalWarningDisplay()
        vtk.vtkObject.GlobalWarningDisplayOff()
        try:
            self.app = SlicerApp()
            self.app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
            self.view = self.app.view_manager.create_view(ViewLayoutDefinition.axial_view(VIEW_NAME))
        except Exception as error:  # VTK / MRML failures surface as assorted exceptions
            raise SliceViewsUnavailable(f"could not create a Slicer slice view ({type(error).__name__}: {error})") from error
        finally:
            vtk.vtkObject.SetGlobalWarningDisplay(warnings_shown)
        if self.view is None:
            raise SliceViewsUnavailable("trame-slicer created no slice view")
        # Renders only when a tile is grabbed: trame-slicer's direct rendering would redraw on every
        # MRML change, and a view without volumes cannot draw (its slice logic has nothing to blend).
        self.view.set_render_blocked(True)
        window = self.view.render_window()
        window.SetMultiSamples(0)  # exact colours: outlines are compared with the segment colours
        window.SetOffScreenRendering(1)
        self.slice_node = self.view.get_view_node()
        self.slice_node.SetOrientationMarkerType(slicer.vtkMRMLAbstractViewNode.OrientationMarkerTypeNone)
        self.slice_node.SetRulerType(slicer.vtkMRMLAbstractViewNode.RulerTypeThin)
        self.slice_node.SetRulerColor(slicer.vtkMRMLAbstractViewNode.RulerColorWhite)
        self.view.set_background_color([0, 0, 0])
        self.size = (0, 0)
        self.info = RendererInfo(time.perf_counter() - start, _opengl_description(window))

    @property
    def scene(self):
        return self.app.scene

    def set_size(self, size_px: int) -> None:
        if self.size != (size_px, size_px):
            self.view.render_window().SetSize(size_px, size_px)
            self.view.update_size(size_px, size_px)
            # the slice node follows the window through the interactor's resize event; set it anyway
            self.slice_node.SetDimensions(size_px, size_px, 1)
            self.size = (size_px, size_px)

    def grab(self) -> np.ndarray:
        window = self.view.render_window()
        window.Render()
        grabber = vtk.vtkWindowToImageFilter()
        grabber.SetInput(window)
        grabber.SetInputBufferTypeToRGB()
        grabber.ReadFrontBufferOff()
        grabber.ShouldRerenderOff()
        grabber.Update()
        image = grabber.GetOutput()
        width, height, _ = image.GetDimensions()
        pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[:, :, :3]
        return np.ascontiguousarray(pixels[::-1])  # VTK rows start at the bottom


def require_offscreen_opengl() -> None:
    """Raise SliceViewsUnavailable unless VTK can open an offscreen OpenGL context in this process.

    Probed on a bare window first: creating Slicer views would otherwise fail deep inside VTK. Without
    an X server, VTK is sent straight to EGL instead of failing on X first (and warning about it).
    """
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    probe = vtk.vtkRenderWindow()
    probe.SetOffScreenRendering(1)
    probe.ShowWindowOff()
    if not probe.SupportsOpenGL():
        raise SliceViewsUnavailable(
            "no usable OpenGL for offscreen rendering (VTK could not create an EGL, OSMesa or X context)"
        )
    probe.Finalize()


def _opengl_description(window) -> str:
    """Window class and the GL / EGL renderer or vendor line of VTK's capability report."""
    lines = (window.ReportCapabilities() or "").splitlines()
    wanted = [line.strip() for line in lines if "renderer string" in line or "vendor string" in line]
    return "; ".join([type(window).__name__, *wanted[:2]])


_renderer: _SliceViewRenderer | None = None
_renderer_error: str | None = None
_lock = threading.Lock()


def _get_renderer() -> _SliceViewRenderer:
    """The process's renderer, made on first use; a failure is remembered (and raised again) so it costs once."""
    global _renderer, _renderer_error
    if _renderer is None:
        if _renderer_error is not None:
            raise SliceViewsUnavailable(_renderer_error)
        try:
            _renderer = _SliceViewRenderer()
        except SliceViewsUnavailable as error:
            _renderer_error = str(error)
            raise
    return _renderer


def renderer_info() -> RendererInfo:
    """Start-up time and OpenGL description of the process's renderer (starting it if needed)."""
    with _lock:
        return _get_renderer().info


def render_node_tiles(
    ct_image: sitk.Image,
    component_image: sitk.Image,
    nodes: Sequence[NodeInfo],
    probabilities: Sequence[float],
    cam_volume: sitk.Image | None,
    window: tuple[float, float],
    size_px: int = 320,
    field_of_view_mm: float = 60.0,
    cam_opacity: float = 0.4,
) -> list[np.ndarray]:
    """One RGB uint8 `(size_px, size_px, 3)` tile per node: the axial slice through its centroid.

    Each tile shows `field_of_view_mm`, or more for a node that would not fit: its axial extent
    times `TILE_FIT_MARGIN` (`tile_field_of_view_mm`), so a large lesion is seen whole.

    `component_image` holds each node's `node_id` (from `nodes.extract_nodes`); `probabilities[n]`
    colours node `nodes[n]`; `cam_volume` (Grad-CAM in [0, 1], any grid) may be None; `window` is
    the model card's (low, high) HU. The first call in a process starts the offscreen Slicer app
    (about 1.5 s), later calls reuse it (about 30 ms per 320 px tile). Raises
    `SliceViewsUnavailable` if slice views cannot be made here (no trame-slicer, no OpenGL).
    """
    if len(probabilities) != len(nodes):
        raise ValueError(f"got {len(probabilities)} probabilities for {len(nodes)} nodes")
    low, high = (float(v) for v in window)
    if not low < high:
        raise ValueError(f"window low {low:g} must be below high {high:g}")
    if not nodes:
        return []
    size_px = int(size_px)
    with _lock:
        renderer = _get_renderer()
        scene = renderer.scene
        before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
        view = renderer.view
        try:
            renderer.set_size(size_px)
            fields_of_view = [tile_field_of_view_mm(node, component_image, field_of_view_mm) for node in nodes]
            radius_mm = max(fields_of_view) / 2.0 * math.sqrt(2.0) + 2.0  # the widest view's corners, plus a margin
            centroids = np.array([node.centroid_lps for node in nodes], dtype=float)
            ct_crop = _crop_around(ct_image, centroids, radius_mm)
            components_crop = _crop_around(component_image, centroids, radius_mm)
            ct_node = _add_ct(scene, ct_crop, low, high)
            _add_segmentation(scene, renderer.app.segmentations_logic, ct_node, components_crop, nodes, probabilities)
            cam_node = _add_cam(scene, cam_volume) if cam_volume is not None else None
            view.set_background_volume_id(ct_node.GetID())
            view.set_foreground_volume_id(cam_node.GetID() if cam_node is not None else None)
            view.set_foreground_opacity(float(cam_opacity) if cam_node is not None else 0.0)
            slice_node = renderer.slice_node
            slice_node.SetOrientation("Axial")  # patient axial, even on a tilted CT
            tiles = []
            for node, node_field_of_view in zip(nodes, fields_of_view):
                r, a, s = node.centroid_ras
                slice_node.JumpSliceByCentering(r, a, s)
                thickness = slice_node.GetFieldOfView()[2]
                slice_node.SetFieldOfView(node_field_of_view, node_field_of_view, thickness)
                tiles.append(renderer.grab())
        finally:
            view.set_background_volume_id(None)
            view.set_foreground_volume_id(None)
            _remove_nodes_added_since(scene, before)
    return tiles


def tile_field_of_view_mm(node: NodeInfo, image: sitk.Image, minimum_mm: float) -> float:
    """`minimum_mm`, or what a view centred on the node's centroid needs to hold the node with
    TILE_FIT_MARGIN room, if larger: 2 x margin x the farthest bounding-box corner from the
    centroid along patient x or y (voxel faces, LPS; so it holds on a tilted CT and for a node whose
    centroid is off its box's centre).
    """
    offsets = node_corners_lps(node, image) - np.asarray(node.centroid_lps, dtype=float)
    reach = float(np.abs(offsets[:, :2]).max())
    return max(float(minimum_mm), 2.0 * TILE_FIT_MARGIN * reach)


# -- scene content -------------------------------------------------------------------------------


def _crop_around(image: sitk.Image, points_lps: np.ndarray, radius_mm: float) -> sitk.Image:
    """The image's voxel sub-grid holding every ball of `radius_mm` around `points_lps` (same voxels, same geometry)."""
    size = np.array(image.GetSize())
    centres = continuous_indices_of_physical_points(image, points_lps)  # (n, 3) in (i, j, k)
    pad = radius_mm / np.array(image.GetSpacing()) + 1.0  # orthonormal directions: a ball spans r / spacing per index
    lower = np.floor((centres - pad).min(axis=0)).astype(int)
    upper = np.ceil((centres + pad).max(axis=0)).astype(int)
    lower = np.clip(lower, 0, size - 1)
    upper = np.clip(upper, lower, size - 1)
    if np.all(lower == 0) and np.all(upper == size - 1):
        return image
    return sitk.RegionOfInterest(image, [int(v) for v in upper - lower + 1], [int(v) for v in lower])


def _add_ct(scene, ct: sitk.Image, low: float, high: float):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{_NODE_NAME_PREFIX} CT")
    update_volume_node_from_sitk_image(node, ct)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(low, high)
    display.InterpolateOn()
    return node


def _add_segmentation(scene, segmentations_logic, ct_node, components: sitk.Image, nodes: Sequence[NodeInfo], probabilities: Sequence[float]):
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{_NODE_NAME_PREFIX} nodes")
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{_NODE_NAME_PREFIX} components")
    try:
        update_volume_node_from_sitk_image(labelmap, components)
        if not segmentations_logic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node):
            raise RuntimeError("Slicer could not import the node label map into the report's segmentation")
    finally:
        scene.RemoveNode(labelmap)
    by_id = {node.node_id: (node, float(p)) for node, p in zip(nodes, probabilities)}
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        node, probability = by_id.get(int(segment.GetLabelValue()), (None, 0.0))
        if node is not None:
            segment.SetName(segment_name(node, probability))
        segment.SetColor(*probability_color(probability))
    segmentation_node.CreateDefaultDisplayNodes()
    display = segmentation_node.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility2DFill(False)
    display.SetVisibility2DOutline(True)
    display.SetOpacity2DOutline(1.0)
    display.SetSliceIntersectionThickness(OUTLINE_THICKNESS_PX)
    return segmentation_node


def _add_cam(scene, cam_volume: sitk.Image):
    from .logic import heat_color_node  # lazily: logic imports the model code (torch)

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{_NODE_NAME_PREFIX} Grad-CAM")
    update_volume_node_from_sitk_image(node, sitk.Cast(cam_volume, sitk.sitkFloat32))
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(heat_color_node(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.AutoThresholdOff()
    display.SetLowerThreshold(CAM_DISPLAY_THRESHOLD)
    display.SetUpperThreshold(1.0e6)
    display.ApplyThresholdOn()
    display.InterpolateOn()
    return node


def _remove_nodes_added_since(scene, before: set[str]) -> None:
    added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    added = [node for node in added if node.GetID() not in before and not node.GetSingletonTag()]
    # data nodes first: removing them also removes their display and storage nodes
    added.sort(key=lambda node: node.IsA("vtkMRMLDisplayNode") or node.IsA("vtkMRMLStorageNode"))
    for node in added:
        if node.GetScene() is scene:
            scene.RemoveNode(node)
