"""Resumable training state as safetensors + JSON (never pickle).

A checkpoint directory holds `state.safetensors` (trainable weights, optimizer moments, torch
and CUDA RNG states; with publish=best also the best-so-far trainable weights under `best/`)
and `state.json` (step, optimizer hyper-parameters, lr-scheduler and grad-scaler counters,
numpy and Python RNG states, config, the validation tracker). `torch.save` of an optimizer is a
pickle, which the registry refuses, so the optimizer state is flattened: tensors go to
safetensors under `optim/<param index>/<key>`, scalars to JSON.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from services.common.errors import FailedPrecondition

FORMAT_VERSION = 1
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer | np.floating):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return None  # callables (lr lambdas) and other objects are rebuilt, not stored


def _split_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in opt_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{pid}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = _jsonable(value)
    return tensors, {"param_groups": _jsonable(opt_state["param_groups"]), "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, pid, key = name.split("/", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, entry in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_snapshot() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Global RNG states (dropout and anything else drawing from the global streams)."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    np_state = np.random.get_state()
    meta = {"numpy": _jsonable(list(np_state)), "python": _jsonable(random.getstate())}
    return tensors, meta


def rng_restore(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


@dataclass
class TrainingState:
    """Everything needed to continue a run at `step`."""

    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    extra: dict[str, Any]
    rng_tensors: dict[str, torch.Tensor]
    rng_meta: dict[str, Any]
    best: dict[str, torch.Tensor] | None = None  # publish=best: the trainable values at the lowest validation loss


def save_state(
    state_dir: Path,
    *,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    extra: dict[str, Any],
    best: dict[str, torch.Tensor] | None = None,
) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"trainable/{k}": v.detach().float().cpu().contiguous() for k, v in trainable.items()}
    tensors.update({f"best/{k}": v.detach().float().cpu().contiguous() for k, v in (best or {}).items()})
    opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
    rng_tensors, rng_meta = rng_snapshot()
    tensors.update(opt_tensors)
    tensors.update(rng_tensors)
    meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "optimizer": opt_meta,
        "lr_scheduler": _jsonable(lr_scheduler.state_dict()),
        "scaler": _jsonable(scaler.state_dict()) if scaler is not None else None,
        "rng": rng_meta,
        "extra": _jsonable(extra),
    }
    save_file(tensors, str(state_dir / STATE_TENSORS))
    (state_dir / STATE_JSON).write_text(json.dumps(meta))


def load_state(state_dir: Path) -> TrainingState:
    """Read a checkpoint directory written by `save_state`."""
    meta_path, tensor_path = state_dir / STATE_JSON, state_dir / STATE_TENSORS
    if not meta_path.is_file() or not tensor_path.is_file():
        raise FailedPrecondition(f"checkpoint {state_dir} is incomplete")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise FailedPrecondition(f"checkpoint format {meta.get('format_version')} is not supported")
    tensors = load_file(str(tensor_path))
    return TrainingState(
        step=int(meta["step"]),
        trainable={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("trainable/")},
        optimizer=_join_optimizer(tensors, meta["optimizer"]),
        lr_scheduler=meta["lr_scheduler"],
        scaler=meta["scaler"],
        extra=meta["extra"],
        rng_tensors={k: v for k, v in tensors.items() if k.startswith("rng/")},
        rng_meta=meta["rng"],
        best={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("best/")} or None,
    )
