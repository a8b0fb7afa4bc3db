"""Process-wide knobs every entry point applies once at start-up."""

from __future__ import annotations

from services.common.config import Settings


def apply_torch_threads(settings: Settings) -> None:
    """CPU processes sharing cores (a worker beside the APIs) run faster with fewer threads each."""
    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)
