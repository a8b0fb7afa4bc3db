"""kohya sd-scripts LoRA (read by A1111 and ComfyUI) <-> our stored layout, for every family.

kohya names a module by flattening its original path with "_" under a prefix: the denoiser
`lora_unet_` (a transformer's flattened diffusers paths are also read under `lora_transformer_`,
as OneTrainer writes them), text encoders by the family's slot prefixes (`lora_te_` SD 1.x/2.x,
`lora_te1_`/`lora_te2_` SDXL, `lora_te1_` Flux CLIP-L), each with `.lora_down.weight`
(= PEFT lora_A), `.lora_up.weight` (= lora_B) and an optional scalar `.alpha`. Which original
names a denoiser has is the family's key map (`services/families/<name>/interop.py`): SD 1.x
diffusers-style paths, SDXL sgm numbering, Flux BFL module names, where one original module
may fuse several diffusers Linears (Flux `img_attn.qkv`, `linear1`).

"_" flattening is not reversible by string rules, so both directions go through a table built
from the base model's real module list: every LoRA-targetable module's kohya name(s) -> a
group of (component, paths). An unknown name is therefore exactly "this base model has no
such module" and is refused with FAILED_PRECONDITION.

Fused modules: importing splits the down/up pair into one LoRA per diffusers Linear: when the
up matrix is block diagonal with equal rank blocks (what exporters write, sd-scripts'
`split_qkv` included) each part gets its own block, else every part shares the down matrix and
takes its rows of up; parts whose rows are all zero are dropped (no-ops). Exporting writes the
concatenated downs and the block-diagonal up (a missing part gets zero blocks), alpha = total
rank. Both are exact: the weight delta up @ down is unchanged.

Scaling follows kohya: scale = alpha / rank; a missing alpha or alpha == 0 means alpha = rank.
"""

from __future__ import annotations

import collections
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from types import ModuleType

import torch

from services.common.errors import FailedPrecondition, InvalidInput
from services.registry.interop.ldm_names import UnetNameMap
from services.registry.interop.lora_layout import ModuleLora, folded_up
from services.registry.interop.shapes import ARCH_SD2, UNET, BaseModelShapes, ModuleShape
from services.registry.interop.validate import check_lora_shapes, unknown_module

FIELD = "file"
_ROLE = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_PEFT_ROLE = re.compile(r"^(?P<mod>.+)\.(?P<role>lora_[AB]\.weight|lora_down\.weight|lora_up\.weight|alpha)$")
_TO_KOHYA_ROLE = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


@dataclass(frozen=True)
class KohyaGroup:
    """The diffusers modules one kohya name covers (several when the original fuses them)."""

    component: str
    parts: tuple[str, ...]
    swapped: bool = False  # up rows' two halves are in the other order (Flux final AdaLN)


@dataclass(frozen=True)
class Tables:
    to_group: dict[str, KohyaGroup]  # kohya name -> group
    to_name: dict[tuple[str, str], str]  # (component, path) -> the kohya name we export
    originals: dict[str, str]  # dotted original denoiser name -> kohya name


def key_map(shapes: BaseModelShapes) -> ModuleType:
    """The family's foreign-format key map, or FailedPrecondition when the family has none yet."""
    family = shapes.model_family
    folder = f"services.families.{family.name}"
    try:
        return family.part("interop")
    except ModuleNotFoundError as exc:
        if exc.name not in (folder, f"{folder}.interop"):
            raise
        raise FailedPrecondition(
            f"base model {shapes.name!r} is {family.title} ({family.name}), which has no key map for "
            "kohya/A1111 files yet; use the diffusers format", "base_model",
        ) from None


def _flat(path: str) -> str:
    return path.replace(".", "_")


def _kohya_te_path(path: str) -> str:
    """kohya keeps transformers 4's `text_model.` level (absent in transformers 5 CLIPTextModel)."""
    return path if path.startswith("text_model.") or path == "text_projection" else f"text_model.{path}"


