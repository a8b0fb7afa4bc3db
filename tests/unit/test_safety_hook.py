"""The safety hook's loading rules and screening, without a server."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.config import Settings
from services.inference.safety import SafetyHook, load_checker, mean_brightness_above, parse_options

EXAMPLE = "services.inference.safety:mean_brightness_above"


def test_empty_setting_is_off_and_passes_pixels_through() -> None:
    hook = SafetyHook.from_settings(Settings(safety_checker="  "))
    pixels = np.full((8, 8, 3), 255, np.uint8)
    assert not hook.enabled
    out, flagged = hook.screen(pixels)
    assert out is pixels and not flagged


def test_settings_name_the_checker_and_its_options() -> None:
    hook = SafetyHook.from_settings(Settings(safety_checker=EXAMPLE, safety_checker_options='{"threshold": 100}'))
    bright, dark = np.full((8, 8, 3), 101, np.uint8), np.full((8, 8, 3), 100, np.uint8)
    (out, flagged), (kept, clean) = hook.screen_all([bright, dark])
    assert flagged and out.shape == bright.shape and out.dtype == np.uint8 and not out.any()
    assert not clean and kept is dark
    assert bright.min() == 101  # the caller's array is untouched


@pytest.mark.parametrize("spec", ["no-colon", "services.inference.safety:", ":f", "no_such_module_xyz:f",
                                  "services.inference.safety:no_such_function", "services.inference.safety:np.pi"])
def test_bad_checker_names_fail_at_start_up(spec: str) -> None:
    with pytest.raises(ValueError, match="safety_checker"):
        load_checker(spec)


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]", '"threshold"'])
def test_options_must_be_a_json_object(raw: str) -> None:
    with pytest.raises(ValueError, match="safety_checker_options"):
        parse_options(raw)
    with pytest.raises(ValueError):
        SafetyHook.from_settings(Settings(safety_checker=EXAMPLE, safety_checker_options=raw))


def test_checker_sees_a_read_only_view() -> None:
    def scribbler(image: np.ndarray) -> bool:
        image[0, 0, 0] = 1
        return False

    pixels = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="read-only"):
        SafetyHook(scribbler).screen(pixels)
    assert pixels.flags.writeable
    assert not pixels.any()


def test_example_checker_threshold() -> None:
    image = np.full((4, 4, 3), 200, np.uint8)
    assert not mean_brightness_above(image)  # default threshold 200: strictly above
    assert mean_brightness_above(image, threshold=199.5)
    assert load_checker(EXAMPLE) is mean_brightness_above
