"""`make demo` in its reduced CI form: `python -m atelier.demo --quick --out DIR` as a subprocess.

It installs the committed pretrained tiny-sd asset, starts `atelier serve` itself, trains one
adapter per method plus a second LoRA, generates, and shuts down; here we check what it leaves
behind (valid PNGs, a contact sheet) and that its summary table lists the four adapters.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from services.tinymodel.assets import PRETRAINED_DIR
from services.tinymodel.install import REQUIRED

pytestmark = pytest.mark.slow

ADAPTERS = ("demo-lora", "demo-lora-stripes", "demo-dreambooth", "demo-ti")
GENERATED = ("base", *ADAPTERS, "two-LoRAs-mixed")
QUICK_BUDGET_S = 150.0

ASSET_MISSING = [rel for rel in REQUIRED if not (PRETRAINED_DIR / rel).is_file()]


def valid_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


@pytest.mark.skipif(bool(ASSET_MISSING), reason=f"pretrained tiny-sd asset not in {PRETRAINED_DIR} yet "
                    f"(missing {', '.join(ASSET_MISSING)}); the demo installs it, so it cannot run without it")
def test_quick_demo_writes_pictures_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "atelier.demo", "--quick", "--out", str(out)], env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    seconds = time.monotonic() - started
    assert result.returncode == 0, f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"

    for label in GENERATED:
        assert valid_png(out / f"{label}.png") == (32, 32), label
    width, height = valid_png(out / "contact-sheet.png")
    assert width > 128 and height > 128
    assert len(list((out / "concept").glob("*.png"))) == 8

    table = result.stdout[result.stdout.index("Atelier demo"):]
    rows = [line for line in table.splitlines() if any(f" {name} " in line for name in ADAPTERS)]
    assert len(rows) == 4, table
    for method in ("lora", "dreambooth", "textual-inversion"):
        assert method in table
    assert "services stopped (exit 0)" in result.stdout
    assert seconds < QUICK_BUDGET_S * 2, f"quick demo took {seconds:.0f} s"
