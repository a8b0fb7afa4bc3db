"""Committed model assets: the pretrained tiny-sd pipeline folder lives next to this file."""

from __future__ import annotations

from pathlib import Path

PRETRAINED_DIR = Path(__file__).resolve().parent / "tiny-sd"
