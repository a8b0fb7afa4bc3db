"""Optimizer and learning-rate schedule names for `Client.train` and `atelier train`.

`optimizer=` and `lr_scheduler=` (or `lr_scheduler_kind=`) take a short lower-case name
("prodigy", "cosine_with_restarts"; "-" and "_" are interchangeable), the proto enum's
name ("OPTIMIZER_KIND_PRODIGY") or its number. A schedule given by name is sent as the
`lr_scheduler_kind` enum, so the server checks it as one; "constant_with_warmup", a
diffusers name older than the enum, still travels in the string field `lr_scheduler`.
Anything else is a ValueError naming the parameter and listing the accepted names, raised
before any call, rather than an INVALID_ARGUMENT from the server later.
"""

from __future__ import annotations

from typing import Any

from atelier_api.v1 import training_pb2

OPTIMIZERS: dict[str, int] = {
    "adamw": training_pb2.OPTIMIZER_KIND_ADAMW,
    "adamw_8bit": training_pb2.OPTIMIZER_KIND_ADAMW_8BIT,
    "adamw8bit": training_pb2.OPTIMIZER_KIND_ADAMW_8BIT,
    "prodigy": training_pb2.OPTIMIZER_KIND_PRODIGY,
    "adafactor": training_pb2.OPTIMIZER_KIND_ADAFACTOR,
}
LR_SCHEDULERS: dict[str, int] = {
    "constant": training_pb2.LR_SCHEDULER_KIND_CONSTANT,
    "linear": training_pb2.LR_SCHEDULER_KIND_LINEAR,
    "cosine": training_pb2.LR_SCHEDULER_KIND_COSINE,
    "cosine_with_restarts": training_pb2.LR_SCHEDULER_KIND_COSINE_WITH_RESTARTS,
    "polynomial": training_pb2.LR_SCHEDULER_KIND_POLYNOMIAL,
}
LEGACY_LR_SCHEDULERS = ("constant_with_warmup",)  # sent as the string field, not the enum


def _normal(value: str) -> str:
    return value.strip().lower().replace("-", "_")


def _kind(param: str, value: Any, names: dict[str, int], prefix: str, accepted: list[str]) -> int:
    """The enum number `value` names; a ValueError/TypeError naming `param` lists `accepted`."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{param} must be a name or an enum value, one of {accepted}; got {value!r}")
    if isinstance(value, int):
        if value in names.values():
            return value
        raise ValueError(f"{param}: unknown enum value {value}; accepted names: {accepted}")
    key = _normal(value).removeprefix(prefix)
    if key in names:
        return names[key]
    raise ValueError(f"{param}: unknown name {value!r}; accepted names: {accepted}")


def set_optimizer(hyper: training_pb2.Hyperparameters, value: Any) -> None:
    hyper.optimizer = _kind("optimizer", value, OPTIMIZERS, "optimizer_kind_",  # type: ignore[assignment]
                            sorted(OPTIMIZERS))


def set_lr_scheduler(hyper: training_pb2.Hyperparameters, param: str, value: Any) -> None:
    """`lr_scheduler` / `lr_scheduler_kind`: the enum for kind names, the string for legacy ones."""
    legacy = LEGACY_LR_SCHEDULERS if param == "lr_scheduler" else ()
    if isinstance(value, str) and _normal(value) in legacy:
        hyper.lr_scheduler = _normal(value)
        return
    hyper.lr_scheduler_kind = _kind(param, value, LR_SCHEDULERS, "lr_scheduler_kind_",  # type: ignore[assignment]
                                    sorted([*LR_SCHEDULERS, *legacy]))
