"""GenerationSpec (proto) -> GenerationRequest, refusing bad input with the offending field named.

All violations of one request are reported together (one INVALID_ARGUMENT with a BadRequest
listing each field), so a client fixes its request in one round trip. Limits come from the
settings; unset fields get defaults (1 image, 30 steps, the base model's native size and its
family's guidance (SD/SDXL 7.5, Flux 3.5, filled in by the engine), a random seed that the
response returns).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from typing import Any

from atelier_api.v1 import common_pb2, inference_pb2
from services.common.config import Settings
from services.common.errors import FieldViolation, InvalidInput, Violations
from services.inference.init_images import InitImageFields, check_init_images
from services.inference.merge_methods import DARE_LINEAR, DARE_TIES, LINEAR, TIES, MergeSpec
from services.inference.textual_inversion import RESERVED_MARK
from services.inference.types import AdapterSpec, GenerationRequest
from services.registry.names import ALIAS_RULE, NAME_PATTERN, NAME_RULE, RESERVED_ALIASES, parse_base_ref
from services.registry.refs import AdapterRef

DEFAULT_STEPS = 30
MAX_GUIDANCE = 50.0
MAX_PROMPT_CHARS = 4096
WEIGHT_LIMIT = 2.0
SEED_LIMIT = 2**64

SCHEDULER_NAMES = {
    inference_pb2.SCHEDULER_KIND_UNSPECIFIED: "default",
    inference_pb2.SCHEDULER_KIND_DDIM: "ddim",
    inference_pb2.SCHEDULER_KIND_EULER: "euler",
    inference_pb2.SCHEDULER_KIND_EULER_ANCESTRAL: "euler_ancestral",
    inference_pb2.SCHEDULER_KIND_DPM_SOLVER_MULTISTEP: "dpm_solver_multistep",
    inference_pb2.SCHEDULER_KIND_PNDM: "pndm",
    inference_pb2.SCHEDULER_KIND_LMS: "lms",
}

MERGE_NAMES = {
    inference_pb2.MERGE_METHOD_UNSPECIFIED: LINEAR,
    inference_pb2.MERGE_METHOD_LINEAR: LINEAR,
    inference_pb2.MERGE_METHOD_TIES: TIES,
    inference_pb2.MERGE_METHOD_DARE_LINEAR: DARE_LINEAR,
    inference_pb2.MERGE_METHOD_DARE_TIES: DARE_TIES,
}


def _name_ok(value: str) -> bool:
    return bool(value) and ".." not in value and NAME_PATTERN.fullmatch(value) is not None


def _check_base_ref(ref: str, field: str, errors: Violations) -> None:
    """A base model is `name` (newest version) or `name@N`; the registry's parser decides."""
    try:
        parse_base_ref(ref, field)
    except InvalidInput as exc:
        errors.items.extend(exc.violations)


def check_ref(ref: common_pb2.AdapterRef, tenant: str, field: str, errors: Violations) -> AdapterRef:
    """Validate one AdapterRef message; returns the caller's (`tenant`'s) parsed reference."""
    if not _name_ok(ref.name):
        errors.add(f"{field}.name", "must not be empty" if not ref.name else NAME_RULE)
    selector = ref.WhichOneof("selector")
    version = ref.version if selector == "version" else None
    alias = ref.alias if selector == "alias" else None
    if version is not None and version < 1:
        errors.add(f"{field}.version", "must be a version number >= 1")
    if alias is not None and (not _name_ok(alias) or alias in RESERVED_ALIASES):
        errors.add(f"{field}.alias", ALIAS_RULE)
    return AdapterRef(tenant, ref.name, version, alias)


def check_refs(tenant: str, refs: Sequence[common_pb2.AdapterRef], weights: Sequence[float], prefix: str,
               ref_suffix: str, limit: int, errors: Violations) -> tuple[AdapterSpec, ...]:
    """Validate a list of `tenant`'s references (and weights); at most `limit`, each name once."""
    if len(refs) > limit:
        errors.add(prefix, f"{len(refs)} adapters given; at most {limit} per request")
    seen: dict[str, int] = {}
    specs = []
    for i, (ref, weight) in enumerate(zip(refs, weights, strict=True)):
        field = f"{prefix}[{i}]"
        parsed = check_ref(ref, tenant, field + ref_suffix, errors)
        if parsed.name in seen:
            errors.add(field + ref_suffix + ".name",
                       f"adapter {parsed.name!r} is already listed at index {seen[parsed.name]}")
        seen.setdefault(parsed.name, i)
        if not math.isfinite(weight) or abs(weight) > WEIGHT_LIMIT:
            errors.add(f"{field}.weight", f"must be within [-{WEIGHT_LIMIT:g}, {WEIGHT_LIMIT:g}], got {weight}")
        specs.append(AdapterSpec(parsed, float(weight), field))
    return tuple(specs)


def _check_prompt(value: str, field: str, required: bool, errors: Violations) -> None:
    if required and not value.strip():
        errors.add(field, "must not be empty")
    if len(value) > MAX_PROMPT_CHARS:
        errors.add(field, f"{len(value)} characters; at most {MAX_PROMPT_CHARS}")
    if RESERVED_MARK in value.lower():
        errors.add(field, f"contains the reserved token prefix '<{RESERVED_MARK}'")


def _check_side(value: int, field: str, settings: Settings, errors: Violations) -> None:
    if value == 0:
        return
    if value % 8:
        errors.add(field, f"must be a multiple of 8, got {value}")
    elif value > settings.max_image_side:
        errors.add(field, f"at most {settings.max_image_side} pixels, got {value}")


