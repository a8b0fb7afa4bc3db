"""Training images: load, resize, crop, flip, normalise (PIL + numpy, no torchvision).

The reference recipes resize the short side to the resolution (bilinear), then centre- or
random-crop a square, optionally flip, and normalise to [-1, 1]. Because the VAE is frozen in
every method, we pre-encode every *view* an image can take instead of re-encoding per step:
a view is (crop offset, flip). Random crops choose among at most `MAX_CROP_POSITIONS` evenly
spaced offsets along the long side (the reference chooses any pixel offset); square images
have exactly one crop. Which view a step uses is a pure function of (seed, step, micro-batch),
so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from services.common.images import convert_pixels

MAX_CROP_POSITIONS = 8


@dataclass(frozen=True)
class View:
    """One deterministic augmentation of one image: crop top-left corner and horizontal flip."""

    image_index: int
    left: int
    top: int
    flip: bool


def load_rgb(path: Path) -> Image.Image:
    """Decode, apply EXIF orientation (as the recipe does) and convert to RGB."""
    with Image.open(path) as raw:
        return convert_pixels(ImageOps.exif_transpose(raw), "RGB")


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Scale so the short side equals `size` (bilinear, like transforms.Resize(size))."""
    w, h = img.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img if new == (w, h) else img.resize(new, Image.Resampling.BILINEAR)


def crop_offsets(length: int, size: int, center: bool) -> list[int]:
    """Candidate crop starts along one axis: the centre, or evenly spaced positions."""
    span = length - size
    if span <= 0:
        return [0]
    if center:
        return [span // 2]
    count = min(MAX_CROP_POSITIONS, span + 1)
    return sorted({round(i * span / (count - 1)) for i in range(count)})


def image_views(index: int, img: Image.Image, size: int, center: bool, flip: bool) -> list[View]:
    """Every view an already-resized image can take under the crop/flip settings."""
    w, h = img.size
    flips = (False, True) if flip else (False,)
    return [
        View(index, left, top, f)
        for left in crop_offsets(w, size, center)
        for top in crop_offsets(h, size, center)
        for f in flips
    ]


def render_view(img: Image.Image, view: View, size: int) -> np.ndarray:
    """Crop/flip one view and normalise to a float32 CHW array in [-1, 1]."""
    crop = img.crop((view.left, view.top, view.left + size, view.top + size))
    if view.flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(crop, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


@dataclass
class ViewSet:
    """All views of a list of images, with their pixels ready for the VAE."""

    views: list[View]
    pixels: np.ndarray  # [num_views, 3, size, size] float32 in [-1, 1]
    by_image: list[list[int]]  # image index -> indices into `views`


def build_views(paths: list[Path], size: int, center_crop: bool, random_flip: bool) -> ViewSet:
    """Load every image once and render all of its views."""
    views: list[View] = []
    arrays: list[np.ndarray] = []
    by_image: list[list[int]] = []
    for i, path in enumerate(paths):
        img = resize_short_side(load_rgb(path), size)
        mine = image_views(i, img, size, center_crop, random_flip)
        by_image.append(list(range(len(views), len(views) + len(mine))))
        views.extend(mine)
        arrays.extend(render_view(img, v, size) for v in mine)
    return ViewSet(views, np.stack(arrays), by_image)


def step_rng(seed: int, step: int, micro: int, stream: int) -> np.random.Generator:
    """A generator that depends only on (seed, step, micro-batch, stream)."""
    return np.random.default_rng([seed, step, micro, stream])


def sample_indices(seed: int, count: int, batch: int, position: int) -> list[int]:
    """Items `position .. position+batch-1` of an endless stream of per-epoch shuffles.

    Epoch `e` is the permutation `default_rng([seed, e])` draws, like a shuffling DataLoader
    whose order is reproducible from the sample position alone.
    """
    perms: dict[int, np.ndarray] = {}
    out: list[int] = []
    for p in range(position, position + batch):
        epoch, offset = divmod(p, count)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch, 1]).permutation(count)
        out.append(int(perms[epoch][offset]))
    return out


def choose_views(view_set: ViewSet, image_indices: list[int], rng: np.random.Generator) -> list[int]:
    """Pick one random view of each chosen image."""
    return [int(rng.choice(view_set.by_image[i])) for i in image_indices]
