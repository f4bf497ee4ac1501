"""Small builders shared by the test suites (imported as `helpers`; pytest puts Testing/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from LymphNodeClassifierLib.model import build_model, export_torchscript, new_card


def rotation(axis: int, degrees: float) -> np.ndarray:
    """Right-handed rotation matrix about x (0), y (1) or z (2)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


TILTED = rotation(0, 15) @ rotation(1, 15)


def export_untrained_model(path: Path, size: int = 64, spacing_mm: float = 0.79, seed: int = 0, name: str = "untrained test model") -> Path:
    """A real TorchScript model with a complete card and random weights: enough to test the plumbing."""
    torch.manual_seed(seed)
    model = build_model("custom_cnn", 3, size).eval()
    card = new_card(
        architecture="custom_cnn",
        preprocessing={
            "window_low": -135.0, "window_high": 215.0, "window_preset": "abdomen", "spacing_mm": [spacing_mm] * 3,
            "patch_size": size, "field_of_view_mm": size * spacing_mm, "views": "triplanar", "mask_channel": False,
            "air_hu": -1024.0,
        },
        training={"command": "untrained test model", "seed": seed, "epochs": 0, "dataset": {}},
        name=name,
    )
    return export_torchscript(model, card, path)