def _original_namer(shapes: BaseModelShapes) -> UnetNameMap | None:
    return UnetNameMap(shapes.denoiser_config) if shapes.denoiser == UNET else None


@lru_cache(maxsize=16)
def tables(shapes: BaseModelShapes) -> Tables:
    """The name tables of one base model (cached per shapes instance)."""
    km, family = key_map(shapes), shapes.model_family
    names = _original_namer(shapes)

    def original(path: str) -> str | None:
        try:
            return names.to_ldm(path) if names else None
        except FailedPrecondition:
            return None

    t = Tables({}, {}, {})
    den, prefix = shapes.denoiser, family.kohya_denoiser_prefix
    for written, parts, swapped in km.kohya_groups(shapes.modules[den], original):
        group = KohyaGroup(den, tuple(parts), bool(swapped))
        for n in written:
            t.to_group.setdefault(prefix + _flat(n), group)
            t.originals.setdefault(n, prefix + _flat(n))
        for part in parts:
            t.to_name.setdefault((den, part), prefix + _flat(written[0]))
    if not prefix.endswith(f"_{den}_"):  # `lora_transformer_<diffusers path>` (OneTrainer) is read too
        for path in shapes.modules[den]:
            t.to_group.setdefault(f"lora_{den}_{_flat(path)}", KohyaGroup(den, (path,)))
    for slot in family.text_encoders:
        for path in shapes.modules.get(slot.encoder, {}) if slot.kohya_prefixes else ():
            flat = _flat(_kohya_te_path(path))
            t.to_name[(slot.encoder, path)] = slot.kohya_prefixes[0] + flat
            for p in slot.kohya_prefixes:
                t.to_group.setdefault(p + flat, KohyaGroup(slot.encoder, (path,)))
    return t


def _component_of(shapes: BaseModelShapes, name: str) -> str:
    """The component a kohya name is meant for (in this family, else by kohya's convention), for
    errors: an SDXL `lora_te2_` name on an SD 1.x base is "no text_encoder_2", not "no unet module"."""
    for slot in shapes.model_family.text_encoders:
        if slot.kohya_prefixes and name.startswith(slot.kohya_prefixes):
            return slot.encoder
    if name.startswith("lora_te2_"):
        return "text_encoder_2"
    return "text_encoder" if name.startswith("lora_te") else shapes.denoiser


