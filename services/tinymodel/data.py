"""Procedurally drawn, captioned images: the tiny model's whole pretraining world.

One coloured shape on a plain background, at one of nine positions and three sizes, captioned in
plain English ("a small red circle on a white background, top left"). Captions are sometimes
shortened or dropped so short prompts ("a red circle") are in-distribution and the empty prompt
is learned for classifier-free guidance. Everything is numpy + PIL and seeded, so a seed fully
determines a batch; the held-out split uses its own fixed seed stream that training never draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

Colour = tuple[int, int, int]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring", "star")
COLOURS: dict[str, Colour] = {
    "red": (215, 30, 35),
    "green": (35, 165, 60),
    "blue": (35, 70, 215),
    "yellow": (240, 215, 35),
    "orange": (245, 135, 25),
    "purple": (135, 45, 175),
    "pink": (240, 135, 190),
    "cyan": (40, 195, 215),
}
BACKGROUNDS: dict[str, Colour] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (120, 80, 45),
    "green": (60, 120, 70),
    "yellow": (235, 220, 140),
}
# name -> centre as a fraction of the side
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.3, 0.3),
    "top": (0.5, 0.3),
    "top right": (0.7, 0.3),
    "left": (0.3, 0.5),
    "center": (0.5, 0.5),
    "right": (0.7, 0.5),
    "bottom left": (0.3, 0.7),
    "bottom": (0.5, 0.7),
    "bottom right": (0.7, 0.7),
}
# name -> radius as a fraction of the side; "" is the unnamed medium size. Shapes are large
# (13-36% of the image) so that their colour, the thing prompts control, dominates the pixels.
SIZES: dict[str, float] = {"small": 0.2, "": 0.27, "large": 0.34}
PREFIXES: tuple[str, ...] = ("", "a photo of ", "a picture of ", "a drawing of ")
HELD_OUT_SEED = 7_000_003
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """Everything that determines one image and its full caption."""

    shape: str
    colour: str
    background: str
    position: str
    size: str
    dx: float
    dy: float
    scale: float
    angle: float

    def full_caption(self) -> str:
        """The caption naming every attribute of the scene."""
        size = f"{self.size} " if self.size else ""
        return f"a {size}{self.colour} {self.shape} on a {self.background} background, {self.position}"


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw one scene uniformly over the attribute grid, with small continuous jitter."""
    colour = str(rng.choice(list(COLOURS)))
    backgrounds = [b for b in BACKGROUNDS if b != colour]
    return Scene(
        shape=str(rng.choice(SHAPES)),
        colour=colour,
        background=str(rng.choice(backgrounds)),
        position=str(rng.choice(list(POSITIONS))),
        size=str(rng.choice(list(SIZES))),
        dx=float(rng.uniform(-0.04, 0.04)),
        dy=float(rng.uniform(-0.04, 0.04)),
        scale=float(rng.uniform(0.9, 1.1)),
        angle=float(rng.uniform(-0.3, 0.3)),
    )


def training_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption variant: full, shortened, prefixed, or empty (for classifier-free guidance)."""
    roll = rng.random()
    if roll < 0.08:
        return ""
    size = f"{scene.size} " if scene.size else ""
    if roll < 0.55:
        core = scene.full_caption()
    elif roll < 0.7:
        core = f"a {size}{scene.colour} {scene.shape}, {scene.position}"
    elif roll < 0.85:
        core = f"a {size}{scene.colour} {scene.shape} on a {scene.background} background"
    else:
        core = f"a {scene.colour} {scene.shape}"
    return str(rng.choice(PREFIXES)) + core


def _polygon(cx: float, cy: float, r: float, n: int, angle: float, inner: float = 1.0) -> list[tuple]:
    """Vertices of a regular polygon (or a star when inner < 1) around (cx, cy)."""
    points = []
    steps = n * 2 if inner < 1.0 else n
    for i in range(steps):
        radius = r * (inner if i % 2 else 1.0) if inner < 1.0 else r
        theta = angle - math.pi / 2 + 2 * math.pi * i / steps
        points.append((cx + radius * math.cos(theta), cy + radius * math.sin(theta)))
    return points


def _cross(cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    """A plus-sign outline, rotated by angle."""
    w = r * 0.38
    outline = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
               (-r, -w), (-w, -w)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in outline]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float,
               fill: Colour, background: Colour) -> None:
    """Draw one named shape centred at (cx, cy) with radius r (pixels of the canvas)."""
    if shape in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        if shape == "ring":  # punch the hole with the background colour
            hole = r * 0.55
            draw.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=background)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.15, 4, angle + math.pi / 4), fill=fill)
    elif shape == "diamond":
        pts = _polygon(cx, cy, r * 1.15, 4, angle)
        draw.polygon([(cx + (x - cx) * 0.75, y) for x, y in pts], fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r * 1.2, 3, angle), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r * 1.25, 5, angle, inner=0.45), fill=fill)
    elif shape == "cross":
        draw.polygon(_cross(cx, cy, r * 1.1, angle), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, resolution: int) -> Image.Image:
    """Render a scene as an RGB image of side `resolution` (anti-aliased by supersampling)."""
    side = resolution * SUPERSAMPLE
    background = BACKGROUNDS[scene.background]
    canvas = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(canvas)
    fx, fy = POSITIONS[scene.position]
    cx, cy = (fx + scene.dx) * side, (fy + scene.dy) * side
    r = SIZES[scene.size] * scene.scale * side
    draw_shape(draw, scene.shape, cx, cy, r, scene.angle, COLOURS[scene.colour], background)
    return canvas.resize((resolution, resolution), Image.Resampling.BOX)


def to_array(images: list[Image.Image]) -> np.ndarray:
    """Stack PIL images into float32 NCHW in [-1, 1], the range the VAE works in."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return (arr / 127.5 - 1.0).transpose(0, 3, 1, 2).copy()


class ShapesStream:
    """An endless, seeded stream of (images, captions) training batches."""

    def __init__(self, seed: int, resolution: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._resolution = resolution

    def batch(self, size: int) -> tuple[np.ndarray, list[str]]:
        """The next `size` images (NCHW, [-1, 1]) with their training captions."""
        scenes = [sample_scene(self._rng) for _ in range(size)]
        captions = [training_caption(s, self._rng) for s in scenes]
        return to_array([render(s, self._resolution) for s in scenes]), captions


def held_out(count: int, resolution: int) -> tuple[np.ndarray, list[str]]:
    """The fixed held-out evaluation set: `count` scenes with full captions, never trained on."""
    rng = np.random.default_rng(HELD_OUT_SEED)
    scenes = [sample_scene(rng) for _ in range(count)]
    return to_array([render(s, resolution) for s in scenes]), [s.full_caption() for s in scenes]


def caption_words() -> list[str]:
    """Every word the caption grammar can produce, in a fixed order (tokenizer corpus)."""
    parts = [*SHAPES, *COLOURS, *BACKGROUNDS, *POSITIONS, *SIZES, *PREFIXES, "a on background"]
    words: dict[str, None] = {}
    for part in parts:
        for word in part.split():
            words.setdefault(word, None)
    return list(words)
