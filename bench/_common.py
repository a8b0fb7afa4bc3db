"""Shared pieces of the inference benchmarks (CPU): tiny base model, engines, timing, tables.

Timing on a shared 2-core machine is noisy, so every benchmark interleaves its arms in rounds
(A, B, A, B, ...) within one process and reports medians; ratios compare arms measured side by
side, never numbers from different runs. torch runs single-threaded for stable numbers.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from services.common.config import Settings  # noqa: E402
from services.inference.engine import InferenceEngine  # noqa: E402
from services.inference.types import AdapterSpec, GenerationRequest, GenerationResult  # noqa: E402
from services.registry.manifests import LORA_WEIGHTS_FILE  # noqa: E402
from services.registry.refs import AdapterRef  # noqa: E402
from services.registry.registry import Registry  # noqa: E402
from tests.fixtures.synthetic import LoraFactory  # noqa: E402

T = TypeVar("T")
BASE = "tiny"
TENANT = "default"


def tiny_pipeline(tmp: Path) -> Path:
    """The pretrained tiny model when its asset is installed, else the same architecture random."""
    try:
        from services.tinymodel.install import PRETRAINED_DIR, install_pretrained

        if (Path(PRETRAINED_DIR) / "model_index.json").is_file():
            return install_pretrained(tmp / "tiny-sd")
    except ImportError:
        pass
    from services.tinymodel.pipeline import build_random_pipeline

    return build_random_pipeline(tmp / "tiny-sd-random", seed=0)


def settings_for(tmp: Path, pipeline_dir: Path, name: str = "engine", **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "registry_url": f"file://{tmp / 'registry'}",
        "cache_dir": tmp / name / "cache",
        "data_dir": tmp / name,
        "base_model_paths": f"{BASE}={pipeline_dir}",
        "batch_wait_ms": 0.0,
        "device_cache_max_adapters": 16,
        "max_batch_size": 1,
        "metrics_port": 0,
    }
    values.update(overrides)
    return Settings(**values)


def publish_loras(registry: Registry, pipeline_dir: Path, tmp: Path, names: Sequence[str], rank: int = 4) -> None:
    factory = LoraFactory(pipeline_dir, rank=rank)
    for i, name in enumerate(names):
        path = factory.write(tmp / "loras" / name, seed=1000 + i)
        registry.adapters.publish(TENANT, name, kind="LORA", base_model=BASE, files={LORA_WEIGHTS_FILE: path})


def request(
    adapters: Sequence[tuple[str, float]] = (), steps: int = 20, seed: int = 1, size: int = 32
) -> GenerationRequest:
    specs = tuple(AdapterSpec(AdapterRef(TENANT, n), w, f"spec.adapters[{i}]") for i, (n, w) in enumerate(adapters))
    return GenerationRequest(
        BASE, "a red box on a blue floor", adapters=specs, steps=steps, width=size, height=size, seed=seed
    )


class LoopThread:
    """An event loop in a daemon thread: engines live there, benchmarks call in synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 600) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


class EngineHandle:
    """An InferenceEngine created inside a LoopThread, driven from the benchmark thread."""

    def __init__(self, loop: LoopThread, settings: Settings, registry: Registry, **kwargs: Any) -> None:
        self.loop = loop

        async def create() -> InferenceEngine:
            return InferenceEngine(settings, registry, **kwargs)

        self.engine = loop.run(create())

    def generate(self, req: GenerationRequest) -> GenerationResult:
        return self.loop.run(self.engine.generate(TENANT, req))

    def generate_many(self, reqs: Sequence[GenerationRequest]) -> list[GenerationResult]:
        async def all_of() -> list[GenerationResult]:
            return list(await asyncio.gather(*(self.engine.generate(TENANT, r) for r in reqs)))

        return self.loop.run(all_of())

    def close(self) -> None:
        self.loop.run(self.engine.close())


def timed_ms(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def interleaved(arms: dict[str, Callable[[], object]], rounds: int, reps: int = 1) -> dict[str, float]:
    """Median milliseconds per call of each arm, measured in alternating rounds."""
    samples: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, fn in arms.items():
            samples[name].extend(timed_ms(fn) for _ in range(reps))
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclass
class Row:
    name: str
    value: float
    unit: str = "ms"
    baseline: str = ""
    baseline_value: float | None = None
    target: str = ""
    ok: bool | None = None


def print_rows(title: str, rows: Sequence[Row]) -> None:
    print(f"\n== {title} ==")
    print(f"{'measure':<44} {'value':>10}  {'baseline':<34} {'ratio':>7}  {'target':<14} ok")
    for row in rows:
        ratio = f"{row.value / row.baseline_value:.3f}" if row.baseline_value else ""
        base = f"{row.baseline} ({row.baseline_value:.1f})" if row.baseline_value is not None else row.baseline
        ok = "" if row.ok is None else ("yes" if row.ok else "NO")
        print(f"{row.name:<44} {row.value:>8.1f}{row.unit:>2}  {base:<34} {ratio:>7}  {row.target:<14} {ok}")


def setup_torch() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
