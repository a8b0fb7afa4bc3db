"""Synthetic fine-tuning material for tests and the demo: a new concept and a control set.

The concept -- a checkered orange-and-black "toy" (a rounded square with a checkerboard face and a
dark outline) -- never occurs in the pretraining world, where every shape is one flat colour, so
a fine-tuning run that lowers its denoising loss more than the control set's has learned
something specific. Control images are ordinary pretraining-world scenes from a seed stream that
neither training nor the held-out split uses.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from services.tinymodel.data import BACKGROUNDS, SUPERSAMPLE, render, sample_scene

CONCEPT_COLOURS = ((250, 120, 20), (20, 20, 20))
CONCEPT_CHECKS = 4
CONTROL_SEED_OFFSET = 90_000_000


def _concept(side: int, rng: np.random.Generator) -> Image.Image:
    background = BACKGROUNDS[str(rng.choice(list(BACKGROUNDS)))]
    canvas = Image.new("RGB", (side, side), background)
    half = side * rng.uniform(0.22, 0.34)
    cx = side * rng.uniform(0.5 - (0.48 - half / side), 0.5 + (0.48 - half / side))
    cy = side * rng.uniform(0.5 - (0.48 - half / side), 0.5 + (0.48 - half / side))
    face = Image.new("RGB", (int(2 * half), int(2 * half)))
    draw = ImageDraw.Draw(face)
    cell = face.width / CONCEPT_CHECKS
    for i in range(CONCEPT_CHECKS):
        for j in range(CONCEPT_CHECKS):
            box = (i * cell, j * cell, (i + 1) * cell, (j + 1) * cell)
            draw.rectangle(box, fill=CONCEPT_COLOURS[(i + j) % 2])
    mask = Image.new("L", face.size, 0)
    ImageDraw.Draw(mask).rounded_rectangle((0, 0, face.width - 1, face.height - 1), radius=face.width // 5,
                                           fill=255)
    angle = float(rng.uniform(-20, 20))
    face, mask = face.rotate(angle, expand=True), mask.rotate(angle, expand=True)
    canvas.paste(face, (int(cx - face.width / 2), int(cy - face.height / 2)), mask)
    return canvas


def make_concept_images(n: int, seed: int = 0, size: int = 64) -> list[Image.Image]:
    """`n` RGB images (side `size`) of the checkered toy on varied backgrounds, poses and scales."""
    rng = np.random.default_rng(seed)
    return [_concept(size * SUPERSAMPLE, rng).resize((size, size), Image.Resampling.BOX) for _ in range(n)]


def make_control_images(n: int, seed: int = 0, size: int = 64) -> list[tuple[Image.Image, str]]:
    """`n` ordinary pretraining-world scenes with their full captions (a control set)."""
    rng = np.random.default_rng(CONTROL_SEED_OFFSET + seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    return [(render(scene, size), scene.full_caption()) for scene in scenes]
