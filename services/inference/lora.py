"""LoRA on a live pipeline: attach/detach peft adapters, and merge the requested mix exactly.

Adapters are attached with diffusers' own `load_lora_weights(state_dict, adapter_name=...)`, so
every format diffusers reads (its own, kohya, PEFT) and every layer type it wraps works the same
as in plain diffusers. What we add is how a request's mix reaches the weights:

* Unfused peft LoRA costs an extra low-rank matmul per wrapped layer and step (measured 1.19x on
  the tiny model). So the requested set `[(adapter, weight), ...]` is *merged* into the base
  weights, exactly as diffusers' `set_adapters` + `fuse_lora` would (peft's per-layer
  `set_scale` + `merge`, bit-identical results), and each wrapped layer then runs its base
  layer only. Consecutive batches with the same set touch no weights at all.
* Unmerging by subtraction is not exact in floating point, so every wrapped layer's original
  weight (and bias) is copied once when the layer is first wrapped, and a change of set
  restores the copies bit for bit before merging the next set. The copies cover wrapped
  layers only (attention projections for typical LoRAs) and live on the device.
* During pipeline calls the wrappers are taken out of the module tree altogether (`strip`).

Everything here runs on the device thread, between pipeline calls.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import recurse_remove_peft_layers
from peft.tuners.lora import LoraLayer
from transformers.utils import logging as hf_logging

from services.common.errors import FailedPrecondition
from services.common.model_loading import MODEL_LOAD_LOCK
from services.families import of_pipeline
from services.inference.lora_fast import try_fast_attach
from services.inference.merge_methods import LINEAR, LINEAR_MERGE, MergeSpec, merge_deltas
from services.inference.pipelines import Pipeline

Mix = tuple[tuple[str, float], ...]
"""A request's LoRA set: (peft adapter name, weight) in request order."""

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")


def lora_layers(component: torch.nn.Module) -> list[LoraLayer]:
    return [m for m in component.modules() if isinstance(m, LoraLayer)]


@dataclass
class _Tracked:
    """One wrapped layer: where it hangs in the module tree and its original parameters."""

    path: str
    parent: torch.nn.Module
    attr: str
    weight: torch.Tensor
    bias: torch.Tensor | None