def split_original_names(
    tensors: dict[str, torch.Tensor], shapes: BaseModelShapes
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT-keyed tensors that use the denoiser's original names (`diffusion_model.double_blocks.0.
    img_attn.qkv.lora_A.weight`: ComfyUI, ai-toolkit's ComfyUI files) renamed to kohya keys, and
    kohya key -> the user's key. Keys with diffusers names under those prefixes are left alone."""
    out: dict[str, torch.Tensor] = {}
    users: dict[str, str] = {}
    prefixes = tuple(key_map(shapes).ORIGINAL_PREFIXES)
    if not prefixes:
        return out, users
    originals = tables(shapes).originals
    for key in tensors:
        if not key.startswith(prefixes):
            continue
        rest = key[len(next(p for p in prefixes if key.startswith(p))):]
        m = _PEFT_ROLE.match(rest)
        if m is None or m.group("mod") not in originals:
            continue
        role = _TO_KOHYA_ROLE.get(m.group("role"), m.group("role"))
        new = f"{originals[m.group('mod')]}.{role}"
        out[new], users[new] = tensors[key], key
    return out, users


def import_kohya(
    tensors: dict[str, torch.Tensor], shapes: BaseModelShapes, users: dict[str, str] | None = None
) -> list[ModuleLora]:
    """kohya state dict -> validated modules of the stored layout (first bad key named as the
    user spelt it: `users` maps renamed keys back)."""
    users = users or {}
    groups: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for key in sorted(tensors):
        name, _, suffix = key.partition(".")
        if suffix not in _ROLE:
            raise InvalidInput(FIELD, f"kohya LoRA key {users.get(key, key)!r} is not a lora_down/lora_up/alpha tensor")
        groups[name][_ROLE[suffix]] = key
    table = tables(shapes).to_group
    mods: list[ModuleLora] = []
    for name in sorted(groups, key=lambda n: users.get(f"{n}.lora_down.weight", n)):
        group = groups[name]
        if "down" not in group or "up" not in group:
            raise InvalidInput(FIELD, f"kohya LoRA module {name!r} needs both lora_down and lora_up weights")
        key = users.get(group["down"], group["down"])
        target = table.get(name)
        if target is None:
            raise unknown_module(shapes, key, _component_of(shapes, name), name)
        down, up = tensors[group["down"]], tensors[group["up"]]
        alpha = float(tensors[group["alpha"]].item()) if "alpha" in group else 0.0
        mods += _split(target, down, up, alpha, key, shapes)
    if not mods:
        raise InvalidInput(FIELD, "the file holds no LoRA tensors")
    return mods


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    half = up.shape[0] // 2
    return torch.cat([up[half:], up[:half]])


def _split(group: KohyaGroup, down: torch.Tensor, up: torch.Tensor, alpha: float, key: str,
           shapes: BaseModelShapes) -> list[ModuleLora]:
    """One kohya module -> the stored LoRA of each diffusers Linear it covers (validated)."""
    comp, parts = group.component, group.parts
    shapes_of = [shapes.modules[comp][p] for p in parts]
    outs = [s.weight[0] for s in shapes_of]
    fused = ModuleShape((sum(outs), *shapes_of[0].weight[1:]))
    rank = check_lora_shapes(key, fused, tuple(down.shape), tuple(up.shape), comp, "+".join(parts))
    alpha = alpha or float(rank)
    if group.swapped:
        up = _swap_halves(up)
    if len(parts) == 1:
        return [ModuleLora(comp, parts[0], down, up, alpha)]
    rows = torch.split(up, outs, dim=0)
    n = len(parts)
    if rank % n == 0 and _block_diagonal(rows, rank // n):
        r = rank // n
        mods = [ModuleLora(comp, p, down[j * r:(j + 1) * r].clone(), rows[j][:, j * r:(j + 1) * r].clone(), alpha / n)
                for j, p in enumerate(parts)]
    else:
        mods = [ModuleLora(comp, p, down.clone(), rows[j].clone(), alpha) for j, p in enumerate(parts)]
    # A part whose up rows are all zero changes nothing (our export's filler for untrained parts,
    # e.g. proj_mlp when only q/k/v were trained): it is not stored, unless every part is zero.
    live = [m for m in mods if torch.count_nonzero(m.up)]
    return live or mods


def _block_diagonal(rows: tuple[torch.Tensor, ...], r: int) -> bool:
    """Whether part j's rows of up are zero outside rank columns [j*r, (j+1)*r)."""
    for j, block in enumerate(rows):
        outside = torch.cat([block[:, : j * r], block[:, (j + 1) * r:]], dim=1)
        if torch.count_nonzero(outside):
            return False
    return True


def _kohya_alpha(m: ModuleLora) -> torch.Tensor:
    """kohya scale is alpha/rank; rsLoRA's alpha/sqrt(rank) becomes alpha*sqrt(rank)/rank."""
    alpha = m.alpha * math.sqrt(m.rank) if m.rslora else m.alpha
    return _alpha_tensor(alpha)


def _alpha_tensor(alpha: float) -> torch.Tensor:
    as_f32 = torch.tensor(alpha, dtype=torch.float32)
    return as_f32 if float(as_f32.item()) == alpha else torch.tensor(alpha, dtype=torch.float64)


def export_kohya(
    mods: list[ModuleLora], shapes: BaseModelShapes, title: str, description: str = "", trigger: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Stored modules -> (kohya tensors, ss_* and modelspec.* metadata)."""
    t = tables(shapes)
    by_name: dict[str, dict[str, ModuleLora]] = collections.defaultdict(dict)
    for m in mods:
        name = t.to_name.get((m.component, m.path))
        if name is None:
            raise FailedPrecondition(f"{m.component}.{m.path}: not a module of base model {shapes.name!r}", "ref")
        by_name[name][m.path] = m
    tensors: dict[str, torch.Tensor] = {}
    for name, present in by_name.items():
        group = t.to_group[name]
        if len(group.parts) == 1:
            m = present[group.parts[0]]
            down, up, alpha = m.down, m.up, _kohya_alpha(m)
        else:
            down, up, alpha = _fuse(group, present, shapes)
        tensors[f"{name}.lora_down.weight"] = down.contiguous()
        tensors[f"{name}.lora_up.weight"] = (_swap_halves(up) if group.swapped else up).contiguous()
        tensors[f"{name}.alpha"] = alpha
    return tensors, kohya_metadata(tensors, shapes, title, description, trigger)


def _fuse(group: KohyaGroup, present: dict[str, ModuleLora],
          shapes: BaseModelShapes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenated downs and block-diagonal up (scales folded, alpha = rank: scale 1)."""
    rank = max(m.rank for m in present.values())
    like = next(iter(present.values()))
    down_dtype = _common_dtype([m.down.dtype for m in present.values()])
    downs, ups = [], []
    for part in group.parts:
        m = present.get(part)
        if m is None:  # a part the adapter does not train: a zero block of the common rank
            out = shapes.modules[group.component][part].weight[0]
            downs.append(torch.zeros(rank, *like.down.shape[1:], dtype=down_dtype))
            ups.append(torch.zeros(out, rank, dtype=torch.float32))
        else:
            downs.append(m.down.to(down_dtype))
            ups.append(folded_up(m))
    up_dtype = _common_dtype([u.dtype for u in ups])
    down = torch.cat(downs, dim=0)
    up = torch.block_diag(*(u.to(up_dtype) for u in ups))
    return down, up, _alpha_tensor(float(down.shape[0]))


def _common_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for dtype in dtypes[1:]:
        out = torch.promote_types(out, dtype)
    return out


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def kohya_metadata(
    tensors: dict[str, torch.Tensor], shapes: BaseModelShapes, title: str, description: str, trigger: str
) -> dict[str, str]:
    """The sd-scripts/ModelSpec header fields A1111, ComfyUI and civitai display and check."""
    downs = {k[: -len(".lora_down.weight")]: v for k, v in tensors.items() if k.endswith(".lora_down.weight")}
    linear = [n for n, d in downs.items() if d.ndim == 2 or tuple(d.shape[2:]) == (1, 1)]
    conv = [n for n in downs if n not in linear]
    main = linear or conv
    dim = collections.Counter(int(downs[n].shape[0]) for n in main).most_common(1)[0][0]
    alpha = collections.Counter(float(tensors[f"{n}.alpha"].item()) for n in main).most_common(1)[0][0]
    spec = key_map(shapes).spec(shapes.architecture)
    resolution = shapes.resolution
    meta = {
        "ss_network_module": spec["network_module"],
        "ss_network_dim": str(dim),
        "ss_network_alpha": _num(alpha),
        "ss_base_model_version": spec["base_model_version"],
        "ss_v2": str(shapes.architecture == ARCH_SD2),
        "ss_output_name": title,
        "ss_training_comment": description or f"exported by Atelier ({title})",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{spec['architecture']}/lora",
        "modelspec.implementation": spec["implementation"],
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.now(UTC).date().isoformat(),
    }
    if conv:
        first = conv[0]
        conv_alpha = float(tensors[f"{first}.alpha"].item())
        meta["ss_network_args"] = json.dumps({"conv_dim": str(int(downs[first].shape[0])),
                                              "conv_alpha": _num(conv_alpha)})
    if description:
        meta["modelspec.description"] = description
    if trigger:
        meta["modelspec.trigger_phrase"] = trigger
    return meta
