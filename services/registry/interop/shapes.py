"""What a base model looks like, without loading its weights.

Importers must check foreign tensors against the base model an adapter is registered for
(module names, widths, kernel sizes) and exporters must name modules the way other tools
do. Both only need the module tree, which we get by instantiating the UNet and text
encoders from their `config.json` files on PyTorch's meta device: no weights are read and
a full SDXL UNet builds in about 0.1 s.

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

UNET = "unet"
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
TEXT_ENCODERS = (TEXT_ENCODER, TEXT_ENCODER_2)

ARCH_SD1 = "sd1"
ARCH_SD2 = "sd2"
ARCH_SDXL = "sdxl"

# Only these classes are ever instantiated from a (foreign) model_index.json.
_TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
CONFIG_FILES = (
    "model_index.json",
    "unet/config.json",
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
    unet_config: dict[str, Any]
    modules: dict[str, dict[str, ModuleShape]]
    embedding_dims: dict[str, int]
    # Whether each text encoder's module paths start with "text_model." (transformers < 5).
    text_model_prefix: dict[str, bool] = field(default_factory=dict)
    name: str = ""
    # Image side in pixels: UNet sample size times the VAE's downsampling factor.
    resolution: int = 512

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.modules)

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
        unet_cfg = configs.get("unet/config.json")
        if unet_cfg is None:
            raise FailedPrecondition(f"base model {name!r} has no unet/config.json", "base_model")
        modules = {UNET: _unet_modules(unet_cfg)}
        dims: dict[str, int] = {}
        prefixes: dict[str, bool] = {}
        for comp in TEXT_ENCODERS:
            cfg = configs.get(f"{comp}/config.json")
            if cfg is None:
                continue
            model = _text_encoder_on_meta(cfg, _class_name(index, comp, cfg))
            modules[comp] = _linear_and_conv(model)
            dims[comp] = int(cfg.get("hidden_size", 0)) or _embedding_width(model)
            prefixes[comp] = hasattr(model, "text_model")
        arch = _architecture(index, unet_cfg, dims)
        vae_levels = len(configs.get("vae/config.json", {}).get("block_out_channels", [0] * 4))
        resolution = int(unet_cfg.get("sample_size", 64)) * 2 ** (vae_levels - 1)
        return cls(arch, unet_cfg, modules, dims, prefixes, name, resolution)


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


def _unet_modules(cfg: dict[str, Any]) -> dict[str, ModuleShape]:
    from diffusers import UNet2DConditionModel

    clean = {k: v for k, v in cfg.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(clean)
    return _linear_and_conv(unet)


def _linear_and_conv(model: torch.nn.Module) -> dict[str, ModuleShape]:
    out: dict[str, ModuleShape] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear | torch.nn.Conv2d):
            out[name] = ModuleShape(tuple(int(d) for d in mod.weight.shape))
    return out


def _architecture(index: dict[str, Any], unet_cfg: dict[str, Any], dims: dict[str, int]) -> str:
    cls = str(index.get("_class_name", ""))
    if "XL" in cls or TEXT_ENCODER_2 in dims or unet_cfg.get("addition_embed_type") == "text_time":
        return ARCH_SDXL
    # SD2.x: the OpenCLIP ViT-H text encoder is 1024 wide (SD1.x's CLIP ViT-L is 768).
    if dims.get(TEXT_ENCODER) == 1024:
        return ARCH_SD2
    return ARCH_SD1
