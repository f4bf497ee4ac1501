"""CNN architectures, the model card, TorchScript export and loading.

Model contract (docs/ARCHITECTURE.md): input float32 ``(N, C, size, size)`` in [0, 1], where C is
3 tri-planar channels ``[axial, coronal, sagittal]`` (+1 axial ``mask`` channel) or 1 for a single
axial slice; output one logit per node, ``(N,)``, positive = metastatic.

Every architecture is split in two so Grad-CAM needs no hooks:

- ``features(x) -> feature map``: the activations of the last convolutional layer (after its ReLU);
- ``head(feature_map) -> logits (N,)``; ``forward(x) = head(features(x))``.

Both are exported as TorchScript methods (``@torch.jit.export``), so a loaded model file offers them
too (see ``gradcam.py``).

A model file is a TorchScript archive (``torch.jit.save``) holding the model card as the extra file
``model_card.json``. It is read back with ``torch.jit.load`` only, never with pickle /
``torch.load``: a model file from someone else cannot run arbitrary Python on load.

The model card (a validated dict, see ``validate_card``) carries every preprocessing parameter that
inference needs, so a model is always applied the way it was trained.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import math
import os
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .errors import InputError
from .fileio import atomic_path

CARD_VERSION = 1
CARD_FILE_NAME = "model_card.json"

VIEW_CHANNELS = {
    "triplanar": ["axial", "coronal", "sagittal"],
    "axial": ["axial"],
    # 2.5D: the centre views, then each view's neighbours at -d / +d mm (preprocessing.stack_offset_mm; patches.py)
    "triplanar_stack": ["axial", "coronal", "sagittal", "axial-d", "axial+d", "coronal-d", "coronal+d", "sagittal-d", "sagittal+d"],
    "volume": ["volume"],  # 3D: one size^3 block (patches.py); needs a 3D architecture
}
MASK_CHANNEL_NAME = "mask"

DEFAULT_LABEL_DEFINITION = (
    "1 = metastatic lymph node, 0 = benign lymph node, as labelled in the training dataset's "
    "reference standard; the model outputs the probability of the metastatic class."
)


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=bias)


def _check_shape_args(in_channels: int, size: int) -> None:
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise InputError(f"The number of input channels must be a positive integer, got {in_channels!r}; use 1 (axial), 3 (tri-planar) or 4 (tri-planar + mask).")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise InputError(f"The patch size must be an integer of at least 8 pixels, got {size!r}; use the default 64.")


class CustomCNN(nn.Module):
    """The 2D CNN of the abdominal-CT lymph-node study, adapted to the patch size.

    Conv 32 → ReLU → MaxPool → Dropout → Conv 64 → ReLU → MaxPool → Dropout → Conv 128 → ReLU
    → MaxPool → Dropout → Flatten → Dense 128 → ReLU → Dropout → Dense 1 (logit); 3x3 convolutions
    with padding 1, 2x2 max pooling. ``features`` ends at the ReLU of the third convolution
    (``size / 4`` pixels square), ``head`` starts at the third max pooling.
    """

    def __init__(self, in_channels: int = 3, size: int = 64, conv_dropout: float = 0.25, dense_dropout: float = 0.5):
        super().__init__()
        _check_shape_args(in_channels, size)
        self.architecture_name = "custom_cnn"
        self.in_channels = in_channels
        self.size = size
        self.body = nn.Sequential(
            _conv3x3(in_channels, 32), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(conv_dropout),
            _conv3x3(32, 64), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(conv_dropout),
            _conv3x3(64, 128), nn.ReLU(),
        )
        pooled = size // 2 // 2 // 2
        self.classifier = nn.Sequential(
            nn.MaxPool2d(2), nn.Dropout(conv_dropout), nn.Flatten(),
            nn.Linear(128 * pooled * pooled, 128), nn.ReLU(), nn.Dropout(dense_dropout),
            nn.Linear(128, 1),
        )

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    @torch.jit.export
    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.classifier(feature_map)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def feature_layer(self) -> nn.Module:
        """The module whose output is ``features(x)`` (for hook-based tools such as captum)."""
        return self.body[-1]


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN + shortcut (1x1 conv-BN when the shape changes), ReLU; 2D, or 3D with `dims=3`."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dims: int = 2):
        super().__init__()
        conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
        self.conv1 = conv(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = conv(out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                conv(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                norm(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A small residual 2D CNN.

    Stem 3x3 conv 32 (stride 2) + BN + ReLU, then three stages of one basic residual block each with
    32 / 64 / 128 channels (strides 1, 2, 1), global average pooling, dropout, linear → 1 logit.
    ``features`` is the output of the last block (``size / 4`` pixels square), ``head`` is pooling,
    dropout and the linear layer.
    """

    def __init__(self, in_channels: int = 3, size: int = 64, dropout: float = 0.3, dims: int = 2, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        _check_shape_args(in_channels, size)
        self.architecture_name = "small_resnet"
        self.in_channels = in_channels
        self.size = size
        conv, norm, pool = (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d, nn.AdaptiveAvgPool3d)
        w1, w2, w3 = widths
        self.stem = nn.Sequential(conv(in_channels, w1, kernel_size=3, stride=2, padding=1, bias=False), norm(w1), nn.ReLU())
        self.stages = nn.Sequential(BasicBlock(w1, w1, 1, dims), BasicBlock(w1, w2, 2, dims), BasicBlock(w2, w3, 1, dims))
        self.pool = pool(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(w3, 1)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    @torch.jit.export
    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(self.pool(feature_map), 1)
        return self.fc(self.dropout(pooled))[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def feature_layer(self) -> nn.Module:
        """The module whose output is ``features(x)`` (for hook-based tools such as captum)."""
        return self.stages[-1]


# --------------------------------------------------------------------------------------------
# 3D architecture (views "volume": input (N, C, size, size, size), patches.py)


class SmallResNet3D(SmallResNet):
    """SmallResNet in 3D (3x3x3 convolutions) at half its widths, 16 / 32 / 64 channels: a CPU
    budget (a 26^3 block costs about twice a 40^2 tri-planar patch). ``features`` is the last
    block's output (``size / 4`` voxels a side), so a Grad-CAM of it would be a 3D map on the patch grid."""

    def __init__(self, in_channels: int = 2, size: int = 24, dropout: float = 0.3):
        super().__init__(in_channels, size, dropout, dims=3, widths=(16, 32, 64))
        self.architecture_name = "small_resnet3d"


VOLUME_ARCHITECTURES = ("small_resnet3d",)  # take views "volume" only; the 2D ones take every other view mode


ARCHITECTURES: dict[str, type[nn.Module]] = {"custom_cnn": CustomCNN, "small_resnet": SmallResNet, "small_resnet3d": SmallResNet3D}


def architecture_names() -> list[str]:
    return list(ARCHITECTURES)


def _normalise_architecture(name: str) -> str:
    if not isinstance(name, str):
        raise InputError(f"The architecture must be a name, got {name!r}; choose one of {', '.join(ARCHITECTURES)}.")
    key = name.strip().lower().replace("-", "_")
    aliases = {"custom": "custom_cnn", "customcnn": "custom_cnn", "cnn": "custom_cnn", "smallresnet": "small_resnet", "resnet": "small_resnet",
               "resnet3d": "small_resnet3d", "smallresnet3d": "small_resnet3d"}
    key = aliases.get(key, key)
    if key not in ARCHITECTURES:
        raise InputError(f"Unknown architecture '{name}'; choose one of {', '.join(ARCHITECTURES)}.")
    return key


def build_model(architecture: str, in_channels: int, size: int) -> nn.Module:
    """A freshly initialised eager model (train mode) of the named architecture."""
    return ARCHITECTURES[_normalise_architecture(architecture)](in_channels=in_channels, size=size)


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# --------------------------------------------------------------------------------------------
# Ensembles and test-time augmentation (TTA)
# --------------------------------------------------------------------------------------------

# TTA: the logits of each patch are averaged over transformed copies of it. The transforms are
# the ones training augmentation applies to the whole (C, H, W) patch -- flips of its rows and
# columns and rotations about its centre (training.augment_batch), every channel (all views and
# the mask) alike -- so a copy is a patch the network was trained on. They are not the same 3D
# mirror in every view (a column flip is right-left in the axial and coronal views but
# anterior-posterior in the sagittal one); neither is the augmentation. "flips" needs training
# with flips; "flips+rot90" (the 8 symmetries of the square) also rotations of at least 90 degrees.
TTA_TRANSFORMS: dict[str, Any] = {
    "identity": lambda x: x,
    "flip_columns": lambda x: x.flip(-1),
    "flip_rows": lambda x: x.flip(-2),
    "rot180": lambda x: x.flip(-2, -1),
    "rot90": lambda x: torch.rot90(x, 1, (-2, -1)),
    "rot90_flip_columns": lambda x: torch.rot90(x, 1, (-2, -1)).flip(-1),
    "rot90_flip_rows": lambda x: torch.rot90(x, 1, (-2, -1)).flip(-2),
    "rot270": lambda x: torch.rot90(x, 3, (-2, -1)),
}
TTA_MODES: dict[str, tuple[str, ...]] = {
    "none": ("identity",),
    "flips": ("identity", "flip_columns", "flip_rows", "rot180"),
    "flips+rot90": tuple(TTA_TRANSFORMS),
}


def check_tta_mode(mode: Any) -> str:
    """A known TTA mode name (InputError otherwise)."""
    if not isinstance(mode, str) or mode.strip().lower() not in TTA_MODES:
        raise InputError(f"Unknown test-time augmentation {mode!r}; choose one of {', '.join(TTA_MODES)}.")
    return mode.strip().lower()


def check_tta_fits_training(mode: str, flips: bool, rotation_degrees: float) -> str:
    """Refuse a TTA mode whose copies the training augmentation never made (InputError)."""
    mode = check_tta_mode(mode)
    if mode != "none" and not flips:
        raise InputError(f"Test-time augmentation '{mode}' flips patches but the training uses no flips; train with flips or use --tta none.")
    if mode == "flips+rot90" and rotation_degrees < 90:
        raise InputError(
            f"Test-time augmentation 'flips+rot90' rotates patches by 90 degrees but the training rotates them by at most "
            f"{rotation_degrees:g}; train with --rotation 90 or more, or use --tta flips."
        )
    return mode


def card_tta(card: dict) -> str:
    """The card's TTA mode (``preprocessing.tta``; cards written before it existed: "none")."""
    return str(card["preprocessing"].get("tta", "none"))


def tta_logits(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str | Sequence[str] = "none") -> torch.Tensor:
    """Logits ``(N,)`` of ``forward`` averaged over the TTA copies of ``x`` (a mode name or a
    sequence of ``TTA_TRANSFORMS`` names). Mode "none" is one plain call, bit for bit."""
    names = TTA_MODES[check_tta_mode(mode)] if isinstance(mode, str) else tuple(mode)
    if names == ("identity",):
        return forward(x).reshape(-1)
    copies = torch.cat([TTA_TRANSFORMS[name](x) for name in names], dim=0)  # one call for all copies
    return forward(copies).reshape(len(names), x.shape[0]).mean(dim=0)


class Ensemble(nn.Module):
    """k member networks of one architecture and input in one archive; ``forward(x)`` is the mean
    of the members' logits.

    For Grad-CAM (gradcam.py, which needs nothing else): ``features(x)`` is the members' feature
    maps stacked along the channels, ``(N, k K, h, w)``, and ``head`` applies each member's head to
    its own K channels and averages. Grad-CAM of the ensemble's logit is then ReLU of the mean of
    the members' weighted activation sums (the ReLU after the mean, not a mean of the members'
    maps): of k identical members, exactly the member's map up to rounding.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        members = list(members)
        if not members:
            raise InputError("An ensemble needs at least one member network; train one first.")
        shapes = {(getattr(m, "architecture_name", None), getattr(m, "in_channels", None), getattr(m, "size", None)) for m in members}
        if len(shapes) != 1 or None in next(iter(shapes)):
            raise InputError(f"Ensemble members must share architecture, input channels and patch size, got {sorted(map(str, shapes))}; train them with one configuration.")
        self.architecture_name, self.in_channels, self.size = next(iter(shapes))
        self.n_members = len(members)
        self.members = nn.ModuleList(members)

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        maps: list[torch.Tensor] = []
        for member in self.members:
            maps.append(member.features(x))
        return torch.cat(maps, dim=1)

    @torch.jit.export
    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        chunks = torch.chunk(feature_map, self.n_members, dim=1)
        logits: list[torch.Tensor] = []
        for index, member in enumerate(self.members):
            logits.append(member.head(chunks[index]))
        return torch.stack(logits, dim=0).mean(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: list[torch.Tensor] = []
        for member in self.members:
            logits.append(member(x))
        return torch.stack(logits, dim=0).mean(dim=0)


# --------------------------------------------------------------------------------------------
# Fusion: the image network + the node's measured features (fusion.py; card preprocessing.node_features)
# --------------------------------------------------------------------------------------------

FUSION_MODES = ("mean", "concat")


class FusedNetwork(nn.Module):
    """An image network plus a linear branch on the node's measured features (`node_features`).

    ``forward(x)``, ``features`` and ``head`` are the image network's own (Grad-CAM explains the
    image branch, unchanged). ``fused(x, node_features)`` is the fused logit from the RAW feature
    values (NaN = not measured): imputation by the training medians, then standardisation, are
    buffers in the archive, as are the branch's weights, so the weights digest covers them.

    - ``mean``: the feature branch is a logistic regression fitted beside the trained CNN; the
      fused probability is the mean of the two probabilities (returned as its logit, computed in
      log space so it stays exact at saturated probabilities).
    - ``concat``: the standardised features join the CNN's pooled features in its final linear
      layer: the head's last layer is linear, so ``head(fmap) + w . z`` IS that layer applied to
      the concatenation; trained end to end (``feature_weight`` trainable, no second bias).
    """

    def __init__(self, image: nn.Module, mode: str, median, mean, scale, weight=None, bias: float = 0.0):
        super().__init__()
        if mode not in FUSION_MODES:
            raise InputError(f"Unknown fusion '{mode}'; use one of: {', '.join(FUSION_MODES)}.")
        self.image = image
        self.architecture_name = str(getattr(image, "architecture_name", ""))
        self.in_channels = int(getattr(image, "in_channels", 0))
        self.size = int(getattr(image, "size", 0))
        self.fusion = mode
        self.average_probabilities = mode == "mean"
        as_tensor = lambda v: torch.as_tensor(v, dtype=torch.float32).reshape(-1).clone()  # noqa: E731
        self.register_buffer("feature_median", as_tensor(median))
        self.register_buffer("feature_mean", as_tensor(mean))
        self.register_buffer("feature_scale", as_tensor(scale))
        n = int(self.feature_mean.numel())
        if not (self.feature_median.numel() == self.feature_scale.numel() == n) or n < 1:
            raise InputError("The node-feature constants (median, mean, scale) must have one value per feature; refit the feature model.")
        self.n_features = n
        initial = torch.zeros(n) if weight is None else as_tensor(weight)
        if initial.numel() != n:
            raise InputError(f"The feature branch has {initial.numel()} weights for {n} features; refit the feature model.")
        self.feature_weight = nn.Parameter(initial, requires_grad=mode == "concat")
        self.feature_bias = nn.Parameter(torch.tensor([float(bias)]), requires_grad=False)

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.image.features(x)

    @torch.jit.export
    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.image.head(feature_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.image.head(self.image.features(x))

    @torch.jit.export
    def feature_logit(self, node_features: torch.Tensor) -> torch.Tensor:
        """The feature branch's logit (mean) or its additive term (concat), ``(N,)``."""
        values = node_features.to(self.feature_mean.dtype)
        values = torch.where(torch.isnan(values), self.feature_median.expand_as(values), values)
        z = (values - self.feature_mean) / self.feature_scale
        return z @ self.feature_weight + self.feature_bias

    @torch.jit.export
    def fused(self, x: torch.Tensor, node_features: torch.Tensor) -> torch.Tensor:
        """The fused logit ``(N,)`` of patches ``x`` and their nodes' raw features ``(N, F)``."""
        image_logit = self.forward(x)
        feature_logit = self.feature_logit(node_features)
        if self.average_probabilities:
            # logit((s(a) + s(b)) / 2) = log(s(a) + s(b)) - log(s(-a) + s(-b))
            up = torch.logaddexp(nn.functional.logsigmoid(image_logit), nn.functional.logsigmoid(feature_logit))
            down = torch.logaddexp(nn.functional.logsigmoid(-image_logit), nn.functional.logsigmoid(-feature_logit))
            return up - down
        return image_logit + feature_logit


def card_fusion(card: dict) -> dict | None:
    """The card's ``preprocessing.node_features`` block (a fused model), or None (image only)."""
    return card["preprocessing"].get("node_features")


def _check_node_features_block(pre: dict) -> None:
    block = _require(pre, "node_features", "preprocessing.", lambda v: isinstance(v, dict), "an object")
    w = "preprocessing.node_features."
    _require(block, "fusion", w, lambda v: v in FUSION_MODES, f"one of {', '.join(FUSION_MODES)}")
    _require(block, "names", w, lambda v: isinstance(v, list) and v and all(isinstance(n, str) for n in v), "a list of feature names")
    _require(block, "version", w, lambda v: isinstance(v, str), "a string")


def check_node_features_supported(card: dict, path: Path | str) -> None:
    """Refuse a fused model whose features this code does not compute the same way (one line)."""
    block = card_fusion(card)
    if block is None:
        return
    from .node_features import FEATURE_NAMES, FEATURES_VERSION

    if block["names"] != list(FEATURE_NAMES) or block["version"] != FEATURES_VERSION:
        raise InputError(
            f"The model '{path}' needs node features {len(block['names'])} of version {block['version']} but this LymphNodeClassifier "
            f"computes {len(FEATURE_NAMES)} of version {FEATURES_VERSION}; use the LymphNodeClassifier version the model was trained with, or retrain it."
        )


def check_fused_network_fits_card(module: torch.jit.ScriptModule, card: dict, path: Path | str, device: torch.device) -> None:
    """A fused card needs the network's ``fused`` method to take a zero batch with the card's
    feature count and return one logit; a fused network needs a card that lists its features."""
    block = card_fusion(card)
    has_fused = hasattr(module, "fused")
    if block is None:
        if has_fused:
            raise InputError(f"The network of '{path}' fuses node features but its model card lists none (preprocessing.node_features); "
                             "restore the card the model was exported with, or re-export it.")
        return
    if not has_fused:
        raise InputError(f"The model card of '{path}' asks for node-feature fusion ({block['fusion']}) but the network has no 'fused' method; "
                         "restore the model file as it was exported, or re-export it.")
    shape = card_input_shape(card)
    try:
        with torch.no_grad(), interpreted_execution():
            out = module.fused(torch.zeros((1, *shape), device=device), torch.zeros((1, len(block["names"])), device=device))
    except Exception as exc:  # noqa: BLE001 - any failure means the card does not describe this network's feature input
        detail = next((line.strip() for line in str(exc).splitlines() if line.strip() and "Traceback" not in line), type(exc).__name__)
        raise InputError(
            f"The model card of '{path}' does not fit its network: it lists {len(block['names'])} node features but the network's fused "
            f"method refuses them ({detail[:150]}); restore the card the model was exported with, or re-export it."
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1,):
        raise InputError(f"The fused method of '{path}' does not return one logit per node; export the model with LymphNodeClassifier.")


def _check_fused_export(eager: nn.Module, scripted: torch.jit.ScriptModule, example: torch.Tensor, card: dict) -> None:
    """The exported fused method reproduces the eager one (or nothing is written)."""
    block = card_fusion(card)
    if block is None:
        if hasattr(eager, "fused"):
            raise InputError("The model fuses node features but its card has no preprocessing.node_features; build the card with the training configuration.")
        return
    if not isinstance(eager, FusedNetwork) or eager.fusion != block["fusion"] or eager.n_features != len(block["names"]):
        raise InputError(f"The model does not fuse {len(block['names'])} node features by '{block['fusion']}' as its card says; fix the card before exporting.")
    generator = torch.Generator().manual_seed(1)
    features = torch.randn((example.shape[0], eager.n_features), generator=generator) * eager.feature_scale + eager.feature_mean
    features[0, 0] = float("nan")  # the imputation is exported too
    with torch.no_grad():
        expected, got = eager.fused(example, features), scripted.fused(example, features)
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
        raise RuntimeError("The exported TorchScript model's fused method does not reproduce the eager model's; the model was not written.")


# --------------------------------------------------------------------------------------------
# Device
# --------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cpu"``; ``"cuda"`` / ``"cuda:N"`` (must exist)."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise InputError(f"Unknown device {device!r}; use 'auto', 'cpu' or 'cuda'.")
    key = device.strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if key == "cpu":
        return torch.device("cpu")
    if key == "cuda" or key.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"Device '{device}' was requested but this PyTorch has no usable CUDA GPU; choose device 'auto' or 'cpu'.")
        resolved = torch.device(key)
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InputError(f"Device '{device}' does not exist (this machine has {torch.cuda.device_count()} CUDA device(s)); choose 'cuda' or 'auto'.")
        return resolved
    raise InputError(f"Unknown device '{device}'; use 'auto', 'cpu' or 'cuda'.")


# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------

# A model card is a plain JSON dict (``ModelCard``); ``validate_card`` is its schema.
ModelCard = dict


def expected_channels(views: str, mask_channel: bool) -> list[str]:
    """Channel names, in order, of a patch with these views (ARCHITECTURE.md, patch frame)."""
    if views not in VIEW_CHANNELS:
        raise InputError(f"Unknown views '{views}'; use one of: {', '.join(VIEW_CHANNELS)}.")
    return list(VIEW_CHANNELS[views]) + ([MASK_CHANNEL_NAME] if mask_channel else [])


class _CardError(Exception):
    pass


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(mapping: dict, key: str, where: str, check, what: str) -> Any:
    if key not in mapping:
        raise _CardError(f"{where}{key} is missing")
    value = mapping[key]
    if not check(value):
        raise _CardError(f"{where}{key} must be {what}, got {value!r}")
    return value


def _check_card(card: dict) -> None:
    str_ = lambda v: isinstance(v, str)  # noqa: E731
    dict_ = lambda v: isinstance(v, dict)  # noqa: E731
    for key in ("name", "description", "model_version", "label_definition", "created"):
        _require(card, key, "", str_, "a string")
    try:
        _dt.datetime.fromisoformat(card["created"])
    except ValueError:
        raise _CardError(f"created must be an ISO date such as 2024-05-01, got {card['created']!r}") from None
    _require(card, "decision_threshold", "", lambda v: _is_number(v) and 0.0 <= v <= 1.0, "a number in [0, 1]")

    pre = _require(card, "preprocessing", "", dict_, "an object")
    w = "preprocessing."
    low = _require(pre, "window_low", w, _is_number, "a number (HU)")
    high = _require(pre, "window_high", w, _is_number, "a number (HU)")
    if not high > low:
        raise _CardError(f"preprocessing.window_high ({high}) must be greater than window_low ({low})")
    _require(pre, "window_preset", w, str_, "a string")
    _require(pre, "spacing_mm", w, lambda v: isinstance(v, list) and len(v) == 3 and all(_is_number(s) and s > 0 for s in v), "a list of 3 positive numbers")
    _require(pre, "patch_size", w, lambda v: _is_int(v) and v >= 8, "an integer >= 8")
    _require(pre, "field_of_view_mm", w, lambda v: _is_number(v) and v > 0, "a positive number")
    views = _require(pre, "views", w, lambda v: v in VIEW_CHANNELS, f"one of {', '.join(VIEW_CHANNELS)}")
    if views == "triplanar_stack":
        _require(pre, "stack_offset_mm", w, lambda v: _is_number(v) and v > 0, "a positive number (mm)")
    mask = _require(pre, "mask_channel", w, lambda v: isinstance(v, bool), "true or false")
    channels = _require(pre, "channels", w, lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v), "a list of channel names")
    _require(pre, "air_hu", w, _is_number, "a number (HU)")
    if "tta" in pre:  # optional (older cards: none)
        _require(pre, "tta", w, lambda v: v in TTA_MODES, f"one of {', '.join(TTA_MODES)}")
    if "node_features" in pre:  # optional: a FusedNetwork (older cards: image only)
        _check_node_features_block(pre)
        if pre.get("tta", "none") != "none":  # the fused method runs on the plain patches only (fusion.predict_fused)
            raise _CardError(f"preprocessing.tta '{pre['tta']}' is not applied by a fused model (preprocessing.node_features); set tta to none")
    expected = expected_channels(views, mask)
    if channels != expected:
        raise _CardError(f"preprocessing.channels {channels} do not match views '{views}' with mask_channel={mask} (expected {expected})")

    arch = _require(card, "architecture", "", dict_, "an object")
    _require(arch, "name", "architecture.", lambda v: isinstance(v, str) and v in ARCHITECTURES, f"one of {', '.join(ARCHITECTURES)}")
    in_channels = _require(arch, "in_channels", "architecture.", lambda v: _is_int(v) and v >= 1, "a positive integer")
    _require(arch, "parameters", "architecture.", lambda v: _is_int(v) and v >= 0, "a non-negative integer")
    if in_channels != len(channels):
        raise _CardError(f"architecture.in_channels ({in_channels}) differs from the {len(channels)} preprocessing channels")
    if "ensemble" in arch:  # optional: a model.Ensemble of this architecture
        ensemble = _require(arch, "ensemble", "architecture.", dict_, "an object")
        _require(ensemble, "members", "architecture.ensemble.", lambda v: _is_int(v) and v >= 1, "a positive integer")
    if (arch["name"] in VOLUME_ARCHITECTURES) != (views == "volume"):
        raise _CardError(f"architecture.name {arch['name']} does not take '{views}' patches (3D architectures take views 'volume' only)")

    training = _require(card, "training", "", dict_, "an object")
    _require(training, "command", "training.", str_, "a string")
    _require(training, "seed", "training.", lambda v: v is None or _is_int(v), "an integer or null")
    _require(training, "epochs", "training.", lambda v: _is_int(v) and v >= 0, "a non-negative integer")
    dataset = _require(training, "dataset", "training.", dict_, "an object")
    for key in ("cases", "nodes"):
        if key in dataset:
            _require(dataset, key, "training.dataset.", lambda v: _is_int(v) and v >= 0, "a non-negative integer")
    if "fingerprint" in dataset:
        _require(dataset, "fingerprint", "training.dataset.", str_, "a string")

    metrics = _require(card, "metrics", "", dict_, "an object")
    for key in ("validation", "test", "held_out"):
        _require(metrics, key, "metrics.", lambda v: v is None or isinstance(v, dict), "an object or null")


