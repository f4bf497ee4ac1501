"""Window presets and the HU -> [0, 1] mapping."""

import numpy as np
import pytest

from LymphNodeClassifierLib.errors import InputError
from LymphNodeClassifierLib.windowing import DEFAULT_WINDOW_PRESET, WINDOW_PRESETS, apply_window, resolve_window


def test_presets_match_radiology_width_level():
    # (width, level) from Radiopaedia's windowing table, independent of the code's arithmetic
    expected_width_level = {"abdomen": (350, 40), "mediastinum": (350, 50), "neck": (400, 40)}
    assert DEFAULT_WINDOW_PRESET == "abdomen"
    assert resolve_window(DEFAULT_WINDOW_PRESET) == (-135.0, 215.0)
    for name, (width, level) in expected_width_level.items():
        low, high = resolve_window(name)
        assert high - low == pytest.approx(width)
        assert (low + high) / 2 == pytest.approx(level)
    assert set(WINDOW_PRESETS) == set(expected_width_level)


def test_preset_names_are_case_insensitive():
    assert resolve_window("Mediastinum") == resolve_window("mediastinum")


def test_custom_window():
    assert resolve_window("custom", -50, 150) == (-50.0, 150.0)


@pytest.mark.parametrize("low, high", [(100, 100), (200, -100), (None, 100), (-100, None), (float("nan"), 10)])
def test_custom_window_needs_low_below_high(low, high):
    with pytest.raises(InputError):
        resolve_window("custom", low, high)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(InputError) as error:
        resolve_window("lung-ish")
    message = str(error.value)
    for name in [*WINDOW_PRESETS, "custom"]:
        assert name in message
    assert "\n" not in message and message.endswith(".")  # one sentence


def test_apply_window_maps_linearly_and_clips():
    hu = np.array([-1000.0, -135.0, 40.0, 215.0, 3000.0], dtype=np.float64)
    windowed = apply_window(hu, -135, 215)
    assert windowed.dtype == np.float32
    np.testing.assert_allclose(windowed, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    assert windowed.min() >= 0.0 and windowed.max() <= 1.0


def test_apply_window_keeps_shape_and_does_not_modify_input():
    hu = np.random.default_rng(0).normal(0, 300, size=(3, 4, 5)).astype(np.float32)
    original = hu.copy()
    windowed = apply_window(hu, -100, 100)
    assert windowed.shape == hu.shape
    np.testing.assert_array_equal(hu, original)
    inside = (hu > -100) & (hu < 100)
    np.testing.assert_allclose(windowed[inside], (hu[inside] + 100) / 200, atol=1e-6)


def test_apply_window_rejects_inverted_window():
    with pytest.raises(InputError):
        apply_window(np.zeros(3), 10, -10)
