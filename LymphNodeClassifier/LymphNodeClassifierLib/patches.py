"""Per-node 2D patches sampled directly from the CT in physical space.

Each view is a `size x size` plane on a grid aligned with the patient axes (LPS), whatever the
CT's direction matrix, with the node centroid at the continuous pixel `((size-1)/2, (size-1)/2)`.
Only the plane itself is resampled (as a one-voxel-thick 3D grid), never the whole volume.

View orientation (radiological display, like Slicer's slice views):
- axial: rows anterior -> posterior (+y), columns patient right -> left (+x);
- coronal: rows superior -> inferior (-z), columns patient right -> left (+x);
- sagittal: rows superior -> inferior (-z), columns anterior -> posterior (+y).

2.5D (`views="triplanar_stack"`): the three centre views, then for each view the two parallel
planes at -d and +d mm along the view's normal (`stack_offset_mm`; axial +d superior (+z),
coronal +d posterior (+y), sagittal +d patient right (-x): the normal is column x row), each
resampled like the centre view. Channels `[axial, coronal, sagittal, axial-d, axial+d, coronal-d,
coronal+d, sagittal-d, sagittal+d]` (+ axial mask); `NodePatch.planes` and `NodePatch.mask` hold
the three centre views (what Grad-CAM maps back), `NodePatch.channel_planes` every image channel.

3D (`views="volume"`): one `size^3` block on a patient-aligned grid (LPS, identity direction) at
`spacing_mm`, centred on the centroid, indexed `[k, j, i]` = (+z inferior -> superior, +y anterior
-> posterior, +x right -> left), so `image[0][k]` is an axial slice in the axial view's orientation;
channels `[volume]` (+ `mask`, the node on the same grid). `NodePatch.planes` holds the block's
centre axial plane, `NodePatch.volume_origin_lps` voxel (0, 0, 0) and `mask` is `(1, size, size, size)`.

Field of view (`PatchSpec.fov_rule`, recorded in the model card as `preprocessing.fov_rule` and
`preprocessing.fov_margin`; cards without them mean "fixed"):
- "fixed": every node is sampled at `spacing_mm`; a node larger than `size x spacing` is cut off
  by the patch border.
- "grow_to_fit": for each node, its reach along each patient axis is the largest distance from
  the centroid to a corner of its voxel bounding box (voxel faces included) projected on that
  axis. If `reach * (1 + fov_margin)` exceeds the half field of view `size / 2 * spacing` on any
  axis, all three spacings of THAT node are multiplied by the same factor
  `max over axes of reach * (1 + fov_margin) / (size / 2 * spacing)`, so the whole node fits with
  the margin in the same number of pixels (aspect kept). Smaller nodes are sampled exactly as with
  "fixed". `NodePatch.spacing_mm`, `fov_scale` and `fov_grown` record what was used.
Outside the CT (crops that end at the node, e.g. a mask touching the first or last slice) the
patch is padded with `air_hu`, which windows to 0, and stays centred on the centroid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import physical_points_of_indices
from .nodes import NodeInfo, crop_start_index
from .windowing import apply_window

VIEW_MODES = ("triplanar", "axial", "triplanar_stack", "volume")
STACK_MODES = ("triplanar_stack",)  # 2.5D: each view plus its neighbours at +-stack_offset_mm
DEFAULT_STACK_OFFSET_MM = 2.0
FOV_RULES = ("fixed", "grow_to_fit")
DEFAULT_FOV_MARGIN = 0.2  # grow_to_fit: 20 % room beyond the node's reach
TRIPLANAR_VIEWS = ("axial", "coronal", "sagittal")

_X, _Y, _Z = np.eye(3)
# view name -> (column unit vector, row unit vector) in LPS; the plane normal is column x row
_VIEW_AXES: dict[str, tuple[np.ndarray, np.ndarray]] = {
    "axial": (_X, _Y),
    "coronal": (_X, -_Z),
    "sagittal": (_Y, -_Z),
}
_VIEW_NORMALS = {name: np.cross(col, row) for name, (col, row) in _VIEW_AXES.items()}  # right-handed grids


@dataclass(frozen=True)
class PatchSpec:
    """How patches are sampled: pixel spacing (x, y, z mm), size in pixels, views, mask channel,
    air value outside the CT and the field-of-view rule for large nodes (see the module docstring)."""

    spacing_mm: tuple[float, float, float] = (0.79, 0.79, 0.79)
    size: int = 64
    views: str = "triplanar"
    mask_channel: bool = False
    air_hu: float = -1024.0
    fov_rule: str = "fixed"
    fov_margin: float = DEFAULT_FOV_MARGIN
    stack_offset_mm: float = DEFAULT_STACK_OFFSET_MM  # triplanar_stack only: neighbour planes at +-this

    def __post_init__(self) -> None:
        spacing = self.spacing_mm
        if np.isscalar(spacing):
            spacing = (spacing,) * 3
        try:
            spacing = tuple(float(s) for s in spacing)
        except (TypeError, ValueError):
            raise InputError(f"The patch spacing {self.spacing_mm!r} is not a list of numbers; give three spacings in mm, e.g. 0.79 0.79 0.79.") from None
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise InputError(f"The patch spacing {self.spacing_mm!r} must be three positive numbers in mm; e.g. 0.79 0.79 0.79.")
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or not 4 <= self.size <= 1024:
            raise InputError(f"The patch size {self.size!r} must be a whole number of pixels from 4 to 1024; e.g. 64.")
        if self.views not in VIEW_MODES:
            raise InputError(f"Unknown patch views '{self.views}'; use one of: {', '.join(VIEW_MODES)}.")
        if not math.isfinite(float(self.air_hu)):
            raise InputError(f"The air value {self.air_hu!r} must be a finite HU value; e.g. -1024.")
        if self.fov_rule not in FOV_RULES:
            raise InputError(f"Unknown field-of-view rule {self.fov_rule!r}; use one of: {', '.join(FOV_RULES)}.")
        try:
            margin = float(self.fov_margin)
        except (TypeError, ValueError):
            margin = math.nan
        if isinstance(self.fov_margin, bool) or not (math.isfinite(margin) and 0.0 <= margin <= 10.0):
            raise InputError(f"The field-of-view margin {self.fov_margin!r} must be a fraction from 0 to 10; e.g. 0.2 for 20 %.")
        object.__setattr__(self, "fov_margin", margin)
        try:
            offset = float(self.stack_offset_mm)
        except (TypeError, ValueError):
            offset = math.nan
        if isinstance(self.stack_offset_mm, bool) or not (math.isfinite(offset) and 0.0 < offset <= 50.0):
            raise InputError(f"The slice-stack offset {self.stack_offset_mm!r} must be a distance in mm above 0 and at most 50; e.g. 2.")
        object.__setattr__(self, "stack_offset_mm", offset)
        object.__setattr__(self, "spacing_mm", spacing)
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "mask_channel", bool(self.mask_channel))
        object.__setattr__(self, "air_hu", float(self.air_hu))

    @property
    def view_names(self) -> tuple[str, ...]:
        """Names of the centre views (`NodePatch.planes`), in channel order."""
        return TRIPLANAR_VIEWS if self.views in ("triplanar", "triplanar_stack") else ("axial",)

    @property
    def image_channel_names(self) -> tuple[str, ...]:
        """Names of the image channels (mask excluded), in order: the views, then the stacks' neighbours."""
        if self.views == "volume":
            return ("volume",)
        return self.view_names + tuple(f"{name}{sign}d" for name in self.view_names for sign in "-+") * (self.views in STACK_MODES)

    @property
    def channel_names(self) -> tuple[str, ...]:
        """Every channel name, in order (the card's `preprocessing.channels`)."""
        return self.image_channel_names + (("mask",) if self.mask_channel else ())

    @property
    def channels(self) -> int:
        """Number of channels: the image channels, plus the mask when `mask_channel`."""
        return len(self.channel_names)

    @property
    def patch_shape(self) -> tuple[int, ...]:
        """Shape of one node's `image`: (C, size, size), or (C, size, size, size) for `volume`."""
        return (self.channels,) + (self.size,) * (3 if self.views == "volume" else 2)