def validate_card(card: Any, source: str | os.PathLike | None = None) -> dict:
    """Check a model card and return a normalised deep copy (numbers as float where they are floats).

    Raises InputError naming ``source`` (a file) when given. Unknown keys are kept (a newer writer of
    the same card version may add optional fields); an unknown ``card_version`` is refused.
    """
    what = f"The model card of '{source}'" if source is not None else "The model card"
    if not isinstance(card, dict):
        raise InputError(f"{what} is not a JSON object; re-export the model with LymphNodeClassifier.")
    version = card.get("card_version")
    if version is None:
        raise InputError(f"{what} has no card_version; re-export the model with LymphNodeClassifier.")
    if not _is_int(version) or version != CARD_VERSION:
        raise InputError(
            f"{what} was written by a newer/unknown LymphNodeClassifier (card version {version!r}); "
            "update the extension or re-export the model."
        )
    try:
        _check_card(card)
        text = json.dumps(card)
    except _CardError as exc:
        raise InputError(f"{what} is invalid: {exc}; re-export the model with LymphNodeClassifier.") from None
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} cannot be stored as JSON ({exc}); keep only numbers, strings, lists and objects in it.") from None
    out = json.loads(text)
    out["decision_threshold"] = float(out["decision_threshold"])
    pre = out["preprocessing"]
    for key in ("window_low", "window_high", "field_of_view_mm", "air_hu"):
        pre[key] = float(pre[key])
    pre["spacing_mm"] = [float(s) for s in pre["spacing_mm"]]
    return out