def with_family_defaults(request: GenerationRequest, part: Any, family_title: str) -> GenerationRequest:
    """The request with the base family's default guidance filled in; a negative prompt on a
    family without classifier-free guidance (Flux) is refused rather than silently ignored."""
    if request.negative_prompt and not part.NEGATIVE_PROMPT:
        raise InvalidInput("spec.negative_prompt", f"{family_title} uses embedded guidance and has no negative "
                           "prompt; leave it empty")
    if request.guidance_scale:
        return request
    return dataclasses.replace(request, guidance_scale=float(part.DEFAULT_GUIDANCE))


def check_size_multiple(request: GenerationRequest, width: int, height: int, multiple: int, base: str) -> None:
    """Sides the base model's latents can take exactly (Flux packs 2x2 latent patches: 16 px on
    a factor-8 VAE); diffusers would silently round a side down instead."""
    bad = [(name, value) for name, value in (("spec.width", width), ("spec.height", height)) if value % multiple]
    if bad:
        first, *more = [FieldViolation(name, f"must be a multiple of {multiple} on base model {base!r}, got {value}")
                        for name, value in bad]
        raise InvalidInput(first.subject, first.description, *more)


def check_latent_area(request: GenerationRequest, width: int, height: int, scale: int, budget: int,
                      base: str) -> None:
    """The size limit that tracks compute: latent pixels, so it follows the base model's VAE.

    Checked once the base model is known (parse_spec cannot know its scale factor); names the
    sides the caller set (both when neither was: the base's own default is too large).
    """
    area = (width // scale) * (height // scale)
    if area <= budget:
        return
    side = math.isqrt(budget) * scale
    message = (f"{width}x{height} px is {area} latent pixels on base model {base!r} (VAE scale factor {scale}); "
               f"at most {budget} latent pixels, {budget * scale * scale} px in all (e.g. {side}x{side})")
    fields = [name for name, value in (("spec.width", request.width), ("spec.height", request.height)) if value]
    first, *more = fields or ["spec.width", "spec.height"]
    raise InvalidInput(first, message, *[FieldViolation(name, message) for name in more])


def _check_merge(spec: inference_pb2.GenerationSpec, errors: Violations) -> MergeSpec:
    """merge_method / merge_density / merge_seed; density in (0, 1], 1 and seed 0 when unset."""
    method = MERGE_NAMES.get(spec.merge_method)
    if method is None:
        errors.add("spec.merge_method", f"unknown merge method {spec.merge_method}")
    density = spec.merge_density if spec.HasField("merge_density") else 1.0
    if not math.isfinite(density) or not 0.0 < density <= 1.0:
        errors.add("spec.merge_density", f"must be within (0, 1], got {spec.merge_density}")
    return MergeSpec(method or LINEAR, float(density), spec.merge_seed).normalised()


def _init_fields(spec: inference_pb2.GenerationSpec) -> InitImageFields:
    strength = spec.strength if spec.HasField("strength") else None
    return InitImageFields(spec.init_image, spec.mask_image, strength, spec.width, spec.height)


def parse_spec(spec: inference_pb2.GenerationSpec, settings: Settings, tenant: str) -> GenerationRequest:
    """Validate and normalise `tenant`'s GenerationSpec; InvalidInput lists every bad field."""
    errors = Violations()
    _check_base_ref(spec.base_model, "spec.base_model", errors)
    _check_prompt(spec.prompt, "spec.prompt", True, errors)
    _check_prompt(spec.negative_prompt, "spec.negative_prompt", False, errors)
    adapters = check_refs(tenant, [a.ref for a in spec.adapters], [a.weight for a in spec.adapters],
                          "spec.adapters", ".ref", settings.max_adapters_per_request, errors)
    if spec.num_images > settings.max_images_per_request:
        errors.add("spec.num_images", f"at most {settings.max_images_per_request}, got {spec.num_images}")
    if spec.steps > settings.max_inference_steps:
        errors.add("spec.steps", f"at most {settings.max_inference_steps}, got {spec.steps}")
    guidance = spec.guidance_scale  # 0 (unset): the family's default, chosen once the base is known
    if guidance != 0.0 and (not math.isfinite(guidance) or not 0.0 < guidance <= MAX_GUIDANCE):
        errors.add("spec.guidance_scale", f"must be within (0, {MAX_GUIDANCE:g}], got {spec.guidance_scale}")
    _check_side(spec.width, "spec.width", settings, errors)
    _check_side(spec.height, "spec.height", settings, errors)
    scheduler = SCHEDULER_NAMES.get(spec.scheduler)
    if scheduler is None:
        errors.add("spec.scheduler", f"unknown scheduler {spec.scheduler}")
    merge = _check_merge(spec, errors)
    init = check_init_images(_init_fields(spec), spec.steps or DEFAULT_STEPS, settings, errors)
    errors.raise_if_any()
    seed = spec.seed if spec.HasField("seed") else random.SystemRandom().randrange(SEED_LIMIT)
    return GenerationRequest(
        base_model=spec.base_model,
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        adapters=adapters,
        num_images=spec.num_images or 1,
        steps=spec.steps or DEFAULT_STEPS,
        guidance_scale=float(guidance),
        width=init.width or spec.width,
        height=init.height or spec.height,
        seed=seed,
        scheduler=scheduler or "default",
        merge=merge,
        init_image=init.image,
        mask_image=init.mask,
        strength=init.strength,
    )