class LoraMerger:
    """The merge state of one component (a UNet or text encoder instance).

    Wrapped layers are *stripped* during pipeline calls: the parent module points at the base
    layer itself (holding the merged weights), so neither merged nor unused peft wrappers add a
    Python call per layer and step (measured: up to 1.2x on the tiny model). The wrappers stay
    alive in `_tracked` and are put back (`wrapped()`) whenever peft has to walk the model:
    attaching and deleting adapters.
    """

    def __init__(self, component: torch.nn.Module, prefix: str) -> None:
        self.component = component
        self.prefix = prefix  # "unet", "text_encoder", ...: its keys' prefix in a LoRA file
        self._tracked: dict[LoraLayer, _Tracked] = {}
        self._current: Mix = ()
        self._merge: MergeSpec = LINEAR_MERGE
        self._stripped = False

    @property
    def current(self) -> Mix:
        return self._current

    @property
    def saved_bytes(self) -> int:
        """Device bytes held by the saved original weights."""
        tensors = [t for tr in self._tracked.values() for t in (tr.weight, tr.bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def adapter_bytes(self) -> int:
        """Device bytes of the LoRA parameters held by the tracked wrappers."""
        layers: list[Any] = list(self._tracked)
        params = [p for layer in layers for name, p in layer.named_parameters() if "lora_" in name]
        return sum(p.numel() * p.element_size() for p in params)

    # --- the module tree ----------------------------------------------------------------
    def strip(self) -> None:
        if not self._stripped:
            for layer, tracked in self._tracked.items():
                setattr(tracked.parent, tracked.attr, layer.get_base_layer())
            self._stripped = True

    def unstrip(self) -> None:
        if self._stripped:
            for layer, tracked in self._tracked.items():
                setattr(tracked.parent, tracked.attr, layer)
            self._stripped = False

    @contextlib.contextmanager
    def wrapped(self) -> Iterator[None]:
        """Wrappers in the tree and weights at their originals, for peft to walk the model."""
        self.restore()
        self.unstrip()
        try:
            yield
        finally:
            self.track_new_layers()
            self.restore()

    def track_new_layers(self) -> None:
        """Record layers wrapped since the last call (in the tree, unmerged) and their originals."""
        for name, layer in self.component.named_modules():
            if isinstance(layer, LoraLayer) and layer not in self._tracked:
                parent_name, _, attr = name.rpartition(".")
                base: Any = layer.get_base_layer()
                bias = getattr(base, "bias", None)
                self._tracked[layer] = _Tracked(
                    name, self.component.get_submodule(parent_name), attr, base.weight.detach().clone(),
                    bias.detach().clone() if isinstance(bias, torch.Tensor) else None,
                )

    # --- merging ------------------------------------------------------------------------
    def restore(self) -> None:
        """Back to the exact original weights (bit for bit: copied, not subtracted).

        Wrappers are never in the forward path of a pipeline call (see `strip`), so their
        enabled/disabled flags do not matter and are left alone: toggling them walks every
        adapter's parameters and was most of the switch time.
        """
        for layer, tracked in self._tracked.items():
            base: Any = layer.get_base_layer()
            if layer.merged_adapters:
                layer.merged_adapters.clear()
                base.weight.data.copy_(tracked.weight)
                if tracked.bias is not None:
                    base.bias.data.copy_(tracked.bias)
        self._current = ()
        self._merge = LINEAR_MERGE

    def apply(self, mix: Mix, merge: MergeSpec = LINEAR_MERGE) -> None:
        """Make the weights equal base + the mix's merged delta, then strip the wrappers.

        LINEAR: base + sum(weight_i * delta_i), peft's own merge. TIES/DARE: the full merged
        delta of merge_methods.py per layer. The merged weights are the cache: the same
        (mix, method, density, seed) as the last batch touches nothing.
        """
        mix = tuple((name, w) for name, w in mix if w != 0.0)
        merge = merge.normalised()
        if merge.method != LINEAR:
            self._refuse_variants(mix, merge)
        if mix != self._current or merge != self._merge:
            self.restore()
            for layer in self._tracked:
                present = [name for name, _w in mix if name in layer.lora_A]
                if present and merge.method == LINEAR:
                    for name, weight in mix:
                        layer.set_scale(name, weight)
                    layer.merge(adapter_names=present)
                elif present:
                    self._merge_full(layer, tuple((n, w) for n, w in mix if n in layer.lora_A), merge)
            self._current = mix
            self._merge = merge
        self.strip()

    def _refuse_variants(self, mix: Mix, merge: MergeSpec) -> None:
        """TIES/DARE combine plain `B @ A` deltas; a DoRA layer's weight is a rescaled
        direction (peft's magnitude vector), which has no such delta to trim or drop. Refused
        before any weight is touched, so the previous merge state stays valid."""
        names = {name for name, _w in mix}
        for layer, tracked in self._tracked.items():
            dora = sorted(names & set(getattr(layer, "lora_variant", {})))
            if dora:
                raise FailedPrecondition(
                    f"adapter {dora[0]!r} is a DoRA LoRA ({self.prefix}.{tracked.path}); merge method "
                    f"{merge.method} combines plain LoRA deltas only: use the LINEAR merge", "spec.merge_method")

    def _merge_full(self, layer: Any, mix: Mix, merge: MergeSpec) -> None:
        """Add one layer's TIES/DARE delta to its base weight (restore() copies it back).

        `layer` is a peft LoRA layer (Linear/Conv...: the subclasses define get_delta_weight).
        """
        base: Any = layer.get_base_layer()
        deltas = []
        for name, _w in mix:
            layer.set_scale(name, 1.0)
            deltas.append(layer.get_delta_weight(name))
        merged = merge_deltas(deltas, [w for _n, w in mix], merge, f"{self.prefix}.{self._tracked[layer].path}")
        base.weight.data += merged.to(base.weight.dtype)
        layer.merged_adapters.extend(name for name, _w in mix)

    def delete_adapter(self, name: str) -> None:
        self.restore()
        for layer in self._tracked:
            if name in layer.lora_A:
                layer.delete_adapter(name)
        peft_config = getattr(self.component, "peft_config", None)
        if isinstance(peft_config, dict):
            peft_config.pop(name, None)

    def layers(self) -> list[Any]:
        """The tracked peft wrappers (their base layers are what runs while stripped)."""
        return list(self._tracked)

    def wrappers(self) -> dict[str, LoraLayer]:
        """Module path -> wrapper, for the fast attach path."""
        return {tracked.path: layer for layer, tracked in self._tracked.items()}

    def has_adapters(self) -> bool:
        return any(len(layer.lora_A) > 0 for layer in self._tracked)

    def remove_wrappers(self) -> None:
        """Drop every peft wrapper (only when no adapter is left) and the saved originals."""
        self.restore()
        self.unstrip()
        if isinstance(self.component, ModelMixin):
            self.component.unload_lora()
        else:
            recurse_remove_peft_layers(self.component)
            if getattr(self.component, "peft_config", None) is not None:
                del self.component.peft_config
                self.component._hf_peft_config_loaded = None  # type: ignore[assignment]
        self._tracked.clear()


class LoraMergers:
    """One LoraMerger per component object; shared components (a DreamBooth variant's text
    encoder is the base's) share one merger, so their merge state is tracked once."""

    def __init__(self) -> None:
        self._by_component: dict[torch.nn.Module, LoraMerger] = {}

    def for_pipeline(self, pipe: Pipeline) -> list[LoraMerger]:
        mergers = []
        for name in LORA_COMPONENTS:
            component = getattr(pipe, name, None)
            if isinstance(component, torch.nn.Module):
                merger = self._by_component.get(component)
                if merger is None:
                    merger = self._by_component[component] = LoraMerger(component, name)
                mergers.append(merger)
        return mergers

    def forget(self, components: Iterable[torch.nn.Module]) -> None:
        for component in components:
            self._by_component.pop(component, None)

    def saved_bytes(self) -> int:
        return sum(m.saved_bytes for m in self._by_component.values())

    def all(self) -> list[LoraMerger]:
        return list(self._by_component.values())

    def adapter_bytes(self) -> int:
        return sum(m.adapter_bytes for m in self._by_component.values())

    def unstrip_all(self) -> None:
        """Put every wrapper back in its tree (for inspection; the next batch strips again)."""
        for merger in self._by_component.values():
            merger.unstrip()


def lora_nbytes(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    """Device bytes of an attached LoRA: its parameters in the pipeline's dtype."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(t.numel() for t in state_dict.values() if t.dim() > 0) * size


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers 5 prints a "LOAD REPORT" listing the *other* adapters' weights as missing
    whenever a second LoRA is loaded into a text encoder, and peft warns about several adapters
    in one model; both are expected here (weights intact, checked in tests), so they are noise
    in a server's logs. Only the device thread attaches, so the filter swap is not contended."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\.")
            yield
    finally:
        hf_logging.set_verbosity(previous)


def load_lora(pipe: Pipeline, name: str, state_dict: dict[str, torch.Tensor],
              metadata: dict[str, Any] | None, part: ModuleType | None = None) -> None:
    """What `pipe.load_lora_weights(file)` does, from an in-memory state dict *and* its header.

    diffusers reads the adapter metadata (lora_alpha, rank pattern) only from a file; given a
    dict it would silently use alpha = rank. So the format conversion (`lora_state_dict`, which
    also understands kohya and other layouts) and the per-component loaders are called here with
    the metadata the payload kept; which loaders (UNet or transformer, which text encoders) is
    the family's `inference` part (`part`; default: the pipeline's family). `low_cpu_mem_usage`
    skips random-initialising the A/B weights that are overwritten right after.
    """
    part = part or of_pipeline(pipe).part("inference")
    with MODEL_LOAD_LOCK:  # low_cpu_mem_usage patches torch globals: services/common/model_loading.py
        converted, alphas = part.lora_state_dict(pipe, state_dict)
        if alphas and metadata:
            metadata = None  # diffusers refuses both; kohya-style alphas are the file's own truth
        part.load_lora(pipe, converted, alphas, name, metadata)


def attach_lora(pipe: Pipeline, mergers: Sequence[LoraMerger], name: str, state_dict: dict[str, torch.Tensor],
                metadata: dict[str, Any] | None = None, part: ModuleType | None = None) -> bool:
    """Attach one LoRA under `name` (wrappers back in the tree, weights at their originals).

    Returns True when the fast per-layer path (lora_fast.py) was enough.
    """
    part = part or of_pipeline(pipe).part("inference")
    with contextlib.ExitStack() as stack:
        for merger in mergers:
            stack.enter_context(merger.wrapped())
        with _quiet_transformers():
            components = [(m.prefix, m.component, m.wrappers()) for m in mergers]
            with MODEL_LOAD_LOCK:  # the fast path builds LoRA layers too (services/common/model_loading.py)
                converted, alphas = part.lora_state_dict(pipe, state_dict)
                if not alphas and try_fast_attach(components, name, converted, metadata):
                    return True
            try:
                load_lora(pipe, name, state_dict, metadata, part)
            except Exception:
                # A half-injected adapter must not stay behind (its layers would be tracked
                # and, worse, never merged or deleted): remove whatever got in.
                with contextlib.suppress(Exception):
                    pipe.delete_adapters([name])
                raise
    return False


def detach_lora(mergers: Sequence[LoraMerger], name: str) -> None:
    """Delete one adapter; a component left without adapters loses its wrappers entirely.

    What diffusers' `delete_adapters` does (each wrapper's `delete_adapter`, then the model's
    `peft_config` entry) on the tracked wrappers directly, without walking the module tree.
    """
    with _quiet_transformers():
        for merger in mergers:
            merger.delete_adapter(name)
    for merger in mergers:
        if not merger.has_adapters():
            merger.remove_wrappers()