def new_card(
    *,
    architecture: str,
    preprocessing: dict,
    training: dict,
    metrics: dict | None = None,
    decision_threshold: float = 0.5,
    model_version: str = "1.0.0",
    name: str = "LymphNodeClassifier model",
    description: str = "",
    label_definition: str = DEFAULT_LABEL_DEFINITION,
    parameters: int = 0,
    created: str | None = None,
) -> dict:
    """Build and validate a version-1 card; ``architecture.in_channels`` follows from the channels.

    ``parameters`` is overwritten with the real count by ``export_torchscript``.
    """
    arch = _normalise_architecture(architecture)
    pre = dict(preprocessing)
    if "channels" not in pre and "views" in pre:
        pre["channels"] = expected_channels(pre["views"], bool(pre.get("mask_channel", False)))
    metrics = dict(metrics or {})
    for key in ("validation", "test", "held_out"):
        metrics.setdefault(key, {})
    card = {
        "card_version": CARD_VERSION,
        "name": name,
        "description": description,
        "model_version": model_version,
        "created": created or _dt.date.today().isoformat(),
        "label_definition": label_definition,
        "decision_threshold": decision_threshold,
        "preprocessing": pre,
        "architecture": {"name": arch, "in_channels": len(pre.get("channels", [])), "parameters": int(parameters)},
        "training": dict(training),
        "metrics": metrics,
    }
    return validate_card(card)


