"""What a base model looks like, without loading its weights.

Importers must check foreign tensors against the base model an adapter is registered for
(module names, widths, kernel sizes) and exporters must name modules the way other tools
do. Both only need the module tree, which we get by instantiating the UNet and text
encoders from their `config.json` files on PyTorch's meta device: no weights are read and
a full SDXL UNet builds in about 0.1 s.

The model family (services.families: SD 1.x/2.x, SDXL, Flux) decides which components are
read: the denoiser (`unet` or `transformer`, of the family's diffusers class) and the CLIP
text encoders; T5 is never LoRA- or TI-targeted, so it is not instantiated. `architecture`
is the finer sub-architecture the formats still distinguish (sd1 vs sd2: OpenCLIP naming).

The module tree depends on the installed transformers version (transformers 5 dropped the
`text_model.` level of `CLIPTextModel`), so the table is always derived from the live
classes rather than hard-coded, and `text_model_prefix` records what the foreign formats
(which still carry `text_model`) must be translated to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.common.errors import FailedPrecondition
from services.families import FLUX, SD1, SDXL, ModelFamily, by_name, detect_index

UNET = "unet"
TRANSFORMER = "transformer"
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
TEXT_ENCODERS = (TEXT_ENCODER, TEXT_ENCODER_2)

ARCH_SD1 = "sd1"
ARCH_SD2 = "sd2"
ARCH_SDXL = "sdxl"
ARCH_FLUX = "flux"

# Only these classes are ever instantiated from a (foreign) model_index.json.
_TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
CONFIG_FILES = (
    "model_index.json",
    "unet/config.json",
    "transformer/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "vae/config.json",
)


@dataclass(frozen=True)
class ModuleShape:
    """A LoRA-targetable module: its weight shape (Linear: [out, in]; Conv2d: [out, in, kh, kw])."""

    weight: tuple[int, ...]

    @property
    def is_conv(self) -> bool:
        return len(self.weight) == 4


@dataclass(frozen=True, eq=False)
class BaseModelShapes:
    """The module table of one base model: enough to validate and rename adapter tensors.

    Compared and hashed by identity so derived tables can be cached per instance.
    """

    architecture: str
    denoiser_config: dict[str, Any]
    modules: dict[str, dict[str, ModuleShape]]
    embedding_dims: dict[str, int]
    # Whether each text encoder's module paths start with "text_model." (transformers < 5).
    text_model_prefix: dict[str, bool] = field(default_factory=dict)
    name: str = ""
    # Image side in pixels: UNet sample size times the VAE's downsampling factor.
    resolution: int = 512
    family: str = SD1.name  # services.families name

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.modules)

    @property
    def model_family(self) -> ModelFamily:
        return by_name(self.family)

    @property
    def denoiser(self) -> str:
        """The denoiser's component name: "unet" or "transformer"."""
        return self.model_family.denoiser

    @property
    def is_sdxl(self) -> bool:
        return self.architecture == ARCH_SDXL

    def module(self, component: str, path: str) -> ModuleShape | None:
        return self.modules.get(component, {}).get(path)

    @classmethod
    def from_dir(cls, path: Path, name: str = "") -> BaseModelShapes:
        """Read the configs of a diffusers pipeline folder (weights are not touched)."""
        configs: dict[str, dict[str, Any]] = {}
        for rel in CONFIG_FILES:
            p = path / rel
            if p.is_file():
                configs[rel] = json.loads(p.read_text())
        return cls.from_configs(configs, name=name or path.name)

    @classmethod
    def from_configs(cls, configs: dict[str, dict[str, Any]], name: str = "") -> BaseModelShapes:
        """Build from {"model_index.json": {...}, "unet/config.json": {...}, ...}."""
        index = configs.get("model_index.json", {})
        family = _family(index, configs, name)
        den_cfg = configs[f"{family.denoiser}/config.json"]
        modules = {family.denoiser: _denoiser_modules(den_cfg, family.denoiser_class)}
        dims: dict[str, int] = {}
        prefixes: dict[str, bool] = {}
        for slot in family.text_encoders:
            cfg = configs.get(f"{slot.encoder}/config.json")
            if cfg is None or slot.kind not in ("clip", "clip_projection"):
                continue
            model = _text_encoder_on_meta(cfg, _class_name(index, slot.encoder, cfg))
            modules[slot.encoder] = _linear_and_conv(model)
            dims[slot.encoder] = int(cfg.get("hidden_size", 0)) or _embedding_width(model)
            prefixes[slot.encoder] = hasattr(model, "text_model")
        arch = _architecture(family, dims)
        resolution = _resolution(family, den_cfg, configs.get("vae/config.json", {}))
        return cls(arch, den_cfg, modules, dims, prefixes, name, resolution, family.name)