@dataclass(frozen=True)
class PlaneGeometry:
    """Where a view lies: pixel (r, c) is at `origin_lps + r * row_step_lps + c * col_step_lps`."""

    origin_lps: tuple[float, float, float]
    row_step_lps: tuple[float, float, float]
    col_step_lps: tuple[float, float, float]
    name: str

    def pixel_to_lps(self, row: float | np.ndarray, col: float | np.ndarray) -> np.ndarray:
        """LPS points `(..., 3)` of (continuous) pixel positions."""
        row, col = np.asarray(row, dtype=float)[..., None], np.asarray(col, dtype=float)[..., None]
        return np.asarray(self.origin_lps) + row * np.asarray(self.row_step_lps) + col * np.asarray(self.col_step_lps)


@dataclass
class NodePatch:
    """One node's patch: windowed image channels, per-view node masks and the views' geometry."""

    node: NodeInfo
    image: np.ndarray  # float32 (C, size, size) in [0, 1]
    mask: np.ndarray  # uint8 (V, size, size), 1 on the node
    planes: list[PlaneGeometry]
    centre_lps: tuple[float, float, float]
    largest_axial_z_lps: float  # LPS z of the axial plane with the largest node cross-section
    largest_axial_area_mm2: float  # that cross-section's area inside the patch field of view
    spacing_mm: tuple[float, float, float] | None = None  # pixel spacing used for this node (x, y, z)
    fov_scale: float = 1.0  # spacing_mm / the spec's spacing (> 1 when grow_to_fit enlarged the view)
    fov_grown: bool = False  # True when the field of view was enlarged to hold the whole node
    channel_planes: list[PlaneGeometry] | None = None  # triplanar_stack: the plane of every image channel, in order
    volume_origin_lps: tuple[float, float, float] | None = None  # volume: LPS of voxel [0, 0, 0] (grid axes +x, +y, +z)


