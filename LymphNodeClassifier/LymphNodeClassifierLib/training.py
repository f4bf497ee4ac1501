"""Training a node classifier on a dataset and exporting it with its model card.

- `TrainingConfig`: every choice of a run (preprocessing, architecture, optimisation, augmentation,
  split, seed); validated on creation (`InputError`).
- `split_by_patient`: train / validation / test indices with scikit-learn's StratifiedGroupKFold,
  so no patient has nodes in two splits and the class balance is kept roughly equal;
  `assign_folds`: the same for k folds (cross-validation, the suspect finder).
- `train(patchset, config, on_event, is_cancelled) -> TrainingResult`: eager PyTorch on CPU (or
  whatever device the tensors are on: CPU here), BCEWithLogits + Adam, ReduceLROnPlateau
  (factor 0.5) on the validation loss, early stopping on the validation loss; the weights of the
  best epoch (lowest validation loss; a decrease counts when it exceeds 1e-4 relative, the
  scheduler's own threshold) are kept. The decision threshold is chosen on the validation
  set (Youden's J = sensitivity + specificity - 1, maximal). Test metrics use that threshold.
- Augmentation (training batches only), on the fly on CPU tensors: random horizontal / vertical
  flips, rotation by an angle drawn uniformly in [-rotation_degrees, rotation_degrees] and a shift
  up to `translation_px` pixels per axis, both in one `affine_grid` / `grid_sample` (bilinear)
  with zero padding: 0 is air after windowing, like the air padding of `patches.py`. The same
  2-D transform is applied to every channel of a node (the study's 2-D augmentation; it is not a
  3-D rotation of the node).
- Deterministic for a seed: the CPU random state is forked (the caller's is untouched) and seeded,
  the data order and augmentation draw from their own `torch.Generator`, deterministic
  algorithms are requested (`inference.deterministic`); `num_threads`, when set, is applied for
  the run and restored after (else torch's current setting is used).
- Events: `on_event(dict)` gets JSON-serialisable dicts in order: one `{"event": "start", ...}`,
  one `{"event": "epoch", "epoch", "epochs", "train_loss", "val_loss", "val_auc", "lr",
  "seconds"}` per epoch, one `{"event": "done", ...}`; nan is sent as null.
  `is_cancelled()` is checked before every batch and raises `errors.CancelledError`; nothing is
  written by `train`, so a cancelled run can never replace a model.
- `export_trained_model` builds the card (`model.new_card`) and writes TorchScript atomically.
- `main(argv)`: the `train` command of the CLI.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from . import __version__
from .cli import exit_code
from .errors import CancelledError, InputError, OneLineArgumentParser
from .fileio import check_writable_file
from .inference import deterministic
from .metrics import binary_metrics, bootstrap_ci, calibration, choose_threshold, json_safe, threshold_rule_name, youden_threshold  # noqa: F401 (youden_threshold: public here too)
from .fusion import attach_features, card_block as fusion_card_block, check_fusion, fit_feature_logistic, standardisation
from .model import FusedNetwork, build_model, export_torchscript, new_card
from .patches import DEFAULT_STACK_OFFSET_MM, FOV_RULES, STACK_MODES, VIEW_MODES, PatchSpec
from .patchset import PatchSet, build_patchset
from .validate import InputPolicy, add_input_options
from .windowing import WINDOW_PRESETS

ARCHITECTURE_NAMES = {"custom": "custom_cnn", "resnet": "small_resnet", "resnet3d": "small_resnet3d"}  # resnet3d: views "volume" only
# A validation loss counts as lower when it is below best * (1 - this): ReduceLROnPlateau's default
# relative threshold, used for early stopping and the best epoch too so the three agree.
_MIN_IMPROVEMENT = 1e-4
EventCallback = Callable[[dict], None]


# --------------------------------------------------------------------------------------------
# configuration


def _positive_int(value: Any, what: str, example: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"The {what} must be a positive whole number, got {value!r}; use e.g. {example}.")
    return int(value)


def _number(value: Any, what: str, low: float, high: float, example: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"The {what} {value!r} is not a number; use e.g. {example}.") from None
    if isinstance(value, bool) or not math.isfinite(number) or not low <= number <= high:
        raise InputError(f"The {what} must be a number from {low:g} to {high:g}, got {value!r}; use e.g. {example}.")
    return number


@dataclass
class TrainingConfig:
    """One training run. Defaults: the abdominal-CT study (64 px at 0.79 mm, W350 L40, 10 px shifts)."""

    architecture: str = "custom"  # "custom" (the study's CNN) or "resnet" (small residual CNN)
    views: str = "triplanar"  # "triplanar" (axial, coronal, sagittal), "axial", "triplanar_stack" (2.5D) or "volume" (3D, resnet3d)
    stack_offset_mm: float = DEFAULT_STACK_OFFSET_MM  # triplanar_stack: neighbour planes at +-this (patches.py)
    mask_channel: bool = False
    patch_size: int = 64
    spacing_mm: tuple[float, float, float] = (0.79, 0.79, 0.79)
    window: tuple[float, float] = (-135.0, 215.0)
    air_hu: float = -1024.0
    epochs: int = 40
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    flips: bool = True
    rotation_degrees: float = 180.0
    translation_px: float = 10.0
    patience: int = 8  # early stopping: epochs without a lower validation loss
    lr_patience: int = 3  # ReduceLROnPlateau: epochs without improvement before halving the LR
    seed: int = 0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    num_threads: int | None = None  # torch threads for the run; None = leave torch's setting
    fov_rule: str = "fixed"  # "fixed" or "grow_to_fit" (patches.py): nodes larger than the view
    threshold_rule: str = "youden"  # decision threshold on the validation set: "youden" or "sensitivity:0.9"
    # appearance augmentation of the image channels (what another scanner changes); 0 = off, no draws
    intensity_jitter: float = 0.0  # per node: scale 1 +- j and shift +- j (windowed units, window = [0, 1])
    blur_sigma_px: float = 0.0  # per node: Gaussian blur, sigma uniform in [0, this] pixels
    noise_std: float = 0.0  # per node: Gaussian noise, std uniform in [0, this] (windowed units)
    noise_grain_px: float = 0.0  # with noise_std: the noise smoothed by a Gaussian of sigma uniform in [0, this] px, then
    # rescaled to its std (a CT kernel's correlated noise grain instead of white noise)
    zoom_jitter: float = 0.0  # per node: scale 1 +- this in the geometric transform (another pixel size; it also moves the size cue)
    fusion: str = "none"  # node features beside the CNN: "none", "mean" (CNN + feature LR, mean probability) or "concat" (fusion.py)

    def __post_init__(self) -> None:
        arch = str(self.architecture).strip().lower()
        arch = {v: k for k, v in ARCHITECTURE_NAMES.items()}.get(arch, arch)
        if arch not in ARCHITECTURE_NAMES:
            raise InputError(f"Unknown architecture '{self.architecture}'; use one of: {', '.join(ARCHITECTURE_NAMES)}.")
        self.architecture = arch
        if self.views not in VIEW_MODES:
            raise InputError(f"Unknown views '{self.views}'; use one of: {', '.join(VIEW_MODES)}.")
        if (self.architecture == "resnet3d") != (self.views == "volume"):
            raise InputError(f"Architecture '{self.architecture}' does not take views '{self.views}'; use --architecture resnet3d with --views volume (3D), "
                             "and custom or resnet with the other views.")
        self.mask_channel = bool(self.mask_channel)
        self.epochs = _positive_int(self.epochs, "number of epochs", 40)
        self.batch_size = _positive_int(self.batch_size, "batch size", 32)
        if self.batch_size < 2:
            raise InputError("The batch size must be at least 2 (batch normalisation needs two nodes per batch); use e.g. 32.")
        self.learning_rate = _number(self.learning_rate, "learning rate", 0.0, 1.0, 0.001)
        if self.learning_rate <= 0:
            raise InputError("The learning rate must be above 0; use e.g. 0.001.")
        self.weight_decay = _number(self.weight_decay, "weight decay", 0.0, 1.0, 0.0001)
        self.flips = bool(self.flips)
        spec = self.patch_spec()  # validates size, spacing, air (InputError)
        self.patch_size, self.spacing_mm, self.air_hu = spec.size, spec.spacing_mm, spec.air_hu
        self.rotation_degrees = _number(self.rotation_degrees, "rotation range (degrees)", 0.0, 180.0, 180)
        self.translation_px = _number(self.translation_px, "translation range (pixels)", 0.0, self.patch_size / 2, 10)
        self.patience = _positive_int(self.patience, "early-stopping patience", 8)
        self.lr_patience = _positive_int(self.lr_patience, "learning-rate patience", 3)
        self.seed = check_seed(self.seed)
        if self.num_threads is not None:
            self.num_threads = _positive_int(self.num_threads, "number of threads", 2)
        self.split_fractions = _check_fractions(self.split_fractions)
        self.threshold_rule = threshold_rule_name(self.threshold_rule)
        self.intensity_jitter = _number(self.intensity_jitter, "intensity jitter", 0.0, 0.5, 0.1)
        self.blur_sigma_px = _number(self.blur_sigma_px, "blur sigma (pixels)", 0.0, 5.0, 1.0)
        self.noise_std = _number(self.noise_std, "noise standard deviation", 0.0, 0.5, 0.03)
        self.noise_grain_px = _number(self.noise_grain_px, "noise grain (pixels)", 0.0, 5.0, 1.5)
        if self.noise_grain_px and not self.noise_std:
            raise InputError("A noise grain needs noise to shape; give a noise standard deviation too (e.g. --noise 0.08 --noise-grain 1.5).")
        self.zoom_jitter = _number(self.zoom_jitter, "zoom jitter", 0.0, 0.5, 0.1)
        self.fusion = check_fusion(self.fusion)
        if self.views == "volume" and (self.intensity_jitter or self.blur_sigma_px or self.noise_std):
            raise InputError("Appearance augmentation (--intensity-jitter, --blur, --noise) works on 2D patches only; leave it off with --views volume.")
        try:
            low, high = (float(v) for v in self.window)
        except (TypeError, ValueError):
            raise InputError(f"The window {self.window!r} is not a (low, high) pair of HU values; use e.g. -135 215.") from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise InputError(f"The window low ({low:g}) must be a finite HU value below high ({high:g}); fix the window.")
        self.window = (low, high)

    @property
    def model_name(self) -> str:
        """The architecture's name in `model.ARCHITECTURES`."""
        return ARCHITECTURE_NAMES[self.architecture]

    @property
    def window_preset(self) -> str:
        for name, window in WINDOW_PRESETS.items():
            if tuple(window) == tuple(self.window):
                return name
        return "custom"

    def patch_spec(self) -> PatchSpec:
        return PatchSpec(
            spacing_mm=self.spacing_mm, size=self.patch_size, views=self.views, mask_channel=self.mask_channel,
            air_hu=self.air_hu, fov_rule=self.fov_rule, stack_offset_mm=self.stack_offset_mm,
        )

    def preprocessing(self) -> dict:
        """The card's `preprocessing` section (what inference must reproduce)."""
        spec = self.patch_spec()
        return {
            "window_low": self.window[0],
            "window_high": self.window[1],
            "window_preset": self.window_preset,
            "spacing_mm": list(spec.spacing_mm),
            "patch_size": spec.size,
            "field_of_view_mm": spec.size * spec.spacing_mm[0],
            "views": spec.views,
            "mask_channel": spec.mask_channel,
            "channels": list(spec.channel_names),
            "air_hu": spec.air_hu,
            "fov_rule": spec.fov_rule,
            "fov_margin": spec.fov_margin,
            **({"stack_offset_mm": spec.stack_offset_mm} if spec.views in STACK_MODES else {}),
            **({"node_features": fusion_card_block(self.fusion)} if self.fusion != "none" else {}),
        }

    def to_dict(self) -> dict:
        return json_safe(asdict(self))


