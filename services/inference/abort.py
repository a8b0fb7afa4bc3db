"""Cooperative abort of device work: checked inside model forwards, not only between steps.

A single UNet forward or VAE decode of a large image can run for seconds to minutes on a CPU
(the tiny model's VAE downsamples by 2, so 512 px means self-attention over 65k tokens), so a
check between denoising steps leaves the device busy long after the caller gave up. The
`AbortGuard` therefore puts a forward pre-hook on the component roots and on every `Conv2d` and
diffusers attention module (`Attention`; Flux's `FluxAttention`) of a served pipeline, and
raises `BatchAborted` from there once every request of the running batch is dead (cancelled or
past its deadline) or the engine is shutting down. The hooks do nothing on other threads and
cost one thread-local read plus a few flag reads when armed (~53 hooks per tiny-UNet forward).

One op is still indivisible: scaled-dot-product attention, which at 256 px is 4.4 s per call
on the tiny UNet. On the device thread, a CPU SDPA call whose score matrix (batch x heads x
queries x keys) exceeds `chunk_elements` is computed in parts (per sample, then per query
block) with a check between parts. Rows of attention are independent, so the parts equal the
whole; below the threshold (every size the byte-exactness tests use) the call is untouched.
CUDA calls are never split: kernels are queued asynchronously, so the hooks already stop the
queueing and splitting would only add launches.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention

HOOKED_TYPES = (torch.nn.Conv2d, Attention, AttentionModuleMixin)  # the mixin: Flux's attention modules
MIN_QUERY_CHUNK = 64  # smaller query blocks make the flash kernel inefficient


class BatchAborted(Exception):
    """Every request of the running batch is gone (or the engine stops); end the call now."""


class Doomed(Protocol):
    def dead(self) -> bool: ...


_active = threading.local()  # .guard: the AbortGuard armed on this thread, if any
_original_sdpa: Callable[..., torch.Tensor] | None = None


class AbortGuard:
    """Arms abort checks for one batch at a time on the device thread (see module doc)."""

    def __init__(self, chunk_elements: int = 0) -> None:
        self.chunk_elements = chunk_elements
        self._items: tuple[Doomed, ...] = ()
        self._generation = 0
        self._stopping = threading.Event()
        self._hooked: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        if chunk_elements > 0:
            _install_sdpa_split()

    # --- state read by the watchdog (any thread) --------------------------------------
    def batch(self) -> tuple[int, tuple[Doomed, ...]]:
        """(generation, items) of the batch on the device now; () when idle."""
        return self._generation, self._items

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        """Abort the running batch at its next check, and every later one at its start."""
        self._stopping.set()

    # --- the device thread ------------------------------------------------------------
    def hook(self, pipe: Any) -> None:
        """Put the pre-hooks on every module component of `pipe` not hooked yet."""
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module) and component not in self._hooked:
                component.register_forward_pre_hook(self._pre_hook)
                for module in component.modules():
                    if isinstance(module, HOOKED_TYPES):
                        module.register_forward_pre_hook(self._pre_hook)
                self._hooked.add(component)

    @contextlib.contextmanager
    def running(self, items: Sequence[Doomed]) -> Iterator[None]:
        """Arm the checks on this thread for `items` (raises at once if already dead)."""
        self._items = tuple(items)
        self._generation += 1
        _active.guard = self
        try:
            self.check()
            yield
        finally:
            _active.guard = None
            self._items = ()

    def check(self) -> None:
        items = self._items
        if self._stopping.is_set() or (items and all(item.dead() for item in items)):
            raise BatchAborted()

    def _pre_hook(self, _module: torch.nn.Module, _args: Any) -> None:
        if getattr(_active, "guard", None) is self:
            self.check()


# --- splitting large CPU attention ----------------------------------------------------------
def _install_sdpa_split() -> None:
    """Route `F.scaled_dot_product_attention` through `_sdpa` once per process.

    diffusers' attention processors look the function up on `torch.nn.functional` at call time,
    so this is the one place every SD/SDXL attention passes. Threads without an armed guard
    (training, benchmarks) get the original function unchanged.
    """
    global _original_sdpa
    if _original_sdpa is None:
        _original_sdpa = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _sdpa  # type: ignore[assignment]


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
          dropout_p: float = 0.0, is_causal: bool = False, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Split only plain unmasked CPU attention on an armed thread; anything else passes through."""
    assert _original_sdpa is not None
    guard: AbortGuard | None = getattr(_active, "guard", None)
    plain = (guard is None or guard.chunk_elements <= 0 or query.device.type != "cpu" or attn_mask is not None
             or dropout_p or is_causal or args or kwargs or query.dim() < 3
             or query.shape[:-2] != key.shape[:-2] or key.shape[:-2] != value.shape[:-2])
    if plain or query.numel() // query.shape[-1] * key.shape[-2] <= guard.chunk_elements:  # type: ignore[union-attr]
        return _original_sdpa(query, key, value, attn_mask, dropout_p, is_causal, *args, **kwargs)
    assert guard is not None
    return split_attention(query, key, value, guard.chunk_elements, guard.check, _original_sdpa)


def split_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, budget: int,
                    check: Callable[[], None], sdpa: Callable[..., torch.Tensor]) -> torch.Tensor:
    """SDPA over (N, ..., L, E) tensors in parts of at most ~`budget` scores, `check()` before each."""
    per_sample = query[0].numel() // query.shape[-1] * key.shape[-2]
    if per_sample <= budget:
        step = max(1, budget // per_sample)
        parts = []
        for start in range(0, query.shape[0], step):
            check()
            end = start + step
            parts.append(sdpa(query[start:end], key[start:end], value[start:end]))
        return torch.cat(parts)
    per_query = per_sample // query.shape[-2]
    block = max(MIN_QUERY_CHUNK, budget // per_query)
    samples = []
    for n in range(query.shape[0]):
        rows = []
        for q in query[n:n + 1].split(block, dim=-2):
            check()
            rows.append(sdpa(q, key[n:n + 1], value[n:n + 1]))
        samples.append(torch.cat(rows, dim=-2))
    return torch.cat(samples)
