"""The device side: which adapters are attached where, and getting a batch's mix into the weights.

Two tiers live here, both touched only by the device thread:

* device tier: attached adapters, key (target, adapter version), bounded by
  `device_cache_bytes` and `device_cache_max_adapters`. A LoRA is a peft adapter on the target
  pipeline (UNet or Flux transformer / text encoders); a TI is a set of reserved embedding
  slots. Eviction detaches (`delete_adapters`, slot release) and, once a component has no
  adapter left, removes its peft wrappers, so the denoiser returns to its exact baseline
  modules, parameters and bytes.
* DreamBooth tier: pipeline variants with swapped components (`dreambooth_cache_bytes`).
  Evicting a variant first evicts every adapter attached to it.

A *target* is the pipeline a batch runs on: the base's or a DreamBooth variant's. TI slots
belong to a text encoder, so TI entries are keyed by the target owning the text encoder (the
base, unless the DreamBooth adapter retrained it).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from services.common.config import Settings
from services.common.errors import FailedPrecondition, ResourceExhausted
from services.inference.adapters import AdapterKey
from services.inference.cache import ByteLRU, CapacityError
from services.inference.dreambooth import Variant, build_variant
from services.inference.lora import LoraMerger, LoraMergers, Mix, attach_lora, detach_lora, lora_nbytes
from services.inference.merge_methods import LINEAR_MERGE, MergeSpec
from services.inference.metrics import InferenceMetrics
from services.inference.payloads import DreamBoothPayload, LoraPayload, Payload, TiPayload
from services.inference.pipelines import BaseModel, Pipeline
from services.inference.textual_inversion import SlotsExhausted, TiBinding, TiSlots


@dataclass(frozen=True)
class AdapterUse:
    """One adapter of a request, resolved and parsed (host tier)."""

    key: AdapterKey
    kind: str
    weight: float
    payload: Payload


@dataclass
class Target:
    id: str
    pipe: Pipeline
    slots: TiSlots | None
    text_owner: str


@dataclass
class Attachment:
    kind: str
    pipe: Pipeline
    nbytes: int
    peft_name: str = ""
    slots: TiSlots | None = None
    binding: TiBinding | None = None


@dataclass
class Prepared:
    """What the runner needs: the pipeline to call and the request's TI bindings."""

    base: BaseModel
    pipe: Pipeline
    ti: list[TiBinding]
    attach_ms: float


@dataclass
class PreparedBatch:
    """A batch's adapters attached on its target: each request's LoRA mix and TI bindings."""

    pipe: Pipeline
    mixes: list[Mix]
    ti: list[list[TiBinding]]
    mergers: list[LoraMerger]
    attach_ms: float


DeviceKey = tuple[str, AdapterKey]


