"""What the host-RAM tier holds per adapter version, parsed from its verified files.

Only safetensors are read (the registry refuses pickle formats on publish, and so do we here).
LoRA: the diffusers-layout state dict of `pytorch_lora_weights.safetensors`, kept as CPU tensors
that `load_lora_weights` can attach. Textual Inversion: `learned_embeds.safetensors`, one tensor
[num_vectors, dim] per trigger token, or one trigger's vectors per text encoder
(`{"clip_l": [n, 768], "clip_g": [n, 1280]}`, the SDXL layout; Flux: `clip_l` alone). Which
encoder takes which tensor is the base model's business (textual_inversion.TiSlots).
DreamBooth: nothing heavy here, the component files stay on the disk tier and are loaded
straight onto the device (see dreambooth.py), so a multi-GB UNet is never held twice in RAM.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from services.common.errors import DataLoss, FailedPrecondition
from services.registry.manifests import LORA_WEIGHTS_FILE, TI_EMBEDS_FILE, AdapterManifest, FileRecord

LORA_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights puts the LoRA config
# Keys some exporters put next to the embedding; never trigger tokens.
_TI_METADATA_KEYS = frozenset({"string_to_token", "name", "step", "sd_checkpoint", "sd_checkpoint_name"})
# Keys of a per-text-encoder TI file (A1111/ComfyUI SDXL layout; Flux's CLIP-L alone).
TI_ENCODER_KEYS = frozenset({"clip_l", "clip_g"})
DENOISERS = ("unet", "transformer")


@dataclass(frozen=True)
class LoraPayload:
    state_dict: dict[str, torch.Tensor]
    # diffusers' LoRA adapter metadata from the safetensors header (rank, lora_alpha, targets per
    # component, e.g. {"unet.lora_alpha": 8, ...}): without it alpha != rank LoRAs would be
    # applied with the wrong scale, because diffusers cannot see a header behind a dict.
    metadata: dict[str, Any] | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict.values())


@dataclass(frozen=True)
class TiPayload:
    # (trigger token, {TI-file key: [num_vectors, dim]}); key "" for a single-tensor file
    vectors: tuple[tuple[str, dict[str, torch.Tensor]], ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _n, per in self.vectors for t in per.values())


@dataclass(frozen=True)
class DreamBoothPayload:
    files: tuple[FileRecord, ...]
    components: tuple[str, ...] = field(default=())

    @property
    def nbytes(self) -> int:
        return 0


Payload = LoraPayload | TiPayload | DreamBoothPayload


def _read_safetensors(record: FileRecord, path: Path, what: str) -> dict[str, torch.Tensor]:
    if not record.path.endswith(".safetensors"):
        raise FailedPrecondition(f"{what}: only .safetensors files are loaded, got {record.path}")
    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as exc:
        raise DataLoss(f"{what}: unreadable safetensors file ({exc})") from None


def _pick(manifest: AdapterManifest, preferred: str) -> FileRecord:
    record = manifest.file(preferred)
    if record is not None:
        return record
    candidates = [f for f in manifest.files if f.path.endswith(".safetensors")]
    if len(candidates) == 1:
        return candidates[0]
    raise FailedPrecondition(f"adapter {manifest.ref}: no {preferred} among its files")


def _lora_metadata(path: Path) -> dict[str, Any] | None:
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    raw = header.get(LORA_METADATA_KEY)
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        raise DataLoss(f"{path.name}: unreadable {LORA_METADATA_KEY} header") from None


def lora_payload(manifest: AdapterManifest, local: dict[str, Path]) -> LoraPayload:
    record = _pick(manifest, LORA_WEIGHTS_FILE)
    path = local[record.path]
    state_dict = _read_safetensors(record, path, f"adapter {manifest.ref}")
    return LoraPayload(state_dict, _lora_metadata(path))


def ti_payload(manifest: AdapterManifest, local: dict[str, Path]) -> TiPayload:
    record = _pick(manifest, TI_EMBEDS_FILE)
    tensors = _read_safetensors(record, local[record.path], f"adapter {manifest.ref}")
    return TiPayload(tuple(_triggers(manifest, tensors)))


def _triggers(manifest: AdapterManifest,
              tensors: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Map file entries to trigger tokens: by name, or the single entry to the single trigger;
    a per-encoder file (clip_l/clip_g) is one trigger's vectors, keyed by encoder."""
    entries = {k: v for k, v in tensors.items() if k not in _TI_METADATA_KEYS and v.dim() in (1, 2)}
    if not entries:
        raise FailedPrecondition(f"adapter {manifest.ref}: no embedding tensor in its file")
    as_2d = {k: (v if v.dim() == 2 else v.unsqueeze(0)).float() for k, v in entries.items()}
    triggers: Sequence[str] = manifest.trigger_tokens
    if set(as_2d) <= TI_ENCODER_KEYS:
        if len(triggers) != 1:
            raise FailedPrecondition(f"adapter {manifest.ref}: a per-encoder embedding file holds one trigger, "
                                     f"the manifest names {list(triggers)}")
        return [(triggers[0], as_2d)]
    if len(as_2d) == 1 and len(triggers) <= 1:
        name, tensor = next(iter(as_2d.items()))
        return [(triggers[0] if triggers else name, {"": tensor})]
    if triggers and not set(triggers) <= set(as_2d):
        missing = sorted(set(triggers) - set(as_2d))
        raise FailedPrecondition(f"adapter {manifest.ref}: trigger tokens {missing} have no embedding")
    names = list(triggers) if triggers else sorted(as_2d)
    return [(name, {"": as_2d[name]}) for name in names]


def dreambooth_payload(manifest: AdapterManifest) -> DreamBoothPayload:
    components = sorted({f.path.split("/", 1)[0] for f in manifest.files if "/" in f.path})
    if not {*DENOISERS, "text_encoder"} & set(components):
        raise FailedPrecondition(f"adapter {manifest.ref}: no unet/, transformer/ or text_encoder/ component files")
    return DreamBoothPayload(tuple(manifest.files), tuple(components))