# --------------------------------------------------------------------------------------------
# TorchScript export / load
# --------------------------------------------------------------------------------------------


@contextmanager
def _quiet_jit() -> Iterator[None]:
    # TorchScript is the file format of this extension (loadable in Slicer without Python model
    # code and without pickle); recent PyTorch flags torch.jit.* as deprecated. Silence only that.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit.*")
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*")
        yield


@dataclass
class LoadedModel:
    """A TorchScript model in eval mode on ``device`` with its validated card."""

    module: torch.jit.ScriptModule
    card: dict
    device: torch.device
    path: Path | None = field(default=None)

    @property
    def in_channels(self) -> int:
        return int(self.card["architecture"]["in_channels"])

    @property
    def patch_size(self) -> int:
        return int(self.card["preprocessing"]["patch_size"])

    @property
    def decision_threshold(self) -> float:
        return float(self.card["decision_threshold"])


def _script_or_trace(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    try:
        with _quiet_jit():
            return torch.jit.script(model)
    except Exception as exc:  # noqa: BLE001 - any scripting failure falls back to tracing
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(
            f"torch.jit.script failed ({type(exc).__name__}: {reason}); exporting with torch.jit.trace "
            "instead, which records one execution path (data-dependent control flow is frozen).",
            RuntimeWarning,
            stacklevel=3,
        )
    plain = _without_exports(model)
    with torch.no_grad():
        fmap = plain.features(example)
    with _quiet_jit():
        return torch.jit.trace_module(plain, {"forward": example, "features": example, "head": fmap})


def _without_exports(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``@torch.jit.export`` methods are plain Python methods.

    Tracing compiles exported methods with the scripting compiler (the very thing that failed), so
    for the trace fallback every module's exported methods are shadowed by undecorated wrappers.
    """
    clone = copy.deepcopy(model)
    for module in clone.modules():
        cls = type(module)
        overrides = {}
        for name in dir(cls):
            item = getattr(cls, name, None)
            if callable(item) and getattr(item, "_torchscript_modifier", None) is torch._jit_internal.FunctionModifiers.EXPORT:
                overrides[name] = (lambda function: lambda self, *args: function(self, *args))(item)
        if overrides:
            module.__class__ = type(cls.__name__, (cls,), overrides)
    return clone


def export_torchscript(model: nn.Module, card: dict, path: str | os.PathLike) -> Path:
    """Write ``model`` (eval mode, on CPU) as TorchScript with ``card`` as ``model_card.json``.

    ``features`` and ``head`` are exported methods. ``architecture.parameters`` in the card is set
    to the real count. The file is written atomically; returns its path.
    """
    path = Path(path)
    for method in ("features", "head"):
        if not callable(getattr(model, method, None)):
            raise InputError(f"The model has no '{method}' method; build it with model.build_model so Grad-CAM can use it.")
    if not isinstance(card, dict):
        raise InputError("The model card must be a dict; build it with model.new_card.")
    card = copy.deepcopy(card)
    card.setdefault("architecture", {})
    if isinstance(card["architecture"], dict):
        card["architecture"]["parameters"] = count_parameters(model)
    card = validate_card(card)

    in_channels = int(getattr(model, "in_channels", card["architecture"]["in_channels"]))
    size = int(getattr(model, "size", card["preprocessing"]["patch_size"]))
    arch_name = getattr(model, "architecture_name", card["architecture"]["name"])
    if (arch_name, in_channels, size) != (card["architecture"]["name"], card["architecture"]["in_channels"], card["preprocessing"]["patch_size"]):
        raise InputError(
            f"The model ({arch_name}, {in_channels} channels, {size} px) does not match its card "
            f"({card['architecture']['name']}, {card['architecture']['in_channels']} channels, "
            f"{card['preprocessing']['patch_size']} px); fix the card before exporting."
        )

    eager = copy.deepcopy(model).to("cpu").eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.rand((2, *card_input_shape(card)), generator=generator)
    scripted = _script_or_trace(eager, example)
    scripted.eval()
    with torch.no_grad():
        expected = eager(example)
        got = scripted(example)
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
        raise RuntimeError("The exported TorchScript model does not reproduce the eager model's outputs; the model was not written.")
    _check_fused_export(eager, scripted, example, card)

    card["integrity"] = integrity_block(card, weights_digest(scripted))
    # same_name: torch.jit.save names the archive's top folder after the file it writes.
    with atomic_path(path, same_name=True) as tmp, _quiet_jit():
        torch.jit.save(scripted, str(tmp), _extra_files={CARD_FILE_NAME: json.dumps(card, indent=2)})
    return path


# --------------------------------------------------------------------------------------------
# Card integrity: the card records, at export, a digest of the weights, the input shape and a
# digest binding both to everything inference reads from the card (preprocessing, architecture,
# decision threshold). A card edited afterwards (patch size, spacing, channels) is refused at load
# instead of running the network on patches it was never trained on. Descriptive fields (name,
# description, metrics) stay editable. Cards exported before this check have no `integrity`
# block: they still get the zero-batch run below.


def weights_digest(module: nn.Module) -> str:
    """sha256 over the state dict's tensors (name, dtype, shape, bytes) in name order: recomputable from a loaded file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def card_input_shape(card: dict) -> list[int]:
    """(channels, size, size) of one patch as the card describes it; (channels, size, size, size) for views "volume"."""
    size = int(card["preprocessing"]["patch_size"])
    return [len(card["preprocessing"]["channels"])] + [size] * (3 if card["preprocessing"]["views"] == "volume" else 2)


def _bound_digest(card: dict, weights_sha256: str, input_shape: list[int]) -> str:
    bound = {
        "weights_sha256": weights_sha256, "input_shape": input_shape, "preprocessing": card["preprocessing"],
        "architecture": card["architecture"], "decision_threshold": card["decision_threshold"],
    }
    return hashlib.sha256(json.dumps(bound, sort_keys=True).encode()).hexdigest()


def integrity_block(card: dict, weights_sha256: str) -> dict:
    """The card's `integrity` entry for these weights (written by `export_torchscript`)."""
    shape = card_input_shape(card)
    return {"weights_sha256": weights_sha256, "input_shape": shape, "card_sha256": _bound_digest(card, weights_sha256, shape)}


def check_card_integrity(card: dict, path: Path | str) -> None:
    """Refuse a card changed after export (InputError, one line); a card without `integrity` passes (older exports)."""
    block = card.get("integrity")
    if block is None:
        return
    fix = "restore the model file as it was exported, or re-export the model with LymphNodeClassifier"
    if not (isinstance(block, dict) and isinstance(block.get("weights_sha256"), str) and isinstance(block.get("card_sha256"), str)
            and isinstance(block.get("input_shape"), list)):
        raise InputError(f"The model card of '{path}' has a damaged integrity entry; {fix}.")
    shape = card_input_shape(card)
    if shape != block["input_shape"]:
        raise InputError(
            f"The model card of '{path}' was changed after export: it describes {' x '.join(map(str, shape))} patches, "
            f"the network was exported for {' x '.join(map(str, block['input_shape']))}; {fix}."
        )
    if _bound_digest(card, block["weights_sha256"], block["input_shape"]) != block["card_sha256"]:
        raise InputError(
            f"The model card of '{path}' was changed after export (its preprocessing, architecture or decision threshold, "
            f"e.g. spacing_mm or the window, differ from what was exported); {fix}."
        )


def interpreted_execution():
    """The context every call of a loaded model runs in: TorchScript's interpreter without the
    profiling executor's optimisation pass. That pass profiles the first call and compiles on a
    later one, so a fresh process's first calls cost several times the later ones; these small
    networks spend their time in ATen's convolutions either way (bench/bench_classify.py: fresh
    process, 10 nodes, load with the zero-batch check 171 -> 83 ms, first predict 64 -> 36 ms,
    later ones 31 -> 30 ms). Scoped, so other TorchScript code in the process (Slicer) keeps its setting."""
    return torch.jit.optimized_execution(False)


def check_network_fits_card(module: torch.jit.ScriptModule, card: dict, path: Path | str, device: torch.device) -> None:
    """The recorded weights digest, then one run on a zero batch of the card's shape: the network must take it and return one logit."""
    block = card.get("integrity")
    if isinstance(block, dict) and weights_digest(module) != block.get("weights_sha256"):
        raise InputError(
            f"The weights of '{path}' are not the ones its model card was exported with; restore the model file as it was exported, or re-export it."
        )
    shape = card_input_shape(card)
    try:
        with torch.no_grad(), interpreted_execution():
            out = module(torch.zeros((1, *shape), device=device))
    except Exception as exc:  # noqa: BLE001 - any failure means the card does not describe this network's input
        detail = next((line.strip() for line in str(exc).splitlines() if line.strip() and "Traceback" not in line), type(exc).__name__)
        raise InputError(
            f"The model card of '{path}' does not fit its network: it runs on {' x '.join(map(str, shape))} patches "
            f"({card['preprocessing']['views']} views, mask channel {card['preprocessing']['mask_channel']}) but the network refuses them "
            f"({detail[:150]}); restore the card the model was exported with, or re-export it."
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1,):
        raise InputError(
            f"The network of '{path}' returns {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__} for one patch, "
            "not one logit; export the model with LymphNodeClassifier."
        )
    check_fused_network_fits_card(module, card, path, device)


def _not_a_model(path: Path, detail: str = "") -> InputError:
    extra = f" ({detail})" if detail else ""
    return InputError(f"'{path}' is not a LymphNodeClassifier model file{extra}; choose a .pt file exported by LymphNodeClassifier (TorchScript with a model card).")


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise InputError(f"Model file '{path}' does not exist; check the path.")
    if not path.is_file():
        raise InputError(f"Model path '{path}' is not a file; choose the exported .pt file.")


def _parse_card(raw: bytes | str, path: Path) -> dict:
    if not raw:
        raise InputError(f"'{path}' has no model card ({CARD_FILE_NAME}); re-export the model with LymphNodeClassifier.")
    try:
        card = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"The model card of '{path}' is not valid JSON; re-export the model with LymphNodeClassifier.") from None
    card = validate_card(card, source=path)
    check_card_integrity(card, path)
    return card


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model file with ``torch.jit.load`` only (never pickle) and validate its card."""
    path = Path(path)
    dev = resolve_device(device)
    _check_exists(path)
    extra = {CARD_FILE_NAME: ""}
    try:
        with _quiet_jit():
            module = torch.jit.load(str(path), map_location=dev, _extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a TorchScript archive"
        detail = "not a TorchScript archive" if isinstance(exc, RuntimeError) else type(exc).__name__
        raise _not_a_model(path, detail) from None
    card = _parse_card(extra[CARD_FILE_NAME], path)
    check_node_features_supported(card, path)
    for method in ("features", "head"):
        if not hasattr(module, method):
            raise _not_a_model(path, f"no exported '{method}' method")
    module.eval()
    check_network_fits_card(module, card, path, dev)
    return LoadedModel(module=module, card=card, device=dev, path=path)


def read_card(path: str | os.PathLike) -> dict:
    """The validated card of a model file, read from the archive without loading the weights."""
    path = Path(path)
    _check_exists(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            roots = {name.split("/", 1)[0] for name in names if "/" in name}
            if len(roots) != 1:
                raise _not_a_model(path, "not a TorchScript archive")
            root = roots.pop()
            required = (f"{root}/data.pkl", f"{root}/constants.pkl")
            if not all(name in names for name in required) or not any(n.startswith(f"{root}/code/") for n in names):
                raise _not_a_model(path, "not a TorchScript archive")
            card_name = f"{root}/extra/{CARD_FILE_NAME}"
            raw = archive.read(card_name) if card_name in names else b""
    except (zipfile.BadZipFile, OSError):
        raise _not_a_model(path, "not a TorchScript archive") from None
    return _parse_card(raw, path)
