"""Batched inference with a loaded model: patches → probability of the metastatic class.

The patches must have been made with the card's preprocessing (``card["preprocessing"]``); this
module checks what it can see (channels, size, value range) and refuses anything else.

Test-time augmentation: a card with ``preprocessing.tta`` ("flips", "flips+rot90"; see
``model.TTA_MODES``) gets each node's logit averaged over those transformed copies of its patch;
a card without it (every card written before it existed) or with "none" is one plain call. A
model file holding a ``model.Ensemble`` needs nothing here: its forward is the members' mean.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from .errors import InputError
from .model import LoadedModel, card_tta, check_tta_mode, interpreted_execution, tta_logits


def check_patches(patches: np.ndarray, card: dict | None = None) -> np.ndarray:
    """Validate ``(N, C, H, W)`` patches (against the card when given); return them as float32.

    Values must be finite and in [0, 1] (windowed HU, see windowing.py).
    """
    if isinstance(patches, torch.Tensor):
        patches = patches.detach().cpu().numpy()
    patches = np.asarray(patches)
    if patches.ndim != 4:
        raise InputError(f"Patches must be an array of shape (N, channels, size, size), got shape {patches.shape}; stack the per-node patches with numpy.stack.")
    if not np.issubdtype(patches.dtype, np.floating):
        raise InputError(f"Patches must be floating point in [0, 1], got dtype {patches.dtype}; window the CT with windowing.py before classifying.")
    if card is not None:
        channels = int(card["architecture"]["in_channels"])
        size = int(card["preprocessing"]["patch_size"])
        names = card["preprocessing"].get("channels", [])
        if patches.shape[1:] != (channels, size, size):
            raise InputError(
                f"Patches of shape {patches.shape[1:]} per node do not match the model, which expects "
                f"({channels}, {size}, {size}) (channels {names}); extract the patches with the model card's preprocessing."
            )
    elif patches.shape[2] != patches.shape[3]:
        raise InputError(f"Patches must be square, got {patches.shape[2]}x{patches.shape[3]} pixels; extract them with patches.extract_patches.")
    patches = np.ascontiguousarray(patches, dtype=np.float32)
    if patches.size:
        if not np.isfinite(patches).all():
            raise InputError("Patches contain NaN or infinite values; check the CT image and re-extract the patches.")
        low, high = float(patches.min()), float(patches.max())
        if low < -1e-3 or high > 1.0 + 1e-3:
            raise InputError(f"Patch values range from {low:g} to {high:g} but must lie in [0, 1]; window the CT (windowing.py) before classifying.")
    return patches


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"The batch size must be a positive integer, got {batch_size!r}; use e.g. 32.")
    return int(batch_size)


@contextmanager
def deterministic() -> Iterator[None]:
    """Ask PyTorch for deterministic algorithms (warn-only) for the duration; restore afterwards.

    On CPU the kernels used here are deterministic anyway; this also guards a CUDA run against
    non-deterministic algorithm choices without turning a missing deterministic kernel into an error.
    """
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_benchmark = torch.backends.cudnn.benchmark
    _set_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        _set_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.backends.cudnn.benchmark = cudnn_benchmark


def _set_deterministic_algorithms(mode: bool, warn_only: bool) -> None:
    # torch.use_deterministic_algorithms also sets Inductor's config, importing torch._inductor
    # (dynamo, sympy): 1-3 s, most of a fresh process's first classification. Nothing here
    # compiles with Inductor, so set only the ATen flag unless Inductor is loaded already.
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None or "torch._inductor" in sys.modules:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        setter(mode, warn_only=warn_only)


def predict_logits(loaded_model: LoadedModel, patches: np.ndarray, batch_size: int = 32, tta: str | None = None) -> np.ndarray:
    """Logits ``(N,)`` (float32) of the metastatic class, computed in batches, averaged over the
    test-time augmentation ``tta`` (default: the card's ``preprocessing.tta``; "none" without it)."""
    if not isinstance(loaded_model, LoadedModel):
        raise TypeError("predict needs a LoadedModel from model.load_model")
    batch_size = _check_batch_size(batch_size)
    mode = card_tta(loaded_model.card) if tta is None else check_tta_mode(tta)
    patches = check_patches(patches, loaded_model.card)
    module = loaded_model.module
    module.eval()
    with deterministic(), interpreted_execution():
        return _batched_logits(module, patches, batch_size, mode, loaded_model.device)


def eager_logits(model: torch.nn.Module, patches: np.ndarray | torch.Tensor, tta: str = "none", batch_size: int = 256) -> np.ndarray:
    """Logits ``(N,)`` (float32) of an eager model (put in eval mode) with test-time augmentation
    ``tta``: what its TorchScript export with that card would return (cross-validation folds)."""
    model.eval()
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    patches = patches.detach().cpu().numpy() if isinstance(patches, torch.Tensor) else patches
    with deterministic():
        return _batched_logits(model, np.ascontiguousarray(patches, dtype=np.float32), batch_size, check_tta_mode(tta), device)


def _batched_logits(module, patches: np.ndarray, batch_size: int, tta: str, device: torch.device) -> np.ndarray:
    out = np.empty((patches.shape[0],), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, patches.shape[0], batch_size):
            batch = torch.from_numpy(patches[start:start + batch_size]).to(device)
            logits = tta_logits(module, batch, tta)
            out[start:start + batch.shape[0]] = logits.float().cpu().numpy()
    return out


def predict(loaded_model: LoadedModel, patches: np.ndarray, batch_size: int = 32, tta: str | None = None) -> np.ndarray:
    """Probabilities ``(N,)`` (float64, sigmoid of the logits) that each node is metastatic
    (``tta`` as for ``predict_logits``: by default the card's)."""
    logits = predict_logits(loaded_model, patches, batch_size, tta).astype(np.float64)
    return 1.0 / (1.0 + np.exp(-logits))
