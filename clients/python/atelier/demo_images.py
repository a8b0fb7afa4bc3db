"""Pictures for the demo: procedurally drawn concept images and a labelled contact sheet."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUNDS = [(235, 235, 235), (40, 90, 160), (60, 140, 70), (200, 160, 110), (150, 60, 60), (30, 30, 30)]


def concept_images(count: int, size: int = 64, seed: int = 0, pattern: str = "checker") -> list[Image.Image]:
    """One distinctive object (a chequered or striped disc) on varied backgrounds and angles."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        background = BACKGROUNDS[index % len(BACKGROUNDS)]
        image = Image.new("RGB", (size, size), background)
        mask = Image.new("L", (size, size), 0)
        radius = size * rng.uniform(0.28, 0.36)
        cx, cy = size / 2 + rng.uniform(-6, 6), size / 2 + rng.uniform(-6, 6)
        ImageDraw.Draw(mask).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
        image.paste(_pattern_tile(size, rng.uniform(0, math.pi), pattern), (0, 0), mask)
        images.append(image)
    return images


def _pattern_tile(size: int, angle: float, pattern: str) -> Image.Image:
    """A rotated high-contrast pattern: yellow/black chequers or magenta/white stripes."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) - size / 2
    u = xs * math.cos(angle) + ys * math.sin(angle)
    v = -xs * math.sin(angle) + ys * math.cos(angle)
    period = max(size // 8, 2)
    if pattern == "checker":
        on = ((np.floor(u / period) + np.floor(v / period)) % 2) == 0
        colours = (np.array([250, 210, 20]), np.array([15, 15, 15]))
    else:
        on = (np.floor(u / period) % 2) == 0
        colours = (np.array([230, 40, 200]), np.array([250, 250, 250]))
    pixels = np.where(on[..., None], colours[0], colours[1]).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def save_all(images: list[Image.Image], directory: Path, stem: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = directory / f"{stem}-{index}.png"
        image.save(path)
        paths.append(path)
    return paths


def contact_sheet(items: list[tuple[str, Image.Image]], cell: int = 128, columns: int = 4) -> Image.Image:
    """A grid of upscaled images, each with its label underneath."""
    rows = math.ceil(len(items) / columns)
    label_height = 14
    sheet = Image.new("RGB", (columns * cell, rows * (cell + label_height)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for index, (label, image) in enumerate(items):
        x, y = (index % columns) * cell, (index // columns) * (cell + label_height)
        sheet.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        draw.text((x + 2, y + cell + 1), label[:22], fill=(0, 0, 0), font=font)
    return sheet
