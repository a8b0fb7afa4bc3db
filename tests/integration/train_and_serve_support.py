"""A training stack and an inference server on one registry, both on real gRPC: what tests need
to train an adapter through the TrainingService and then Generate with it."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from services.common.config import Settings
from tests.fixtures.grpc_servers import loopback_settings
from tests.fixtures.models import make_concept_images
from tests.integration.test_inference_support import InferenceEnv, start_env
from tests.integration.test_training_support import TrainingStack, stack_settings


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def upload_concept(stack: TrainingStack, name: str, count: int = 3) -> str:
    """The checkered-toy concept images (64 px) as a dataset; returns its id."""
    images = [(f"toy{i}.png", png_bytes(img), "") for i, img in enumerate(make_concept_images(count, seed=2, size=64))]
    return str(stack.upload(images, name=name).dataset.id)


@contextlib.contextmanager
def train_and_serve(root: Path, base_dirs: dict[str, Path], families: Iterable[str]) -> Iterator[
        tuple[TrainingStack, InferenceEnv]]:
    """Registry on a local directory; the tiny base of each family imported as `tiny-<family>`;
    one in-process worker (SQLite) and an inference server reading the same registry."""
    registry = Settings(registry_url=f"file://{root / 'registry'}", data_dir=root / "var")
    families = list(families)
    with TrainingStack(stack_settings(root, registry, f"sqlite:///{root / 'jobs.db'}"), workers=1) as stack:
        for family in families:
            stack.registry.base_models.import_folder(f"tiny-{family}", base_dirs[family])
        inference = loopback_settings(registry_url=registry.registry_url, cache_dir=root / "cache",
                                      data_dir=root / "inference", batch_wait_ms=0.0, max_batch_size=1)
        env = start_env(inference, base_dirs[families[0]])
        try:
            yield stack, env
        finally:
            env.close()