class _PlaneSampler:
    """Resamples a CT and a component image on small patient-aligned grids (filters reused)."""

    def __init__(self, ct: sitk.Image, component_image: sitk.Image, air_hu: float) -> None:
        self.ct = ct
        self.component_image = component_image
        self.ct_filter = sitk.ResampleImageFilter()
        self.ct_filter.SetInterpolator(sitk.sitkLinear)
        self.ct_filter.SetDefaultPixelValue(air_hu)  # outside the CT: air
        self.ct_filter.SetOutputPixelType(sitk.sitkFloat32)
        self.mask_filter = sitk.ResampleImageFilter()
        self.mask_filter.SetInterpolator(sitk.sitkNearestNeighbor)
        self.mask_filter.SetDefaultPixelValue(0)
        self.mask_filter.SetOutputPixelType(component_image.GetPixelID())
        for resample in (self.ct_filter, self.mask_filter):
            resample.SetNumberOfThreads(1)  # a few thousand pixels: thread start-up and barriers cost more

    @staticmethod
    def _set_grid(resample: sitk.ResampleImageFilter, origin, spacing, direction, size) -> None:
        resample.SetOutputOrigin(tuple(float(v) for v in origin))
        resample.SetOutputSpacing(tuple(float(v) for v in spacing))
        resample.SetOutputDirection(tuple(float(v) for v in np.asarray(direction).ravel()))
        resample.SetSize([int(v) for v in size])

    def ct_values(self, origin, spacing, direction, size) -> np.ndarray:
        """HU on the grid, `[k, j, i]` float32 (air outside the CT)."""
        self._set_grid(self.ct_filter, origin, spacing, direction, size)
        return sitk.GetArrayFromImage(self.ct_filter.Execute(self.ct))

    def node_mask(self, node_id: int, origin, spacing, direction, size) -> np.ndarray:
        """Nearest-neighbour node mask on the grid, `[k, j, i]` bool."""
        self._set_grid(self.mask_filter, origin, spacing, direction, size)
        resampled = self.mask_filter.Execute(self.component_image)  # must outlive the array view
        return sitk.GetArrayViewFromImage(resampled) == node_id


def _plane(name: str, centre_lps: np.ndarray, spec: PatchSpec) -> tuple[PlaneGeometry, np.ndarray, np.ndarray]:
    """Geometry of one view centred on `centre_lps`, plus its 3x3 direction and spacing as a 1-thick grid."""
    col_unit, row_unit = _VIEW_AXES[name]
    normal = _VIEW_NORMALS[name]
    spacing = np.asarray(spec.spacing_mm)
    col_step = col_unit * (np.abs(col_unit) @ spacing)
    row_step = row_unit * (np.abs(row_unit) @ spacing)
    half = (spec.size - 1) / 2.0
    origin = centre_lps - half * row_step - half * col_step
    geometry = PlaneGeometry(_point(origin), _point(row_step), _point(col_step), name)
    direction = np.column_stack([col_unit, row_unit, normal])  # grid i = column, j = row
    grid_spacing = np.array([np.abs(col_unit) @ spacing, np.abs(row_unit) @ spacing, np.abs(normal) @ spacing])
    return geometry, direction, grid_spacing


