"""Grad-CAM on the TorchScript model, and the CAM mapped back into the CT's physical space.

``gradcam`` explains, per node, the class the model **predicted** (default) or the class asked for
(``target="metastatic"`` / ``"benign"``, or one class per node). The model has one output, the
metastatic logit ``y`` (positive = metastatic), so the two class scores are ``y`` (metastatic) and
``-y`` (benign: the logit of "benign" against "metastatic"). It runs on the model's exported
``features`` / ``head`` TorchScript methods, so no hooks are needed:

    A = features(x)              (N, K, h, w)   last conv layer's activations, detached, requires grad
    y = head(A)                  (N,)           metastatic logits
    s = y or -y                                 the explained class's score, per node
    w_k = mean_{h,w} ds/dA_k                    channel weights (for -y: minus those of y)
    cam = relu(sum_k w_k A_k)                   (N, h, w)
    cam = bilinear upsample to (H, W) (align_corners=False), divided by its per-node maximum

so each node's map lies in [0, 1] with 1 at its strongest evidence *for the explained class*. The
benign map is therefore the negative part of the metastatic class's weighted sum (where activations
pull the node away from "metastatic"), not the metastatic map inverted: the ReLU comes after the
sign. A map with no positive evidence for its class stays all zero. With a head linear in the
pooled features (small_resnet) the map's mean before the ReLU is (s - (+/-) bias) / (h w), so a
node whose predicted class won by more than the bias always gets a non-empty map.

Ensembles (``model.Ensemble``, k members in one file) need nothing here: their ``features`` are the
members' maps stacked along the channels and their ``head`` the mean of the members' heads, so the
map above is Grad-CAM of the ensemble's own logit, ReLU of the mean of the members' weighted sums
(of k identical members: the member's map). Test-time augmentation (a card's ``preprocessing.tta``)
is not applied here: the map explains the untransformed patch, and ``return_logits`` gives its
plain logits, while ``inference.predict`` reports the mean over the TTA copies. The pipeline passes
its reported classes as ``target``, so a map always explains the class shown for its node.

``cam_to_volume`` turns the per-node 2D maps into one float32 SimpleITK image on the CT's voxel grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from scipy.ndimage import map_coordinates
from torch import nn

from .errors import InputError
from .inference import _check_batch_size, check_patches
from .model import LoadedModel, interpreted_execution

VIEW_ORDER = ("axial", "coronal", "sagittal")


# --------------------------------------------------------------------------------------------
# Grad-CAM
# --------------------------------------------------------------------------------------------


def _unpack_model(model: Any) -> tuple[Any, torch.device, dict | None]:
    if isinstance(model, LoadedModel):
        return model.module, model.device, model.card
    if isinstance(model, (nn.Module, torch.jit.ScriptModule)) and hasattr(model, "features") and hasattr(model, "head"):
        parameter = next(iter(model.parameters()), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        return model, device, None
    raise TypeError("gradcam needs a LoadedModel or a module with 'features' and 'head' methods")


CAM_TARGETS = ("predicted", "metastatic", "benign")
CLASS_NAMES = {0: "benign", 1: "metastatic"}


def gradcam(
    model: LoadedModel | nn.Module,
    patches: np.ndarray,
    batch_size: int = 32,
    return_logits: bool = False,
    target: str | Sequence[int] | np.ndarray = "predicted",
    threshold: float | None = None,
    return_classes: bool = False,
):
    """Grad-CAM maps ``(N, H, W)`` float32 in [0, 1], each explaining one class of its node.

    ``target``: ``"predicted"`` (each node's predicted class: metastatic when its probability is at
    least ``threshold``, by default the card's ``decision_threshold``, 0.5 for a bare module),
    ``"metastatic"``, ``"benign"``, or one class per node (1 = metastatic, 0 = benign; pass the
    pipeline's predictions so the maps explain exactly the classes it reports).
    ``model`` is a LoadedModel (patches are checked against its card) or a (scripted or eager)
    module with ``features`` and ``head``; it is evaluated in eval mode. Returns ``cams``, then
    ``logits`` (with ``return_logits``), then the explained class per node (int64, with
    ``return_classes``).
    """
    module, device, card = _unpack_model(model)
    batch_size = _check_batch_size(batch_size)
    patches = check_patches(patches, card)
    n, _, height, width = patches.shape
    fixed_classes = _target_classes(target, n)
    threshold_logit = _threshold_logit(threshold, card) if fixed_classes is None else 0.0
    cams = np.zeros((n, height, width), dtype=np.float32)
    logits_out = np.zeros((n,), dtype=np.float32)
    classes = np.zeros((n,), dtype=np.int64)
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad(), interpreted_execution():
            for start in range(0, n, batch_size):
                x = torch.from_numpy(patches[start:start + batch_size]).to(device)
                stop = start + x.shape[0]
                batch_classes = None if fixed_classes is None else torch.from_numpy(fixed_classes[start:stop]).to(device)
                cam, logits, explained = _gradcam_batch(module, x, (height, width), batch_classes, threshold_logit)
                cams[start:stop] = cam.cpu().numpy()
                logits_out[start:stop] = logits.cpu().numpy()
                classes[start:stop] = explained.cpu().numpy()
    finally:
        if was_training:
            module.train()
    out = (cams,) + ((logits_out,) if return_logits else ()) + ((classes,) if return_classes else ())
    return out[0] if len(out) == 1 else out


def _target_classes(target: Any, n: int) -> np.ndarray | None:
    """Fixed per-node classes (1 metastatic, 0 benign) for ``target``, or None for "predicted"."""
    if isinstance(target, str):
        key = target.strip().lower()
        if key not in CAM_TARGETS:
            raise InputError(f"Unknown Grad-CAM class '{target}'; choose one of {', '.join(CAM_TARGETS)}.")
        return None if key == "predicted" else np.full(n, 1 if key == "metastatic" else 0, dtype=np.int64)
    classes = np.asarray(target).reshape(-1)
    if classes.shape != (n,) or not np.isin(classes, (0, 1)).all():
        raise InputError(f"Grad-CAM needs one class per node (1 = metastatic, 0 = benign) for {n} nodes, got {classes.tolist()[:10]}; pass the predictions.")
    return classes.astype(np.int64)


def _threshold_logit(threshold: float | None, card: dict | None) -> float:
    """The decision threshold on the probability, as a logit (the predicted class is logit >= it)."""
    if threshold is None:
        threshold = float(card["decision_threshold"]) if card is not None else 0.5
    if not 0.0 <= threshold <= 1.0:
        raise InputError(f"The decision threshold must lie in [0, 1], got {threshold}; use the model card's.")
    if threshold <= 0.0:
        return -math.inf
    if threshold >= 1.0:
        return math.inf
    return math.log(threshold / (1.0 - threshold))


def _gradcam_batch(
    module: Any, x: torch.Tensor, out_size: tuple[int, int], classes: torch.Tensor | None, threshold_logit: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fmap = module.features(x).detach().requires_grad_(True)
    logits = module.head(fmap).reshape(-1)
    if logits.shape[0] != x.shape[0]:
        raise RuntimeError(f"the model's head returned {logits.shape[0]} logits for {x.shape[0]} patches; expected one per node")
    if classes is None:
        classes = (logits.detach() >= threshold_logit).to(torch.int64)
    sign = (2 * classes - 1).to(logits.dtype)  # +1: metastatic score y, -1: benign score -y
    # Each logit depends only on its own node's feature map (eval mode), so the gradient of the
    # sum gives every node's own gradient in one backward pass.
    (grads,) = torch.autograd.grad((sign * logits).sum(), fmap)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * fmap).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=out_size, mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax(dim=(1, 2), keepdim=True)
    cam = torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))
    return cam.detach().float().clamp_(0.0, 1.0), logits.detach().float(), classes


# --------------------------------------------------------------------------------------------
# CAM back into CT space
# --------------------------------------------------------------------------------------------


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj[name]
    return getattr(obj, name)


def _vector(obj: Any, name: str) -> np.ndarray:
    value = np.asarray(_field(obj, name), dtype=np.float64).reshape(-1)
    if value.shape != (3,) or not np.isfinite(value).all():
        raise ValueError(f"plane field {name} must be a finite 3-vector, got {value}")
    return value


def _planes_of(patch: Any) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """[(view, origin, row_step, col_step)] of a NodePatch in channel order."""
    planes = _field(patch, "planes")
    names: list = []
    if isinstance(planes, Mapping):
        names = [v for v in VIEW_ORDER if v in planes]
        items = [(v, planes[v]) for v in names]
    elif isinstance(planes, Sequence):
        named = [getattr(p, "name", None) for p in planes]
        if all(isinstance(n, str) for n in named) and named:
            names = named  # patches.PlaneGeometry carries its view name
        else:
            names = list(VIEW_ORDER) if len(planes) == 3 else ["axial"] if len(planes) == 1 else []
        items = list(zip(names, planes))
    else:
        names = []
    if list(names) not in (list(VIEW_ORDER), ["axial"]):
        raise ValueError(f"a NodePatch must have planes for [axial, coronal, sagittal] or [axial], got {list(names)}")
    return [(v, _vector(p, "origin_lps"), _vector(p, "row_step_lps"), _vector(p, "col_step_lps")) for v, p in items]


def _bilinear(cam: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sample a 2D map at continuous pixel coordinates (pixel centres at integers, edges clamped)."""
    h, w = cam.shape
    coordinates = np.stack([np.clip(rows, 0.0, h - 1.0), np.clip(cols, 0.0, w - 1.0)])
    return map_coordinates(np.asarray(cam, dtype=np.float64), coordinates, order=1, mode="nearest", prefilter=False)


class _CtGrid:
    def __init__(self, ct: sitk.Image):
        self.size = np.array(ct.GetSize(), dtype=np.int64)
        self.origin = np.array(ct.GetOrigin(), dtype=np.float64)
        direction = np.array(ct.GetDirection(), dtype=np.float64).reshape(3, 3)
        self.matrix = direction @ np.diag(np.array(ct.GetSpacing(), dtype=np.float64))
        self.inverse = np.linalg.inv(self.matrix)

    def to_index(self, points: np.ndarray) -> np.ndarray:
        return (points - self.origin) @ self.inverse.T

    def to_physical(self, ijk: np.ndarray) -> np.ndarray:
        return ijk @ self.matrix.T + self.origin


def _node_cam_region(cam: np.ndarray, patch: Any, grid: _CtGrid) -> tuple[np.ndarray, np.ndarray] | None:
    """(lower ijk, values[k, j, i]) of one node's 3D CAM on the CT grid, or None outside the CT."""
    planes = _planes_of(patch)
    height, width = cam.shape
    lo_r, hi_r, lo_c, hi_c = -0.5, height - 0.5, -0.5, width - 0.5
    solvers = []
    corners = []
    for _, origin, row, col in planes:
        basis = np.stack([row, col], axis=1)  # (3, 2)
        solvers.append((origin, np.linalg.pinv(basis)))
        for r in (lo_r, hi_r):
            for c in (lo_c, hi_c):
                corners.append(origin + r * row + c * col)
    corners = np.array(corners)

    extrusion = None
    if len(planes) == 1:
        _, origin, row, col = planes[0]
        normal = np.cross(row, col)
        normal /= np.linalg.norm(normal)
        z_lo, z_hi = _node_extent_along(patch, grid, origin, normal, row, col, height)
        extrusion = (origin, normal, z_lo, z_hi)
        corners = np.concatenate([corners + normal * z_lo, corners + normal * z_hi])

    ijk = grid.to_index(corners)
    lower = np.maximum(np.floor(ijk.min(axis=0) - 1e-6).astype(np.int64), 0)
    upper = np.minimum(np.ceil(ijk.max(axis=0) + 1e-6).astype(np.int64), grid.size - 1)
    if np.any(upper < lower):
        return None

    axes = [np.arange(lower[a], upper[a] + 1, dtype=np.float64) for a in range(3)]
    shape = (axes[2].size, axes[1].size, axes[0].size)
    inside = np.ones(shape, dtype=bool)
    coordinates = []
    for origin, solve in solvers:
        matrix = solve @ grid.matrix  # (row, col) per unit step of (i, j, k)
        # A CT axis along the view's normal (every axial CT, for the axial view) does not move (row,
        # col): compute them on the other two axes only and broadcast, ~50x fewer CAM samples.
        flat = [a for a in range(3) if np.abs(matrix[:, a]).max() <= 1e-9 * np.abs(matrix).max()]
        plane_axes = [axes[a][:1] if a in flat[:1] else axes[a] for a in range(3)]
        rc = _affine_on_grid(matrix, solve @ (grid.origin - origin), plane_axes)
        inside &= (rc[0] >= lo_r) & (rc[0] <= hi_r) & (rc[1] >= lo_c) & (rc[1] <= hi_c)
        coordinates.append(rc)
    if extrusion is None and all(rc.shape[1:] != shape for rc in coordinates):
        # Every view is flat along a CT axis (an axial CT): multiply the three small planes by
        # broadcasting instead of gathering each voxel inside the cube, ~3x faster. Same float64
        # products in the same view order as below, so the same values.
        product = None
        for rc in coordinates:
            plane = _bilinear(cam, rc[0].ravel(), rc[1].ravel()).reshape(rc.shape[1:])
            product = plane if product is None else product * plane
        return lower, np.where(inside, np.cbrt(np.broadcast_to(product, shape)), 0.0).astype(np.float32)
    inside = inside.ravel()
    if extrusion is not None:
        origin, normal, z_lo, z_hi = extrusion
        z = _affine_on_grid((normal @ grid.matrix)[None, :], np.array([normal @ (grid.origin - origin)]), axes)[0].ravel()
        inside &= (z >= z_lo) & (z <= z_hi)
    keep = np.flatnonzero(inside)  # sample the CAM only inside the patch's cube / extrusion
    sampled = np.ones(keep.size, dtype=np.float64)
    for rc in coordinates:
        if rc.shape[1:] == shape:
            sampled *= _bilinear(cam, rc[0].ravel()[keep], rc[1].ravel()[keep])
        else:  # reduced grid: sample it whole, then spread along the flat axis
            plane = _bilinear(cam, rc[0].ravel(), rc[1].ravel()).reshape(rc.shape[1:])
            sampled *= np.broadcast_to(plane, shape).ravel()[keep]
    if extrusion is None:
        sampled = np.cbrt(sampled)  # geometric mean of the three views
    value = np.zeros(inside.size, dtype=np.float32)
    value[keep] = sampled
    return lower, value.reshape(shape)


def _affine_on_grid(matrix: np.ndarray, offset: np.ndarray, axes: Sequence[np.ndarray]) -> np.ndarray:
    """`matrix @ (i, j, k) + offset` for every voxel of the grid spanned by `axes` (i, j, k ranges).

    Returns (m, K, J, I) (size 1 along an axis given as a single value). Built by broadcasting the three 1-D index ranges: no (N, 3) point array and
    no BLAS call, which on small matrices was the slowest part of mapping CAMs back to the CT.
    """
    i, j, k = axes
    return (
        offset[:, None, None, None]
        + matrix[:, 0, None, None, None] * i[None, None, None, :]
        + matrix[:, 1, None, None, None] * j[None, None, :, None]
        + matrix[:, 2, None, None, None] * k[None, :, None, None]
    )


def _node_extent_along(patch: Any, grid: _CtGrid, origin: np.ndarray, normal: np.ndarray, row: np.ndarray, col: np.ndarray, size: int) -> tuple[float, float]:
    """Range of (p - origin) . normal covered by the node's bounding box (half-voxel margins)."""
    node = getattr(patch, "node", None)
    bbox = getattr(node, "bbox_index", None) if node is not None else None
    if bbox is None:
        half = 0.5 * size * float(np.linalg.norm(row))
        return -half, half
    i0, j0, k0, i1, j1, k1 = (float(v) for v in bbox)
    corners = np.array([[i, j, k] for i in (i0 - 0.5, i1 + 0.5) for j in (j0 - 0.5, j1 + 0.5) for k in (k0 - 0.5, k1 + 0.5)])
    z = (grid.to_physical(corners) - origin) @ normal
    return float(z.min()), float(z.max())


def cam_to_volume(cams: np.ndarray, node_patches: Sequence[Any], ct_image: sitk.Image) -> sitk.Image:
    """Map each node's CAM into the CT's space: one float32 image in [0, 1] on the CT's voxel grid.

    The result has the CT's spacing and direction and an origin on a CT voxel (it is the sub-grid of
    the CT that bounds all nodes' patches); voxels away from every node are 0; where nodes overlap
    the maximum is kept.

    - Tri-planar patches: the value at a physical point p inside the node's patch cube is the
      geometric mean of the three 2D CAM values read (bilinearly) at p's in-plane (row, column)
      coordinates of the axial, coronal and sagittal planes, so it is high only where all three
      views agree.
    - Axial patches: the axial CAM read at p's in-plane coordinates, extruded along the plane normal
      (S-I) over the node's bounding-box extent.

    ``node_patches[n]`` follows the ``patches.NodePatch`` contract: ``planes`` (by view name, or a
    list in channel order) with ``origin_lps``, ``row_step_lps``, ``col_step_lps``, and ``node``
    (``NodeInfo`` with ``bbox_index``, used for the axial extrusion).
    """
    if not isinstance(ct_image, sitk.Image) or ct_image.GetDimension() != 3:
        raise InputError("The CT must be a 3D image; load a CT volume, not a 2D slice.")
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3:
        raise InputError(f"CAMs must have shape (N, size, size), got {cams.shape}; pass the output of gradcam().")
    if cams.shape[0] != len(node_patches):
        raise InputError(f"Got {cams.shape[0]} CAMs for {len(node_patches)} node patches; compute one CAM per patch.")
    cams = np.nan_to_num(np.clip(cams, 0.0, 1.0), nan=0.0)
    grid = _CtGrid(ct_image)

    regions = []
    for cam, patch in zip(cams, node_patches):
        image = getattr(patch, "image", None)
        if image is not None and tuple(np.shape(image)[-2:]) != cam.shape:
            raise InputError(f"A CAM of {cam.shape[0]}x{cam.shape[1]} pixels does not match its {np.shape(image)[-2]}x{np.shape(image)[-1]} patch; compute the CAMs from these patches.")
        region = _node_cam_region(cam, patch, grid)
        if region is not None:
            regions.append(region)

    if not regions:
        lower = np.zeros(3, dtype=np.int64)
        volume = np.zeros((1, 1, 1), dtype=np.float32)
    else:
        lower = np.min([r[0] for r in regions], axis=0)
        upper = np.max([r[0] + np.array(r[1].shape[::-1]) for r in regions], axis=0)  # exclusive
        extent = upper - lower
        volume = np.zeros((extent[2], extent[1], extent[0]), dtype=np.float32)
        for start, values in regions:
            o = start - lower
            k, j, i = values.shape
            target = volume[o[2]:o[2] + k, o[1]:o[1] + j, o[0]:o[0] + i]
            np.maximum(target, values, out=target)

    out = sitk.GetImageFromArray(volume)
    out.SetSpacing(ct_image.GetSpacing())
    out.SetDirection(ct_image.GetDirection())
    out.SetOrigin(ct_image.TransformIndexToPhysicalPoint([int(v) for v in lower]))
    return out


CAM_METADATA_KEY = "LymphNodeClassifier_GradCamClasses"


def label_cam_volume(cam_volume: sitk.Image, node_ids: Sequence[int], cam_classes: Sequence[int]) -> sitk.Image:
    """Record in `cam_volume`'s metadata (a NRRD header field once written) which class each node's
    map explains: ``"1:benign 2:metastatic ..."`` (node id: class). Returns the same image."""
    if len(node_ids) != len(cam_classes):
        raise ValueError(f"got {len(cam_classes)} Grad-CAM classes for {len(node_ids)} nodes")
    cam_volume.SetMetaData(CAM_METADATA_KEY, " ".join(f"{int(i)}:{CLASS_NAMES[int(c)]}" for i, c in zip(node_ids, cam_classes)))
    return cam_volume


def cam_classes_of(cam_volume: sitk.Image) -> dict[int, str]:
    """{node id: class name} recorded by `label_cam_volume` (empty when the image has none)."""
    if not cam_volume.HasMetaDataKey(CAM_METADATA_KEY):
        return {}
    pairs = (item.split(":", 1) for item in cam_volume.GetMetaData(CAM_METADATA_KEY).split())
    return {int(node): name for node, name in pairs}