def _family(index: dict[str, Any], configs: dict[str, dict[str, Any]], name: str) -> ModelFamily:
    """The family from model_index.json, else from which denoiser config is present."""
    family: ModelFamily | None = None
    try:
        family = detect_index(index) if index else None
    except FailedPrecondition:
        family = None
    if family is None:
        if configs.get("transformer/config.json", {}).get("_class_name") == FLUX.denoiser_class:
            family = FLUX
        elif "unet/config.json" in configs:
            unet = configs["unet/config.json"]
            xl = "text_encoder_2/config.json" in configs or unet.get("addition_embed_type") == "text_time"
            family = SDXL if xl else SD1
    if family is None or f"{family.denoiser}/config.json" not in configs:
        denoiser = family.denoiser if family else "unet"
        raise FailedPrecondition(f"base model {name!r} has no {denoiser}/config.json", "base_model")
    return family


def _resolution(family: ModelFamily, den_cfg: dict[str, Any], vae_cfg: dict[str, Any]) -> int:
    """Image side in pixels: a UNet's sample size times the VAE factor; Flux: the VAE's sample size."""
    if family.denoiser == UNET:
        vae_levels = len(vae_cfg.get("block_out_channels", [0] * 4))
        return int(den_cfg.get("sample_size", 64)) * 2 ** (vae_levels - 1)
    return int(vae_cfg.get("sample_size", 1024))


def _class_name(index: dict[str, Any], comp: str, cfg: dict[str, Any]) -> str:
    entry = index.get(comp)
    if isinstance(entry, list) and len(entry) == 2 and entry[1] in _TEXT_ENCODER_CLASSES:
        return str(entry[1])
    archs = cfg.get("architectures") or []
    if archs and archs[0] in _TEXT_ENCODER_CLASSES:
        return str(archs[0])
    return "CLIPTextModelWithProjection" if comp == TEXT_ENCODER_2 else "CLIPTextModel"


def _text_encoder_on_meta(cfg: dict[str, Any], class_name: str) -> torch.nn.Module:
    import transformers

    config = transformers.CLIPTextConfig.from_dict(cfg)
    model_cls = getattr(transformers, class_name)
    with torch.device("meta"):
        model: torch.nn.Module = model_cls(config)
    return model


def _embedding_width(model: torch.nn.Module) -> int:
    for name, param in model.named_parameters():
        if name.endswith("token_embedding.weight"):
            return int(param.shape[1])
    raise FailedPrecondition("text encoder has no token embedding", "base_model")


def _denoiser_modules(cfg: dict[str, Any], class_name: str) -> dict[str, ModuleShape]:
    """The denoiser's Linear/Conv2d table; only the family's own diffusers class is built."""
    import diffusers

    if cfg.get("_class_name") != class_name:
        raise FailedPrecondition(f"denoiser class {cfg.get('_class_name')!r} is not {class_name}", "base_model")
    clean = {k: v for k, v in cfg.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = getattr(diffusers, class_name).from_config(clean)
    return _linear_and_conv(model)


def _linear_and_conv(model: torch.nn.Module) -> dict[str, ModuleShape]:
    out: dict[str, ModuleShape] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear | torch.nn.Conv2d):
            out[name] = ModuleShape(tuple(int(d) for d in mod.weight.shape))
    return out


def _architecture(family: ModelFamily, dims: dict[str, int]) -> str:
    if family is SDXL:
        return ARCH_SDXL
    if family is FLUX:
        return ARCH_FLUX
    # SD2.x: the OpenCLIP ViT-H text encoder is 1024 wide (SD1.x's CLIP ViT-L is 768).
    return ARCH_SD2 if dims.get(TEXT_ENCODER) == 1024 else ARCH_SD1
