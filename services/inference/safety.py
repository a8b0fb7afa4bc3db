"""The optional content-safety hook: every generated image is checked before it leaves the server.

Off by default. `ATELIER_SAFETY_CHECKER=package.module:function` names a callable
`f(image, **options) -> bool`, called once per image with the final pixels as a read-only
HxWx3 uint8 numpy array (`PIL.Image.fromarray(image)` gives a PIL image) and the keyword
arguments of `ATELIER_SAFETY_CHECKER_OPTIONS` (a JSON object). A true result flags the image:
it is replaced by a black image of the same size and `GeneratedImage.safety_flagged` is set (its
seed is still reported, so the caller knows which one was withheld).

No model weights ship with it: a real checker (CLIP-based or a remote moderation call) is the
operator's own module on the image's PYTHONPATH. `mean_brightness_above` below is a trivial
example for tests and docs. A checker that raises fails the request (INTERNAL): an image that
could not be checked never leaves the server. A bad setting (not importable, not callable,
options not a JSON object) stops the server at start-up rather than serving unchecked.
The checker runs on the inference I/O thread pool, off the event loop and the device thread.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from services.common.config import Settings

Checker = Callable[..., Any]


def load_checker(spec: str) -> Checker:
    """`module:function` (dots allowed in function, for class attributes) -> the callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise ValueError(f"safety_checker {spec!r}: expected module:function")
    try:
        target: Any = importlib.import_module(module_name.strip())
        for part in attr.strip().split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"safety_checker {spec!r}: {exc}") from exc
    if not callable(target):
        raise ValueError(f"safety_checker {spec!r} is not callable")
    return target  # type: ignore[no-any-return]


def parse_options(raw: str) -> dict[str, Any]:
    try:
        options = json.loads(raw or "{}")
    except ValueError as exc:
        raise ValueError(f"safety_checker_options is not JSON: {exc}") from exc
    if not isinstance(options, dict):
        raise ValueError("safety_checker_options must be a JSON object of keyword arguments")
    return options


class SafetyHook:
    """Screens images with the configured checker; a no-op when none is configured."""

    def __init__(self, checker: Checker | None = None, options: dict[str, Any] | None = None) -> None:
        self._checker = checker
        self._options = dict(options or {})

    @classmethod
    def from_settings(cls, settings: Settings) -> SafetyHook:
        if not settings.safety_checker.strip():
            return cls()
        return cls(load_checker(settings.safety_checker), parse_options(settings.safety_checker_options))

    @property
    def enabled(self) -> bool:
        return self._checker is not None

    def screen(self, pixels: np.ndarray) -> tuple[np.ndarray, bool]:
        """(pixels to send, flagged): a flagged image comes back black, same shape."""
        if self._checker is None:
            return pixels, False
        view = pixels.view()
        view.flags.writeable = False  # the checker sees the pixels but cannot change what is sent
        if bool(self._checker(view, **self._options)):
            return np.zeros_like(pixels), True
        return pixels, False

    def screen_all(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, bool]]:
        return [self.screen(p) for p in images]


def mean_brightness_above(image: np.ndarray, threshold: float = 200.0) -> bool:
    """Example checker (no model): flags images whose mean 8-bit pixel value exceeds `threshold`.

    `ATELIER_SAFETY_CHECKER=services.inference.safety:mean_brightness_above`,
    `ATELIER_SAFETY_CHECKER_OPTIONS={"threshold": 120}`.
    """
    return float(np.asarray(image, dtype=np.float64).mean()) > float(threshold)