def _point(values: np.ndarray) -> tuple[float, float, float]:
    return (float(values[0]), float(values[1]), float(values[2]))


def node_corners_lps(node: NodeInfo, bbox_image: sitk.Image) -> np.ndarray:
    """LPS corners (8, 3) of the node's bounding box, voxel boundaries included."""
    i0, j0, k0, i1, j1, k1 = node.bbox_index
    corners = np.array([[i, j, k] for i in (i0 - 0.5, i1 + 0.5) for j in (j0 - 0.5, j1 + 0.5) for k in (k0 - 0.5, k1 + 0.5)])
    return physical_points_of_indices(bbox_image, corners)


def _footprint(plane: PlaneGeometry, corners_lps: np.ndarray, size: int) -> tuple[int, int, int, int] | None:
    """Rows r0..r1 and columns c0..c1 of the plane that can hold node pixels, or None.

    The node's bounding box projected on the plane, one pixel of margin; only these pixels are
    sampled for the mask (nothing else can be the node), which keeps mask resampling cheap.
    """
    row_step, col_step = np.asarray(plane.row_step_lps), np.asarray(plane.col_step_lps)
    relative = corners_lps - np.asarray(plane.origin_lps)
    rows, cols = relative @ row_step / (row_step @ row_step), relative @ col_step / (col_step @ col_step)
    r0, r1 = max(0, math.floor(rows.min()) - 1), min(size - 1, math.ceil(rows.max()) + 1)
    c0, c1 = max(0, math.floor(cols.min()) - 1), min(size - 1, math.ceil(cols.max()) + 1)
    return (r0, r1, c0, c1) if r0 <= r1 and c0 <= c1 else None


def _sample_mask(
    sampler: _PlaneSampler, node_id: int, plane: PlaneGeometry, direction: np.ndarray, grid_spacing: np.ndarray,
    footprint: tuple[int, int, int, int] | None, size: int, thickness: int = 1,
) -> np.ndarray:
    """Node mask `[slice, row, col]` of `thickness` planes stacked along the normal, sampled in the footprint."""
    masks = np.zeros((thickness, size, size), dtype=bool)
    if footprint is None:
        return masks
    r0, r1, c0, c1 = footprint
    origin = plane.pixel_to_lps(r0, c0)
    masks[:, r0 : r1 + 1, c0 : c1 + 1] = sampler.node_mask(
        node_id, origin, grid_spacing, direction, (c1 - c0 + 1, r1 - r0 + 1, thickness)
    )
    return masks


