"""Check adapter tensors against the base model before anything is stored.

A LoRA for another architecture (SD1.5 LoRA on SDXL, a text-encoder LoRA of the wrong
width) or an embedding of the wrong width would otherwise only fail later, at generation
time, or worse load partially. Every check raises FailedPrecondition naming the first
offending key *as it appears in the user's file* (callers pass the original key), with the
expected and actual shapes, and field "file".
"""

from __future__ import annotations

from services.common.errors import FailedPrecondition
from services.registry.interop.shapes import BaseModelShapes, ModuleShape

FIELD = "file"


def _fail(key: str, message: str) -> FailedPrecondition:
    return FailedPrecondition(f"{key}: {message}", FIELD)


def require_module(shapes: BaseModelShapes, key: str, component: str, path: str | None) -> ModuleShape:
    """The module a LoRA key targets, or FailedPrecondition when the base has no such module."""
    if component not in shapes.modules:
        raise _fail(key, f"base model {shapes.name!r} has no {component} (adapter made for another architecture?)")
    module = shapes.module(component, path) if path is not None else None
    if module is None:
        raise _fail(
            key,
            f"no {component} module {path or key!r} in base model {shapes.name!r} "
            f"({shapes.architecture}); the adapter was made for a different architecture",
        )
    return module


def unknown_module(shapes: BaseModelShapes, key: str, component: str, name: str) -> FailedPrecondition:
    """The error for a foreign module name the base model does not have."""
    family = shapes.model_family
    if component not in shapes.modules and component in family.components:
        return _fail(key, f"LoRA on {component} is not supported for {family.title} base models ({shapes.name!r})")
    if component not in shapes.modules:
        return _fail(key, f"base model {shapes.name!r} has no {component} (adapter made for another architecture?)")
    return _fail(
        key,
        f"no {component} module named {name!r} in base model {shapes.name!r} ({shapes.architecture}); "
        "the adapter was made for a different architecture",
    )


def check_lora_shapes(
    key: str, module: ModuleShape, down: tuple[int, ...], up: tuple[int, ...], component: str, path: str
) -> int:
    """Validate one LoRA pair (down = A = [r, in(, kh, kw)], up = B = [out, r(, 1, 1)]); return the rank."""
    w = module.weight
    where = f"{component} module {path!r} (weight {list(w)})"
    if len(down) != len(w) or len(up) != len(w):
        raise _fail(key, f"LoRA tensors of rank {len(down)}/{len(up)} do not fit {where}")
    rank = down[0]
    if rank < 1 or up[1] != rank:
        raise _fail(key, f"LoRA down {list(down)} and up {list(up)} disagree on the rank")
    if down[1] != w[1]:
        raise _fail(key, f"LoRA input width {down[1]} does not match {where}: expected {w[1]}")
    if up[0] != w[0]:
        raise _fail(key, f"LoRA output width {up[0]} does not match {where}: expected {w[0]}")
    if module.is_conv and (tuple(down[2:]) != tuple(w[2:]) or tuple(up[2:]) != (1, 1)):
        raise _fail(key, f"LoRA kernels {list(down[2:])}/{list(up[2:])} do not fit {where}")
    return rank


def check_embedding(shapes: BaseModelShapes, key: str, shape: tuple[int, ...], component: str) -> int:
    """Validate a textual-inversion tensor ([dim] or [n, dim]); return its vector count."""
    dim = shapes.embedding_dims.get(component)
    if dim is None:
        raise _fail(key, f"base model {shapes.name!r} has no {component} for this embedding")
    if len(shape) not in (1, 2) or shape[-1] != dim or (len(shape) == 2 and shape[0] < 1):
        raise _fail(
            key,
            f"embedding shape {list(shape)} does not fit {component} of base model {shapes.name!r}: "
            f"expected [n, {dim}] (text-encoder width {dim})",
        )
    return 1 if len(shape) == 1 else shape[0]
