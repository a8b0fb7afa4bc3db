"""One process-wide lock around building torch modules from weights (loads, adapter injection).

diffusers, transformers and peft construct models under `accelerate.init_empty_weights` and
transformers' init patches, which swap torch globals (`nn.Module.register_parameter`,
`nn.Parameter`, init functions) for the duration of a load. Two loads in different threads of
one process see each other's patches: in the embedded `atelier serve` a worker starting a job
while inference attaches a LoRA got meta tensors or `Parameter.__new__() got an unexpected
keyword argument '_is_hf_initialized'` (8 of 10 training loads failed in a two-thread
reproduction; the job attempt fails and burns a retry). Loads are short next to training and
generation, so serialising them costs nothing measurable; the lock is reentrant so a load may
call another.

Importing this module also wraps the libraries' `from_pretrained` entry points with the lock
(`serialise_library_loads`), so loads that do not go through our call sites are serialised too.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from typing import Any

MODEL_LOAD_LOCK = threading.RLock()


def _locked(load: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(load)
    def wrapper(cls: type, *args: Any, **kwargs: Any) -> Any:
        with MODEL_LOAD_LOCK:
            return load(cls, *args, **kwargs)

    wrapper.__atelier_locked__ = True  # type: ignore[attr-defined]
    return wrapper


def serialise_library_loads() -> None:
    """Route every diffusers/transformers `from_pretrained` through MODEL_LOAD_LOCK (idempotent).

    Locking only our own call sites is not enough: any other load in the process (a test's
    reference pipeline, a helper script, a library loading a sub-model) that overlaps one of ours
    interleaves the save/patch/restore of `nn.Module.register_parameter`, and the later restore
    can re-install the *patched* function for good, after which every module built in the
    process has meta parameters ("Cannot copy out of meta tensor"). Wrapping the libraries'
    entry points makes every load take the lock, whoever calls it.
    """
    from diffusers import DiffusionPipeline
    from diffusers.models.modeling_utils import ModelMixin
    from transformers import PreTrainedModel

    for owner in (ModelMixin, DiffusionPipeline, PreTrainedModel):
        current = inspect.getattr_static(owner, "from_pretrained")
        if isinstance(current, classmethod) and not getattr(current.__func__, "__atelier_locked__", False):
            setattr(owner, "from_pretrained", classmethod(_locked(current.__func__)))  # noqa: B010


serialise_library_loads()
