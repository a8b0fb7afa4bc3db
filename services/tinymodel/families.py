"""Tiny random pipelines of every model family, with the project's own CLIP tokenizer.

SD 1.x is the project's tiny SD (services.tinymodel.pipeline); the other families build their
own components (services/families/<name>/tiny.py) around the same learned tokenizer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from services.families import SD1, by_name
from services.tinymodel.pipeline import build_random_pipeline
from services.tinymodel.tokenizer import write_tokenizer


def build_tiny_family(family: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a seeded random tiny pipeline of `family` ("sd1", "sdxl", "flux") to out_dir."""
    chosen = by_name(family)
    if chosen is SD1:
        return build_random_pipeline(Path(out_dir), seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp))
        return chosen.build_tiny(Path(out_dir), Path(tmp), seed)