def _check_fractions(fractions: Any) -> tuple[float, float, float]:
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise InputError(f"The split fractions {fractions!r} are not numbers; give train, validation and test fractions, e.g. 0.8 0.1 0.1.") from None
    if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise InputError(f"The split fractions {fractions!r} must be three non-negative numbers that add up to 1; e.g. 0.8 0.1 0.1.")
    if values[0] <= 0 or values[1] <= 0:
        raise InputError("The training and validation fractions must both be above 0 (validation chooses the epoch and the threshold); e.g. 0.8 0.1 0.1.")
    return values


# --------------------------------------------------------------------------------------------
# patient-level split


def check_folds(folds) -> int:
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise InputError(f"The number of folds must be a whole number of at least 2, got {folds!r}; use e.g. 5.")
    return int(folds)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"The seed must be a non-negative whole number, got {seed!r}; use e.g. 0.")
    return int(seed)


def assign_folds(patient_ids: Sequence, y: Sequence[int], folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fold index (0..folds-1) of every node; all nodes of a patient share one fold.

    scikit-learn's StratifiedGroupKFold (shuffled with `seed`) keeps the class balance of the
    folds close to the whole set's. Raises InputError when there are fewer patients than folds.
    """
    folds = check_folds(folds)
    seed = check_seed(seed)
    groups = np.asarray(patient_ids).astype(str)
    labels = np.asarray(y).astype(np.int64)
    if groups.ndim != 1 or groups.shape != labels.shape:
        raise InputError(f"There are {groups.size} patient ids for {labels.size} labels; pass one patient id per node.")
    n_patients = len(np.unique(groups))
    if n_patients < folds:
        raise InputError(f"There are only {n_patients} patients for {folds} folds; use fewer folds or add patients.")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    out = np.full(labels.size, -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        for k, (_, members) in enumerate(splitter.split(np.zeros(labels.size), labels, groups)):
            out[members] = k
    return out


def _one_fold(indices: np.ndarray, y: np.ndarray, groups: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Indices of one StratifiedGroupKFold fold holding about `share` of `indices`."""
    n_splits = max(2, int(round(1.0 / share)))
    n_groups = len(np.unique(groups[indices]))
    if n_groups < n_splits:
        raise InputError(
            f"There are only {n_groups} patients left to split off a {share:.0%} share; add patients or use larger validation/test fractions."
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        folds = [fold for _, fold in splitter.split(np.zeros(indices.size), y[indices], groups[indices])]
    target = share * indices.size
    best = min(range(len(folds)), key=lambda f: (abs(folds[f].size - target), f))
    return indices[np.sort(folds[best])]


def split_by_patient(
    patient_ids: Sequence, y: Sequence[int], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, test) node indices; every patient's nodes lie in exactly one of them.

    The test share is one StratifiedGroupKFold fold (about 1/round(1/test) of the nodes), the
    validation share one fold of the rest; the fold closest in size to the requested share is
    taken. A test fraction of 0 gives an empty test set. Each index array is sorted.
    """
    groups = np.asarray(patient_ids).astype(str)
    labels = np.asarray(y).astype(np.int64)
    if groups.ndim != 1 or groups.shape != labels.shape:
        raise InputError(f"There are {groups.size} patient ids for {labels.size} labels; pass one patient id per node.")
    train_f, val_f, test_f = _check_fractions(fractions)
    indices = np.arange(labels.size)
    test = np.zeros(0, dtype=np.int64)
    rest = indices
    if test_f > 0:
        test = _one_fold(indices, labels, groups, test_f, seed)
        rest = np.setdiff1d(indices, test)
    validation = _one_fold(rest, labels, groups, val_f / (train_f + val_f), seed + 1)
    train_idx = np.setdiff1d(rest, validation)
    if train_idx.size == 0:
        raise InputError("No nodes are left for training after the validation and test splits; add patients.")
    return train_idx.astype(np.int64), validation.astype(np.int64), test.astype(np.int64)


# --------------------------------------------------------------------------------------------
# augmentation


def augment_batch(
    x: torch.Tensor,
    generator: torch.Generator,
    config: TrainingConfig,
    angles_deg: torch.Tensor | None = None,
    shifts_px: torch.Tensor | None = None,
    zooms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Randomly flipped, rotated, shifted (and with `zoom_jitter` scaled) copy of a `(N, C, H, W)`
    batch (zero padding = air), about the patch centre.

    `angles_deg` (N,), `shifts_px` (N, 2: columns, rows) and `zooms` (N,) override the random draws (tests).
    A positive angle turns the image counter-clockwise as displayed (rows down, columns right);
    a positive shift moves the content towards higher column / row indices.
    """
    n, _, height, width = x.shape
    if config.flips:
        flip_columns = (torch.rand(n, generator=generator) < 0.5)[:, None, None, None]
        flip_rows = (torch.rand(n, generator=generator) < 0.5)[:, None, None, None]
        x = torch.where(flip_columns, x.flip(-1), x)
        x = torch.where(flip_rows, x.flip(-2), x)
    if angles_deg is None:
        angles_deg = (torch.rand(n, generator=generator) * 2 - 1) * config.rotation_degrees
    if shifts_px is None:
        shifts_px = (torch.rand((n, 2), generator=generator) * 2 - 1) * config.translation_px
    angles_deg = angles_deg.to(x.dtype)
    shifts_px = shifts_px.to(x.dtype)
    # zoom > 1 magnifies the content; no draw at 0, so runs without it keep their random streams
    zoom = zooms.to(x.dtype) if zooms is not None else (
        1.0 + (torch.rand(n, generator=generator) * 2 - 1).to(x.dtype) * config.zoom_jitter if config.zoom_jitter else None)
    if not (angles_deg.abs().max() > 0 or shifts_px.abs().max() > 0 or zoom is not None):
        return augment_appearance(x, generator, config)
    # affine_grid maps output (u, v) in [-1, 1] (u = column, v = row) to input coordinates:
    # input = R(-angle) @ output - shift, so the content turns by +angle and moves by +shift.
    radians = torch.deg2rad(angles_deg)
    cos, sin = torch.cos(radians), torch.sin(radians)
    scale = torch.tensor([2.0 / width, 2.0 / height], dtype=x.dtype)
    shift = shifts_px * scale
    theta = torch.zeros((n, 2, 3), dtype=x.dtype)
    # rows grow downwards: turning counter-clockwise on screen is clockwise in (u, v)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    if zoom is not None:
        theta[:, :, :2] = theta[:, :, :2] / zoom[:, None, None]  # input = R(-angle) @ output / zoom - shift
    theta[:, :, 2] = -(theta[:, :, :2] @ shift[:, :, None])[:, :, 0]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if config.mask_channel:
        out[:, -1] = (out[:, -1] >= 0.5).to(out.dtype)
    return augment_appearance(out, generator, config)


def _gaussian_kernels(sigma_px: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, 2r+1) normalised 1-D Gaussians; sigma 0 gives the identity kernel."""
    radius = max(1, int(math.ceil(3.0 * float(sigma_px.max()))))
    offsets = torch.arange(-radius, radius + 1, dtype=dtype)
    sigma = sigma_px.to(dtype).clamp_min(1e-3)[:, None]
    kernels = torch.exp(-0.5 * (offsets[None, :] / sigma) ** 2)
    return kernels / kernels.sum(dim=1, keepdim=True)


def _blurred(image: torch.Tensor, sigma_px: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) blurred per node by a separable Gaussian of sigma_px[node] (replicate padding)."""
    n, images = image.shape[:2]
    kernels = _gaussian_kernels(sigma_px, image.dtype).repeat_interleave(images, dim=0)  # one per (node, channel)
    half = kernels.shape[1] // 2
    flat = image.reshape(1, n * images, *image.shape[2:])
    flat = F.conv2d(F.pad(flat, (half, half, 0, 0), mode="replicate"), kernels[:, None, None, :], groups=n * images)
    flat = F.conv2d(F.pad(flat, (0, 0, half, half), mode="replicate"), kernels[:, None, :, None], groups=n * images)
    return flat.reshape(image.shape)


def _correlated(noise: torch.Tensor, grain_px: torch.Tensor) -> torch.Tensor:
    """White noise smoothed per node (sigma grain_px) and rescaled to unit std per node and channel."""
    smooth = _blurred(noise, grain_px)
    return smooth / smooth.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)


def augment_appearance(x: torch.Tensor, generator: torch.Generator, config: TrainingConfig) -> torch.Tensor:
    """Per node, on the image channels only (never the mask): intensity scale and shift, Gaussian blur
    and Gaussian noise (white, or correlated with a random grain), as another scanner's calibration,
    kernel and dose would change them; values clipped to the window's [0, 1]. No random number is
    drawn for a setting at 0, so runs without them are unchanged."""
    if not (config.intensity_jitter or config.blur_sigma_px or config.noise_std):
        return x
    n, channels = x.shape[:2]
    images = channels - 1 if config.mask_channel else channels
    image = x[:, :images]
    if config.blur_sigma_px:
        image = _blurred(image, torch.rand(n, generator=generator) * config.blur_sigma_px)
    if config.intensity_jitter:
        scale = 1.0 + (torch.rand(n, generator=generator) * 2 - 1) * config.intensity_jitter
        shift = (torch.rand(n, generator=generator) * 2 - 1) * config.intensity_jitter
        image = image * scale[:, None, None, None].to(x.dtype) + shift[:, None, None, None].to(x.dtype)
    if config.noise_std:
        std = torch.rand(n, generator=generator) * config.noise_std
        noise = torch.randn(image.shape, generator=generator, dtype=x.dtype)
        if config.noise_grain_px:
            noise = _correlated(noise, torch.rand(n, generator=generator) * config.noise_grain_px)
        image = image + noise * std[:, None, None, None].to(x.dtype)
    out = x.clone()
    out[:, :images] = image.clamp(0.0, 1.0)
    return out


# --------------------------------------------------------------------------------------------
# 3D augmentation (views "volume")


def augment_volume_batch(x: torch.Tensor, generator: torch.Generator, config: TrainingConfig) -> torch.Tensor:
    """`augment_batch` for `(N, C, D, H, W)` blocks `[z, y, x]`: each node's block is flipped along
    x / y (and z, with `flips`), turned about the patient z axis and shifted in x / y, by one transform
    for all its slices and channels (so it is a rigid 3D motion, unlike the 2D views' per-view
    transforms); the mask channel is re-binarised. No appearance augmentation (refused for volumes)."""
    n, channels, depth, height, width = x.shape
    if config.flips:
        flip_z = (torch.rand(n, generator=generator) < 0.5)[:, None, None, None, None]
        x = torch.where(flip_z, x.flip(2), x)
    in_plane = replace(config, mask_channel=False)  # the mask is D slices here: thresholded below
    out = augment_batch(x.reshape(n, channels * depth, height, width), generator, in_plane).reshape(x.shape)
    if config.mask_channel:
        out[:, -1] = (out[:, -1] >= 0.5).to(out.dtype)
    return out


# 3-D context (docs/LIDC_RESULTS.md, "3-D context": they did not beat the 2D views): options of the train
# and crossval commands that the Training tab does not offer.
COMMAND_LINE_ONLY_VIEWS = ("triplanar_stack", "volume")
COMMAND_LINE_ONLY_ARCHITECTURES = ("resnet3d",)


def check_exportable(config: TrainingConfig) -> None:
    """Refuse, before any work, a configuration whose model cannot yet be exported and classify a CT."""
    if config.views == "volume":
        raise InputError("3D models (--views volume) can be cross-validated only: inference and Grad-CAM take 2D patches; "
                         "drop --export-model (crossval), or train a 2D or 2.5D model (--views triplanar_stack).")


# --------------------------------------------------------------------------------------------
# training


@dataclass
class TrainingResult:
    """The outcome of `train`: the best epoch's eager model (eval mode) and what was measured."""

    model: torch.nn.Module
    config: TrainingConfig
    history: list[dict]
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    decision_threshold: float
    threshold_method: str
    metrics: dict  # {"validation": {...}, "test": {...} or None}; JSON-safe (nan -> None)
    splits: dict[str, np.ndarray]  # "train" / "validation" / "test" -> node indices
    probabilities: dict[str, np.ndarray]  # "validation" / "test" -> probabilities of the best model
    seconds: float
    data: dict = field(default_factory=dict)  # PatchSet.summary() of the training data


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count is not None:
            torch.set_num_threads(previous)


def _logits(model: torch.nn.Module, x: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
    """The model's logits; a FusedNetwork's fused ones when it gets the rows' node features."""
    if isinstance(model, FusedNetwork):
        if features is None:
            raise InputError("A fused model needs the nodes' features; compute them with fusion.attach_features.")
        return model.fused(x, features)
    return model(x)


def predict_probabilities(model: torch.nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 256,
                          features: np.ndarray | None = None) -> np.ndarray:
    """Probabilities (float64) of an eager model (put in eval mode) for `(N, C, H, W)` patches;
    a FusedNetwork's fused ones from `features` (N, F), the rows' raw node features."""
    model.eval()
    tensor = torch.as_tensor(x, dtype=torch.float32)
    f = None if features is None else torch.as_tensor(np.asarray(features), dtype=torch.float32)
    out = []
    with torch.inference_mode():
        for start in range(0, tensor.shape[0], batch_size):
            chunk = None if f is None else f[start:start + batch_size]
            out.append(torch.sigmoid(_logits(model, tensor[start:start + batch_size], chunk)).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _loss_and_probabilities(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
                            features: torch.Tensor | None = None) -> tuple[float, np.ndarray]:
    model.eval()
    losses, probs = [], []
    with torch.inference_mode():
        for start in range(0, x.shape[0], batch_size):
            logits = _logits(model, x[start:start + batch_size], None if features is None else features[start:start + batch_size])
            losses.append(F.binary_cross_entropy_with_logits(logits, y[start:start + batch_size], reduction="sum").item())
            probs.append(torch.sigmoid(logits).double().numpy())
    return sum(losses) / max(1, x.shape[0]), (np.concatenate(probs) if probs else np.zeros(0))


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p)) if y.size and 0 < y.sum() < y.size else math.nan


def evaluate(probability: np.ndarray, patchset: PatchSet, threshold: float, n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics of `probability` on `patchset` at `threshold`, with patient-level bootstrap CIs.

    Adds the AUC of the short-axis size rule on the same nodes (`size_rule_auc`) and, for phantoms,
    the AUC against the noise-free truth (`auc_vs_truth`). JSON-safe.
    """
    out = binary_metrics(patchset.y, probability, threshold)
    out["ci95"] = bootstrap_ci(patchset.y, probability, threshold, n_boot=n_boot, seed=seed, groups=patchset.patient_ids)
    out["ci_resampling"] = "patient"
    out["calibration"] = calibration(patchset.y, probability, n_boot=n_boot, seed=seed, groups=patchset.patient_ids)
    out["size_rule_auc"] = _auc(patchset.y, patchset.short_axis_mm)
    out["patients"] = int(len(set(patchset.patient_ids.tolist())))
    if patchset.has_truth:
        out["auc_vs_truth"] = _auc(patchset.true_y, probability)
        out["size_rule_auc_vs_truth"] = _auc(patchset.true_y, patchset.short_axis_mm)
    return json_safe(out)


def _check_patchset(patchset: PatchSet, config: TrainingConfig) -> None:
    if not isinstance(patchset, PatchSet):
        raise TypeError("train needs a patchset.PatchSet (patchset.build_patchset)")
    spec = config.patch_spec()
    if patchset.x.shape[1:] != spec.patch_shape:
        raise InputError(
            f"The patches have shape {patchset.x.shape[1:]} per node but the configuration needs "
            f"{spec.patch_shape}; extract them with the configuration's patch spec."
        )
    if patchset.spec != spec or tuple(patchset.window) != tuple(config.window):
        raise InputError("The patches were extracted with another patch spec or window than the configuration's; rebuild them with config.patch_spec() and config.window.")
    if len(patchset) < 10:
        raise InputError(f"The dataset has only {len(patchset)} usable labelled nodes; label at least 10 (better hundreds) before training.")
    positives = int(patchset.y.sum())
    if positives == 0 or positives == len(patchset):
        only = "benign" if positives == 0 else "metastatic"
        raise InputError(f"All {len(patchset)} usable nodes are {only}; label nodes of both classes before training.")
    if config.fusion != "none":
        from .node_features import FEATURE_NAMES

        if patchset.node_features is None or np.shape(patchset.node_features) != (len(patchset), len(FEATURE_NAMES)):
            raise InputError(f"Fusion '{config.fusion}' needs the node features of every patch; compute them with fusion.attach_features before training.")


def train(
    patchset: PatchSet,
    config: TrainingConfig,
    on_event: EventCallback | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    splits: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> TrainingResult:
    """Train on `patchset` (split by patient unless `splits` gives (train, val, test) indices)."""
    _check_patchset(patchset, config)
    with _threads(config.num_threads):
        return _train(patchset, config, on_event, is_cancelled, splits)


def _train(patchset, config, on_event, is_cancelled, splits) -> TrainingResult:
    started = time.perf_counter()
    emit = (lambda event: on_event(json_safe(event))) if on_event is not None else (lambda event: None)
    if splits is None:
        splits = split_by_patient(patchset.patient_ids, patchset.y, config.split_fractions, config.seed)
    train_idx, val_idx, test_idx = (np.asarray(s, dtype=np.int64) for s in splits)
    if train_idx.size < 2 or val_idx.size < 1:
        raise InputError("The training split needs at least 2 nodes and the validation split at least 1; add patients.")

    with deterministic(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        x = torch.from_numpy(np.ascontiguousarray(patchset.x, dtype=np.float32))
        y = torch.from_numpy(patchset.y.astype(np.float32))
        x_val, y_val = x[val_idx], y[val_idx]
        model = build_model(config.model_name, patchset.x.shape[1], config.patch_size)
        # fusion "concat": the features are standardised with the training part's constants and
        # trained with the CNN; "mean": the CNN trains alone, the feature model is fitted after it
        features = None if config.fusion == "none" else torch.from_numpy(np.asarray(patchset.node_features, dtype=np.float32))
        joint = features if config.fusion == "concat" else None
        if joint is not None:
            model = FusedNetwork(model, "concat", **standardisation(patchset.node_features[train_idx]))
        optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=config.lr_patience)
        emit({
            "event": "start", "epochs": config.epochs, "train_nodes": int(train_idx.size), "val_nodes": int(val_idx.size),
            "test_nodes": int(test_idx.size), "architecture": config.model_name, "seed": config.seed,
        })
        history: list[dict] = []
        best_loss, best_epoch, best_state, since_best, stopped_early = math.inf, 0, None, 0, False
        for epoch in range(1, config.epochs + 1):
            epoch_start = time.perf_counter()
            model.train()
            order = train_idx[torch.randperm(train_idx.size, generator=generator).numpy()]
            total, seen = 0.0, 0
            for start in range(0, order.size, config.batch_size):
                if is_cancelled is not None and is_cancelled():
                    raise CancelledError("Training cancelled; no model was written.")
                batch = order[start:start + config.batch_size]
                if batch.size < 2 and seen:  # batch normalisation cannot train on a single node
                    continue
                xb = (augment_volume_batch if x.ndim == 5 else augment_batch)(x[batch], generator, config)
                logits = _logits(model, xb, None if joint is None else joint[batch])
                loss = F.binary_cross_entropy_with_logits(logits, y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * batch.size
                seen += batch.size
            val_loss, val_prob = _loss_and_probabilities(model, x_val, y_val, features=None if joint is None else joint[val_idx])
            lr = optimizer.param_groups[0]["lr"]
            record = {
                "epoch": epoch, "train_loss": total / max(1, seen), "val_loss": val_loss,
                "val_auc": _auc(patchset.y[val_idx], val_prob), "lr": lr, "seconds": time.perf_counter() - epoch_start,
            }
            history.append(json_safe(record))
            emit({"event": "epoch", "epochs": config.epochs, **record})
            if val_loss < best_loss * (1.0 - _MIN_IMPROVEMENT):
                best_loss, best_epoch, since_best = val_loss, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since_best += 1
            scheduler.step(val_loss)
            if since_best >= config.patience:
                stopped_early = epoch < config.epochs
                break
        model.load_state_dict(best_state)
        model.eval()
        if config.fusion == "mean":  # the feature model sees the training part only, like the CNN
            fitted = fit_feature_logistic(patchset.node_features[train_idx], patchset.y[train_idx], patchset.patient_ids[train_idx], config.seed)
            model = FusedNetwork(model, "mean", fitted["median"], fitted["mean"], fitted["scale"], fitted["coef"], fitted["intercept"]).eval()
        rows = {"validation": val_idx, **({"test": test_idx} if test_idx.size else {})}
        probabilities = {key: predict_probabilities(model, x[idx], features=None if features is None else features[idx]) for key, idx in rows.items()}
        if features is not None:  # the image branch alone, for the record (its Grad-CAM is what the user sees)
            probabilities.update({f"{key}_image": predict_probabilities(model.image, x[idx]) for key, idx in rows.items()})

    threshold, method = choose_threshold(patchset.y[val_idx], probabilities["validation"], config.threshold_rule)
    metrics = {
        "validation": evaluate(probabilities["validation"], patchset.subset(val_idx), threshold, seed=config.seed),
        "test": evaluate(probabilities["test"], patchset.subset(test_idx), threshold, seed=config.seed) if test_idx.size else None,
    }
    seconds = time.perf_counter() - started
    result = TrainingResult(
        model=model, config=config, history=history, best_epoch=best_epoch, epochs_run=len(history),
        stopped_early=stopped_early, decision_threshold=threshold, threshold_method=method, metrics=metrics,
        splits={"train": train_idx, "validation": val_idx, "test": test_idx}, probabilities=probabilities,
        seconds=seconds, data=patchset.summary(),
    )
    emit({
        "event": "done", "best_epoch": best_epoch, "epochs_run": len(history), "stopped_early": stopped_early,
        "decision_threshold": threshold, "val_auc": metrics["validation"]["auc"],
        "test_auc": metrics["test"]["auc"] if metrics["test"] else None, "seconds": seconds,
    })
    return result


# --------------------------------------------------------------------------------------------
# export


def build_card(
    result: TrainingResult,
    patchset_summary: dict,
    config: TrainingConfig,
    command: str,
    held_out: dict | None = None,
    model_version: str = "1.0.0",
    name: str = "LymphNodeClassifier model",
    description: str = "",
    data_commands: Sequence[str] = (),
) -> dict:
    """The model card of a training result (validated by `model.new_card`).

    `data_commands`: the command lines that made the training / held-out data (e.g. the phantom
    generation), stored as `training.data_commands` so the whole model can be rebuilt.
    """
    summary = json_safe(dict(patchset_summary))
    experience = summary.pop("experience", None)  # the card's own block: validate.experience_warnings reads it
    training = {
        "command": str(command),
        "data_commands": [str(c) for c in data_commands],
        "seed": config.seed,
        "epochs": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "dataset": summary,
        "split": {
            "method": "StratifiedGroupKFold by patient (no patient in two splits)",
            "fractions": list(config.split_fractions),
            **{f"{key}_nodes": int(value.size) for key, value in result.splits.items()},
        },
        "config": config.to_dict(),
        "history": result.history,
        "seconds": round(result.seconds, 1),
        "software": {"LymphNodeClassifierLib": __version__, "torch": torch.__version__},
        "threshold_method": result.threshold_method,
        "threshold_rule": config.threshold_rule,
    }
    metrics = {"validation": result.metrics["validation"], "test": result.metrics["test"], "held_out": json_safe(held_out or {})}
    card = new_card(
        architecture=config.model_name,
        preprocessing=config.preprocessing(),
        training=training,
        metrics=metrics,
        decision_threshold=result.decision_threshold,
        model_version=model_version,
        name=name,
        description=description,
    )
    if experience is not None:
        card["experience"] = experience
    return card


def export_trained_model(
    result: TrainingResult,
    patchset_summary: dict,
    config: TrainingConfig,
    path: str | Path,
    command: str,
    held_out: dict | None = None,
    **card_fields: Any,
) -> Path:
    """Write the trained model as TorchScript with its card (atomically); returns the path.

    `held_out` maps a held-out dataset's name to its metrics (`evaluate`); `card_fields` are
    passed to `build_card` (model_version, name, description).
    """
    card = build_card(result, patchset_summary, config, command, held_out, **card_fields)
    return export_torchscript(result.model, card, path)


def evaluate_held_out(result: TrainingResult, held_out: dict[str, PatchSet]) -> dict[str, dict]:
    """`evaluate` of the trained model on each named held-out PatchSet, at the model's threshold."""
    out = {}
    for key, patchset in held_out.items():
        if len(patchset) == 0:
            raise InputError(f"The held-out dataset '{key}' has no usable labelled nodes; label its nodes or leave it out.")
        if patchset.x.shape[1:] != (result.config.patch_spec().channels, result.config.patch_size, result.config.patch_size):
            raise InputError(f"The held-out dataset '{key}' was extracted with another patch spec; rebuild it with the training configuration.")
        probability = predict_probabilities(result.model, patchset.x, features=patchset.node_features)
        metrics = evaluate(probability, patchset, result.decision_threshold, seed=result.config.seed)
        metrics["dataset"] = patchset.summary()
        out[key] = metrics
    return out


def train_and_export(
    patchset: PatchSet,
    config: TrainingConfig,
    path: str | Path,
    command: str,
    held_out: dict[str, PatchSet] | None = None,
    on_event: EventCallback | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    **card_fields: Any,
) -> tuple[TrainingResult, dict[str, dict]]:
    """Train, evaluate the held-out sets, then write the model: `path` is only replaced (atomically)
    by a finished run; a cancelled or failed run leaves any existing file untouched. A finished model
    is never lost: when `path` cannot be written (the disk filled, the folder went away) it is saved
    in the temporary folder instead and the InputError says where."""
    result = train(patchset, config, on_event=on_event, is_cancelled=is_cancelled)
    held_metrics = evaluate_held_out(result, held_out or {})
    if is_cancelled is not None and is_cancelled():
        raise CancelledError("Training cancelled; no model was written.")
    try:
        export_trained_model(result, patchset.summary(), config, path, command, held_metrics, **card_fields)
    except OSError as error:
        rescue = Path(tempfile.mkdtemp(prefix="lymphnode-model-")) / Path(path).name
        export_trained_model(result, patchset.summary(), config, rescue, command, held_metrics, **card_fields)
        raise InputError(f"Cannot write the trained model to {path} ({error.strerror or error}); it was saved as {rescue}: "
                         "move it where it belongs.") from None
    return result, held_metrics


# --------------------------------------------------------------------------------------------
# command line



MIN_PATCH_SIZE, MAX_PATCH_SIZE = 8, 1024  # what the networks (model.py) and PatchSpec accept


def _parser() -> argparse.ArgumentParser:
    defaults = TrainingConfig()
    parser = OneLineArgumentParser(prog="python -m LymphNodeClassifierLib train", description="Train a lymph node classifier on a dataset and export it as TorchScript with its model card.")
    parser.add_argument("--dataset", required=True, help="dataset folder (with dataset.json)")
    parser.add_argument("--out", required=True, help="model file to write (.pt); replaced only when training finishes")
    parser.add_argument("--architecture", choices=list(ARCHITECTURE_NAMES), default=defaults.architecture)
    parser.add_argument("--views", choices=list(VIEW_MODES), default=defaults.views)
    parser.add_argument("--stack-offset", type=float, default=defaults.stack_offset_mm,
                        help=f"--views triplanar_stack: neighbour planes at +- this many mm (default {defaults.stack_offset_mm:g})")
    parser.add_argument("--mask-channel", action="store_true", help="add the node mask as an input channel")
    parser.add_argument("--patch-size", type=int, default=defaults.patch_size, help="patch pixels (default 64; 48 with --spacing 1.054 trains about twice as fast)")
    parser.add_argument("--spacing", type=float, default=defaults.spacing_mm[0], help="patch pixel spacing in mm (default 0.79)")
    parser.add_argument("--fov-rule", choices=list(FOV_RULES), default=defaults.fov_rule,
                        help="nodes larger than the patch: 'fixed' cuts them off, 'grow_to_fit' samples them coarser so they fit whole")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="Adam learning rate")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--patience", type=int, default=defaults.patience, help="early stopping after this many epochs without a lower validation loss")
    parser.add_argument("--lr-patience", type=int, default=defaults.lr_patience, help="halve the learning rate after this many epochs without a lower validation loss")
    parser.add_argument("--rotation", type=float, default=defaults.rotation_degrees, help="random rotation range in degrees (0-180)")
    parser.add_argument("--translation", type=float, default=None,
                        help=f"random shift range in pixels (default {defaults.translation_px:g}, at most half the patch)")
    parser.add_argument("--val-fraction", type=float, default=defaults.split_fractions[1],
                        help=f"fraction of the patients for validation (epoch and threshold choice; default {defaults.split_fractions[1]:g})")
    parser.add_argument("--test-fraction", type=float, default=defaults.split_fractions[2],
                        help=f"fraction of the patients held out for the test metrics in the card (default {defaults.split_fractions[2]:g}; 0: none)")
    parser.add_argument("--no-flips", action="store_true", help="no random flips")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threshold-rule", default=defaults.threshold_rule, help="decision threshold on the validation set: youden (default) or sensitivity:0.9")
    parser.add_argument("--intensity-jitter", type=float, default=0.0, help="appearance augmentation: intensity scale / shift up to this (window units, e.g. 0.1)")
    parser.add_argument("--blur", type=float, default=0.0, help="appearance augmentation: Gaussian blur sigma up to this many pixels")
    parser.add_argument("--noise", type=float, default=0.0, help="appearance augmentation: Gaussian noise std up to this (window units, e.g. 0.03)")
    parser.add_argument("--noise-grain", type=float, default=0.0,
                        help="with --noise: correlated noise, smoothed with a Gaussian of sigma up to this many pixels (a CT kernel's grain, e.g. 1.5)")
    parser.add_argument("--zoom-jitter", type=float, default=0.0, help="geometric augmentation: scale 1 +- this (e.g. 0.1; it also changes the apparent node size)")
    parser.add_argument("--fusion", choices=["none", "mean", "concat"], default=defaults.fusion,
                        help="node features beside the CNN: mean (CNN + feature logistic regression, mean probability) or concat (end to end); fusion.py")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's setting)")
    parser.add_argument("--workers", type=int, default=1, help="processes for patch extraction")
    parser.add_argument("--cache", default=None, help="folder for cached patch arrays (reused while the data are unchanged)")
    parser.add_argument("--held-out", nargs="+", default=[], metavar="DATASET", help="datasets evaluated at the end; metrics go into the card")
    parser.add_argument("--model-version", default="1.0.0")
    parser.add_argument("--name", default="LymphNodeClassifier model")
    parser.add_argument("--description", default="")
    parser.add_argument("--data-command", action="append", default=[], metavar="COMMAND",
                        help="command line that made the training or held-out data (repeatable; stored in the card)")
    add_input_options(parser)
    return parser


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _print_problems(problems: list[str], what: str) -> None:
    if problems:
        print(f"warning: {len(problems)} node(s) of {what} skipped:", file=sys.stderr)
        for line in problems[:10]:
            print(f"  {line}", file=sys.stderr)
        if len(problems) > 10:
            print(f"  ... and {len(problems) - 10} more", file=sys.stderr)


def run(args: argparse.Namespace, command: str) -> int:
    from .dataset import Dataset

    if not MIN_PATCH_SIZE <= args.patch_size <= MAX_PATCH_SIZE:  # first: other options' limits derive from it
        raise InputError(f"--patch-size {args.patch_size} is impossible: the networks take {MIN_PATCH_SIZE} to {MAX_PATCH_SIZE} pixels "
                         f"(a {args.patch_size * args.spacing:g} mm view at --spacing {args.spacing:g}); use 64, or 48 with --spacing 1.054.")
    translation = args.translation if args.translation is not None else min(TrainingConfig.translation_px, args.patch_size / 2)
    fractions = (1.0 - args.val_fraction - args.test_fraction, args.val_fraction, args.test_fraction)
    if not all(0.0 <= f < 1.0 for f in (args.val_fraction, args.test_fraction)) or fractions[0] <= 0:
        raise InputError(f"--val-fraction {args.val_fraction:g} and --test-fraction {args.test_fraction:g} must each be from 0 to below 1 "
                         "and leave patients to train on; e.g. 0.1 and 0.1.")
    config = TrainingConfig(
        architecture=args.architecture, views=args.views, stack_offset_mm=args.stack_offset, mask_channel=args.mask_channel, epochs=args.epochs,
        patch_size=args.patch_size, spacing_mm=(args.spacing,) * 3, batch_size=args.batch_size, learning_rate=args.lr, weight_decay=args.weight_decay, patience=args.patience, lr_patience=args.lr_patience,
        rotation_degrees=args.rotation, translation_px=translation, flips=not args.no_flips, seed=args.seed,
        num_threads=args.threads, fov_rule=args.fov_rule, threshold_rule=args.threshold_rule, split_fractions=fractions,
        intensity_jitter=args.intensity_jitter, blur_sigma_px=args.blur, noise_std=args.noise,
        noise_grain_px=args.noise_grain, zoom_jitter=args.zoom_jitter, fusion=args.fusion,
    )
    check_exportable(config)
    # before any work: a model must never be lost to an unwritable --out after training
    out = check_writable_file(args.out, "--out", "model.pt")
    held_out_sets = [Dataset.load(folder) for folder in args.held_out]  # fail early on a bad path
    dataset = Dataset.load(args.dataset)
    t0 = time.perf_counter()
    patchset = build_patchset(dataset, config.patch_spec(), config.window, cache_dir=args.cache, workers=args.workers,
                              policy=InputPolicy.from_args(args))
    print(f"patches: {len(patchset)} nodes from {patchset.n_cases} cases ({'cache' if patchset.from_cache else f'{time.perf_counter() - t0:.1f} s'}), "
          f"{int(patchset.y.sum())} metastatic, fingerprint {patchset.fingerprint[:12]}", flush=True)
    _print_problems(patchset.problems, args.dataset)
    attach_features(dataset, patchset, config, args.cache, policy=InputPolicy.from_args(args))

    def show(event: dict) -> None:
        if event["event"] == "epoch":
            print(f"epoch {event['epoch']:3d}/{event['epochs']}  train_loss {_fmt(event['train_loss'], '.4f')}  "
                  f"val_loss {_fmt(event['val_loss'], '.4f')}  val_auc {_fmt(event['val_auc'])}  lr {event['lr']:.2e}  "
                  f"{event['seconds']:.1f} s", flush=True)

    held_sets: dict[str, PatchSet] = {}
    for folder, held_dataset in zip(args.held_out, held_out_sets):
        held_patchset = build_patchset(held_dataset, config.patch_spec(), config.window, cache_dir=args.cache, workers=args.workers,
                                       policy=InputPolicy.from_args(args))
        _print_problems(held_patchset.problems, folder)
        attach_features(held_dataset, held_patchset, config, args.cache, policy=InputPolicy.from_args(args))
        key = held_dataset.name or Path(folder).name
        held_sets[key if key not in held_sets else f"{key} ({folder})"] = held_patchset

    result, held_metrics = train_and_export(
        patchset, config, out, command, held_sets, on_event=show,
        model_version=args.model_version, name=args.name, description=args.description, data_commands=args.data_command,
    )
    test = result.metrics["test"]
    print(f"best epoch {result.best_epoch} of {result.epochs_run}; threshold {result.decision_threshold:.3f}; "
          f"val AUC {_fmt(result.metrics['validation']['auc'])}; test AUC {_fmt(test['auc'] if test else None)}; "
          f"training {result.seconds:.1f} s", flush=True)
    for key, metrics in held_metrics.items():
        print(f"held-out {key}: {metrics['n']} nodes, AUC {_fmt(metrics['auc'])} "
              f"(short-axis size rule {_fmt(metrics['size_rule_auc'])}), sensitivity {_fmt(metrics['sensitivity'])}, "
              f"specificity {_fmt(metrics['specificity'])}", flush=True)
    print(f"model written to {out}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`train --dataset DIR --out MODEL.pt [...]`; returns the exit code (2 for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python -m LymphNodeClassifierLib train " + shlex.join(argv)
    return exit_code(lambda: run(_parser().parse_args(argv), command))
