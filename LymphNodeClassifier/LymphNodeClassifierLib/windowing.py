"""CT intensity windows: named presets and the HU -> [0, 1] mapping used for patches.

A window is a `(low_hu, high_hu)` pair: HU at or below `low_hu` map to 0, at or above
`high_hu` to 1, linearly in between.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError


def _from_width_level(width: float, level: float) -> tuple[float, float]:
    """Turn a radiology (width, level) pair into a (low_hu, high_hu) window."""
    return (level - width / 2.0, level + width / 2.0)


# Values from Radiopaedia, "Windowing (CT)" (https://radiopaedia.org/articles/windowing-ct):
#   abdomen soft tissue W350 L40 (Radiopaedia gives W350-400 L20-60; W350 L40 is the usual choice),
#   mediastinum W350 L50, neck soft tissue W350-400 L20-60 (here W400 L40).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": _from_width_level(350.0, 40.0),      # (-135, 215)
    "mediastinum": _from_width_level(350.0, 50.0),  # (-125, 225)
    "neck": _from_width_level(400.0, 40.0),         # (-160, 240)
}
DEFAULT_WINDOW_PRESET = "abdomen"
CUSTOM_WINDOW = "custom"


def resolve_window(preset: str, low: float | None = None, high: float | None = None) -> tuple[float, float]:
    """Return the `(low_hu, high_hu)` window for a preset name, or for `"custom"` the given bounds."""
    name = str(preset).strip().lower()
    if name == CUSTOM_WINDOW:
        if low is None or high is None:
            raise InputError("The custom window needs both a low and a high HU value; give both, e.g. low=-135 high=215.")
        low_hu, high_hu = float(low), float(high)
        if not (math.isfinite(low_hu) and math.isfinite(high_hu)) or not low_hu < high_hu:
            raise InputError(
                f"The custom window low ({low}) must be a finite HU value below high ({high}); swap or fix the values."
            )
        return (low_hu, high_hu)
    if name not in WINDOW_PRESETS:
        valid = ", ".join([*WINDOW_PRESETS, CUSTOM_WINDOW])
        raise InputError(f"Unknown window preset '{preset}'; use one of: {valid}.")
    return WINDOW_PRESETS[name]


def apply_window(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map HU values linearly so `low` -> 0 and `high` -> 1, clipped to [0, 1], as float32."""
    low_hu, high_hu = float(low), float(high)
    if not low_hu < high_hu:
        raise InputError(f"The window low ({low}) must be below high ({high}); fix the window values.")
    scaled = (np.asarray(hu, dtype=np.float32) - np.float32(low_hu)) / np.float32(high_hu - low_hu)
    return np.clip(scaled, 0.0, 1.0, out=scaled)