class DeviceState:
    """The device and DreamBooth tiers plus the LoRA merge state (device thread only)."""

    def __init__(self, settings: Settings, metrics: InferenceMetrics,
                 dreambooth_files: Callable[[DreamBoothPayload, str], dict]) -> None:
        self._dreambooth_files = dreambooth_files
        self.mergers = LoraMergers()
        self.attaches = {"fast": 0, "full": 0}  # LoRA attach paths taken (see lora_fast.py)
        self._names = (f"atl{i}" for i in itertools.count())
        self.held: set[DeviceKey] = set()  # adapters the continuous scheduler's running rows use
        self.adapters: ByteLRU[DeviceKey, Attachment] = ByteLRU(
            "device", settings.device_cache_bytes, lambda a: a.nbytes,
            max_entries=settings.device_cache_max_adapters, on_evict=self._detach, strict=True,
            metrics=metrics.tier("device"),
        )
        self.variants: ByteLRU[tuple[str, AdapterKey], Variant] = ByteLRU(
            "dreambooth", settings.dreambooth_cache_bytes, lambda v: v.nbytes,
            on_evict=self._drop_variant, strict=True, metrics=metrics.tier("dreambooth"),
        )

    # --- preparing a batch ------------------------------------------------------------
    def prepare(self, base: BaseModel, uses: Sequence[AdapterUse], merge: MergeSpec = LINEAR_MERGE) -> Prepared:
        """Attach what is missing, then merge the batch's LoRA mix into the target's weights."""
        batch = self.attach(base, [uses])
        for merger in batch.mergers:
            merger.apply(batch.mixes[0], merge)
        return Prepared(base, batch.pipe, batch.ti[0], batch.attach_ms)

    def attach(self, base: BaseModel, jobs: Sequence[Sequence[AdapterUse]]) -> PreparedBatch:
        """Attach every adapter of a batch's requests (all on one target: the batch key holds the
        DreamBooth adapter) and say each request's mix and TI bindings; nothing is merged yet.
        The whole union is protected while it attaches, so it fits the tier's bounds or fails."""
        started = time.perf_counter()
        target = self._target(base, jobs[0])
        keys = {(target.id if u.kind == "LORA" else target.text_owner, u.key)
                for uses in jobs for u in uses if u.kind != "DREAMBOOTH"} | self.held
        names: dict[AdapterKey, str] = {}
        try:
            for use in (u for uses in jobs for u in uses if u.kind == "LORA" and u.key not in names):
                names[use.key] = self._lora(base, target, use, keys).peft_name
            bindings: dict[AdapterKey, TiBinding] = {}
            for use in (u for uses in jobs for u in uses if u.kind == "TEXTUAL_INVERSION"):
                if use.key not in bindings:
                    bindings[use.key] = self._ti(base, target, use, keys)
        except (CapacityError, SlotsExhausted) as exc:
            raise ResourceExhausted(f"the adapters of this request do not fit on the device: {exc}") from None
        mixes = [tuple((names[u.key], u.weight) for u in uses if u.kind == "LORA") for uses in jobs]
        ti = [[bindings[u.key] for u in uses if u.kind == "TEXTUAL_INVERSION"] for uses in jobs]
        return PreparedBatch(target.pipe, mixes, ti, self.mergers.for_pipeline(target.pipe),
                             (time.perf_counter() - started) * 1000)

    @staticmethod
    def base_keys(base: BaseModel, uses: Sequence[AdapterUse]) -> set[DeviceKey]:
        """The device-tier keys of `uses` attached on the base pipeline (no DreamBooth)."""
        return {(f"base:{base.name}", u.key) for u in uses if u.kind != "DREAMBOOTH"}

    def pin(self, base: BaseModel, uses: Sequence[AdapterUse]) -> Prepared:
        """Attach `uses` to the base and pin them in the device tier (warm start, `pinned_adapters`).

        Pins count against the tier's bounds: one that cannot fit next to the pins before it
        raises ResourceExhausted here, so a replica with too many pins fails start-up.
        """
        if any(u.kind == "DREAMBOOTH" for u in uses):
            raise FailedPrecondition("DreamBooth adapters cannot be pinned (only LoRA and textual inversion)",
                                     field_name="pinned_adapters")
        prepared = self.prepare(base, uses)
        target = self._target(base, uses)
        for use in uses:
            self.adapters.pin((target.id if use.kind == "LORA" else target.text_owner, use.key))
        return prepared

    def _target(self, base: BaseModel, uses: Sequence[AdapterUse]) -> Target:
        base_id = f"base:{base.name}"
        dreambooth = [u for u in uses if u.kind == "DREAMBOOTH"]
        if not dreambooth:
            return Target(base_id, base.pipe, base.slots, base_id)
        use = dreambooth[0]
        assert isinstance(use.payload, DreamBoothPayload)
        payload = use.payload
        variant_id = f"db:{base.name}:{use.key}"
        try:
            variant = self.variants.get_or_load(
                (base.name, use.key),
                lambda: build_variant(variant_id, base, self._dreambooth_files(payload, use.key.tenant)),
                user=use.key.tenant,
            )
        except CapacityError as exc:
            raise FailedPrecondition(f"DreamBooth adapter {use.key} exceeds the DreamBooth cache: {exc}") from None
        owner = variant.id if variant.slots is not base.slots else base_id
        return Target(variant.id, variant.pipe, variant.slots, owner)

    def _lora(self, base: BaseModel, target: Target, use: AdapterUse, protect: set[DeviceKey]) -> Attachment:
        payload = use.payload
        assert isinstance(payload, LoraPayload)
        nbytes = lora_nbytes(payload.state_dict, next(base.denoiser(target.pipe).parameters()).dtype)

        def attach() -> Attachment:
            self.adapters.make_room(nbytes, protect)
            name = next(self._names)
            try:
                fast = attach_lora(target.pipe, self.mergers.for_pipeline(target.pipe), name, payload.state_dict,
                                   payload.metadata, base.part)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise FailedPrecondition(f"adapter {use.key} cannot be applied to this base model: {exc}",
                                         field_name="spec.adapters") from None
            self.attaches["fast" if fast else "full"] += 1
            return Attachment("LORA", target.pipe, nbytes, peft_name=name)

        return self.adapters.get_or_load((target.id, use.key), attach, protect, user=use.key.tenant)

    def _ti(self, base: BaseModel, target: Target, use: AdapterUse, protect: set[DeviceKey]) -> TiBinding:
        payload = use.payload
        assert isinstance(payload, TiPayload)
        slots = target.slots
        if slots is None:
            why = (f"is not supported on {base.family.title} base models" if base.slots is None else
                   "cannot be combined with a DreamBooth adapter that retrained only some of the text encoders")
            raise FailedPrecondition(f"textual inversion {why}", field_name="spec.adapters")
        try:
            needed = slots.needed(payload.vectors)  # checks every encoder's vectors are there and fit
        except FailedPrecondition as exc:
            raise FailedPrecondition(f"adapter {use.key}: {exc.message}", field_name="spec.adapters") from None
        nbytes = payload.nbytes

        def attach() -> Attachment:
            self.adapters.make_room(nbytes, protect)
            while slots.free < needed:
                if not self._evict_one_ti(slots, protect):
                    break
            binding = slots.bind(payload.vectors)
            return Attachment("TEXTUAL_INVERSION", target.pipe, nbytes, slots=slots, binding=binding)

        attachment = self.adapters.get_or_load((target.text_owner, use.key), attach, protect,
                                               user=use.key.tenant)
        assert attachment.binding is not None
        return attachment.binding

    def _evict_one_ti(self, slots: TiSlots, protect: set[DeviceKey]) -> bool:
        for key in list(self.adapters.keys()):
            entry = self.adapters.peek(key)
            if key not in protect and entry is not None and entry.slots is slots and not self.adapters.is_pinned(key):
                return self.adapters.evict(key)
        return False

    # --- eviction callbacks -----------------------------------------------------------
    def _detach(self, _key: DeviceKey, attachment: Attachment) -> None:
        if attachment.kind == "LORA":
            detach_lora(self.mergers.for_pipeline(attachment.pipe), attachment.peft_name)
        elif attachment.slots is not None and attachment.binding is not None:
            attachment.slots.release(attachment.binding)

    def _drop_variant(self, _key: tuple[str, AdapterKey], variant: Variant) -> None:
        owner_ids = {variant.id}
        self.adapters.evict_where(lambda key: key[0] in owner_ids)
        self.mergers.forget(variant.owned.values())
        variant.owned.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- ops --------------------------------------------------------------------------
    def clear(self) -> None:
        """Detach everything (adapters first, then variants)."""
        self.adapters.clear()
        self.variants.clear()