def _axial_cross_sections(
    sampler: _PlaneSampler, node: NodeInfo, centre_lps: np.ndarray, corners_lps: np.ndarray, spec: PatchSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Node masks on the axial planes z = centroid z + m * spacing_z that cross the node, and those m."""
    spacing_z = spec.spacing_mm[2]
    first = math.floor((corners_lps[:, 2].min() - centre_lps[2]) / spacing_z)
    last = max(math.ceil((corners_lps[:, 2].max() - centre_lps[2]) / spacing_z), first)
    plane, direction, grid_spacing = _plane("axial", centre_lps + np.array([0.0, 0.0, first * spacing_z]), spec)
    footprint = _footprint(plane, corners_lps, spec.size)
    masks = _sample_mask(sampler, node.node_id, plane, direction, grid_spacing, footprint, spec.size, last - first + 1)
    return masks, np.arange(first, last + 1)


def fov_scale(node: NodeInfo, bbox_image: sitk.Image, spec: PatchSpec) -> float:
    """Factor (>= 1) applied to `spec.spacing_mm` for `node` by the spec's field-of-view rule.

    1.0 for "fixed" and for nodes that fit; see the module docstring for "grow_to_fit".
    `bbox_image` is the image whose indices the node's `bbox_index` use.
    """
    if spec.fov_rule == "fixed":
        return 1.0
    return _grow_factor(np.asarray(node.centroid_lps, dtype=float), node_corners_lps(node, bbox_image), spec)


def _grow_factor(centre_lps: np.ndarray, corners_lps: np.ndarray, spec: PatchSpec) -> float:
    reach = np.abs(corners_lps - centre_lps).max(axis=0)  # mm along x, y, z from the centroid
    half_fov = spec.size / 2.0 * np.asarray(spec.spacing_mm)
    return max(1.0, float((reach * (1.0 + spec.fov_margin) / half_fov).max()))


def _check_window(window: tuple[float, float]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in window)
    except (TypeError, ValueError):
        raise InputError(f"The window {window!r} is not a (low, high) pair of HU values; e.g. (-135, 215).") from None
    if not low < high:
        raise InputError(f"The window low ({low:g}) must be below high ({high:g}); fix the window values.")
    return low, high


def _extract(
    sampler: _PlaneSampler, nodes: list[NodeInfo], spec: PatchSpec, window: tuple[float, float], bbox_image: sitk.Image
) -> list[NodePatch]:
    """Patches of all nodes; `bbox_image` is the image whose indices the nodes' `bbox_index` use."""
    low, high = _check_window(window)
    base_spec = spec
    patches = []
    for node in nodes:
        centre = np.asarray(node.centroid_lps, dtype=float)
        corners = node_corners_lps(node, bbox_image)
        scale = 1.0 if base_spec.fov_rule == "fixed" else _grow_factor(centre, corners, base_spec)
        spec = base_spec if scale == 1.0 else replace(base_spec, spacing_mm=tuple(s * scale for s in base_spec.spacing_mm))
        spacing_x, spacing_y, spacing_z = spec.spacing_mm
        axial_masks, steps = _axial_cross_sections(sampler, node, centre, corners, spec)
        areas = axial_masks.sum(axis=(1, 2))
        largest = int(np.lexsort((np.abs(steps), -areas))[0])  # most pixels, then closest to the centroid
        largest_z = float(centre[2] + steps[largest] * spacing_z)
        if spec.views == "volume":
            patches.append(_volume_patch(sampler, node, centre, spec, (low, high), scale, largest_z, float(areas[largest] * spacing_x * spacing_y)))
            continue
        images, masks, planes = [], [], []
        for name in spec.view_names:
            plane_centre = centre.copy()
            if spec.views == "axial":
                plane_centre[2] = largest_z  # the plane of the largest cross-section, centred in-plane
            plane, direction, grid_spacing = _plane(name, plane_centre, spec)
            hu = sampler.ct_values(plane.origin_lps, grid_spacing, direction, (spec.size, spec.size, 1))[0]
            images.append(apply_window(hu, low, high))
            if name == "axial":  # already sampled on the same pixel lattice
                masks.append(axial_masks[largest if spec.views == "axial" else int(np.flatnonzero(steps == 0)[0])])
            else:
                footprint = _footprint(plane, corners, spec.size)
                masks.append(_sample_mask(sampler, node.node_id, plane, direction, grid_spacing, footprint, spec.size)[0])
            planes.append(plane)
        channel_planes = None
        if spec.views in STACK_MODES:
            channel_planes = list(planes)
            for name in spec.view_names:
                for sign in (-1.0, 1.0):  # same lattice as the centre view, shifted along its normal
                    plane, direction, grid_spacing = _plane(name, centre + sign * spec.stack_offset_mm * _VIEW_NORMALS[name], spec)
                    hu = sampler.ct_values(plane.origin_lps, grid_spacing, direction, (spec.size, spec.size, 1))[0]
                    images.append(apply_window(hu, low, high))
                    channel_planes.append(replace(plane, name=f"{name}{'-+'[sign > 0]}d"))
        mask = np.stack(masks).astype(np.uint8)
        if spec.mask_channel:
            images.append(mask[0].astype(np.float32))
        patches.append(
            NodePatch(
                node=node,
                image=np.stack(images).astype(np.float32, copy=False),
                mask=mask,
                planes=planes,
                centre_lps=_point(centre),
                largest_axial_z_lps=largest_z,
                largest_axial_area_mm2=float(areas[largest] * spacing_x * spacing_y),
                spacing_mm=spec.spacing_mm,
                fov_scale=scale,
                fov_grown=scale > 1.0,
                channel_planes=channel_planes,
            )
        )
    return patches


def _volume_patch(
    sampler: _PlaneSampler, node: NodeInfo, centre: np.ndarray, spec: PatchSpec, window: tuple[float, float], scale: float,
    largest_z: float, largest_area_mm2: float,
) -> NodePatch:
    """A `size^3` block on a patient-aligned grid centred on `centre` (module docstring, 3D)."""
    spacing = np.asarray(spec.spacing_mm)
    origin = centre - (spec.size - 1) / 2.0 * spacing
    size = (spec.size,) * 3
    hu = sampler.ct_values(origin, spacing, np.eye(3), size)
    mask = sampler.node_mask(node.node_id, origin, spacing, np.eye(3), size)
    images = [apply_window(hu, *window)] + ([mask.astype(np.float32)] if spec.mask_channel else [])
    centre_plane, _, _ = _plane("axial", centre, spec)
    return NodePatch(
        node=node,
        image=np.stack(images).astype(np.float32, copy=False),
        mask=mask[None].astype(np.uint8),
        planes=[centre_plane],
        centre_lps=_point(centre),
        largest_axial_z_lps=largest_z,
        largest_axial_area_mm2=largest_area_mm2,
        spacing_mm=spec.spacing_mm,
        fov_scale=scale,
        fov_grown=scale > 1.0,
        volume_origin_lps=_point(origin),
    )


def _check_images(ct: sitk.Image, component_image: sitk.Image) -> None:
    if ct.GetDimension() != 3 or component_image.GetDimension() != 3:
        raise InputError("The CT and the node label volume must both be 3D volumes; load 3D images.")
    # the nodes' bbox_index are read as CT indices: the component image must be the CT grid or a slice of it
    try:
        crop_start_index(component_image, ct)
    except ValueError:
        raise InputError("The node label volume is not on the CT's voxel grid (nor a part of it); resample it onto the CT "
                         "(validate.labels_on_ct) before extracting patches.") from None


def extract_patches(
    ct: sitk.Image, component_image: sitk.Image, nodes: list[NodeInfo], spec: PatchSpec, window: tuple[float, float]
) -> list[NodePatch]:
    """Sample each node's views from the CT (linear, air outside) and its mask (nearest neighbour).

    `component_image` holds each node's `node_id` on the CT grid (`nodes.extract_nodes`) or on a
    sub-grid of it (`nodes.extract_nodes_cropped`: masks are resampled in physical space, and the
    nodes' `bbox_index` are CT-grid indices either way); the CT is windowed to [0, 1] with
    `window = (low_hu, high_hu)` after resampling.
    """
    _check_images(ct, component_image)
    return _extract(_PlaneSampler(ct, component_image, spec.air_hu), nodes, spec, window, bbox_image=ct)


def resample_whole_volume_then_crop(
    ct: sitk.Image, component_image: sitk.Image, nodes: list[NodeInfo], spec: PatchSpec, window: tuple[float, float]
) -> list[NodePatch]:
    """Slow baseline (the seed pipeline): resample the whole CT and component image to the patch
    spacing on a patient-aligned grid, then cut the same views out of those volumes.

    The views are cut at the same physical positions as `extract_patches` (linear interpolation of
    the resampled CT, nearest neighbour of the resampled mask), so both agree within interpolation
    error; only for benchmarks and equivalence tests.
    """
    _check_images(ct, component_image)
    size = np.array(ct.GetSize(), dtype=float)
    corners = np.array([[i, j, k] for i in (-0.5, size[0] - 0.5) for j in (-0.5, size[1] - 0.5) for k in (-0.5, size[2] - 0.5)])
    corners_lps = physical_points_of_indices(ct, corners)
    low, high = corners_lps.min(axis=0), corners_lps.max(axis=0)
    spacing = np.asarray(spec.spacing_mm)
    grid_size = [int(n) for n in np.ceil((high - low) / spacing)]
    reference = sitk.Image(grid_size, sitk.sitkUInt8)
    reference.SetSpacing(tuple(spacing))
    reference.SetOrigin(tuple(low + spacing / 2.0))
    whole_ct = sitk.Resample(ct, reference, sitk.Transform(), sitk.sitkLinear, spec.air_hu, sitk.sitkFloat32)
    whole_components = sitk.Resample(
        component_image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, component_image.GetPixelID()
    )
    sampler = _PlaneSampler(whole_ct, whole_components, spec.air_hu)
    return _extract(sampler, nodes, spec, window, bbox_image=component_image)

