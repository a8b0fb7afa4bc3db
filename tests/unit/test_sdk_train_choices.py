"""SDK and CLI: optimizer / learning-rate schedule names become the proto enums, else a clear error."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from atelier.cli.main import app
from atelier.requests import TrainArgs, training_request
from atelier_api.v1 import training_pb2


def _hyper(**options: Any) -> training_pb2.Hyperparameters:
    args = TrainArgs(method="lora", base_model="tiny", dataset="ds", name="n", extra=options)
    return training_request(args, None).spec.hyperparameters


@pytest.mark.parametrize(("options", "optimizer", "kind"), [
    ({"optimizer": "prodigy", "lr_scheduler": "cosine_with_restarts"},
     training_pb2.OPTIMIZER_KIND_PRODIGY, training_pb2.LR_SCHEDULER_KIND_COSINE_WITH_RESTARTS),
    ({"optimizer": "AdamW-8bit", "lr_scheduler": "Cosine-With-Restarts"},
     training_pb2.OPTIMIZER_KIND_ADAMW_8BIT, training_pb2.LR_SCHEDULER_KIND_COSINE_WITH_RESTARTS),
    ({"optimizer": training_pb2.OPTIMIZER_KIND_ADAFACTOR,
      "lr_scheduler_kind": training_pb2.LR_SCHEDULER_KIND_POLYNOMIAL},
     training_pb2.OPTIMIZER_KIND_ADAFACTOR, training_pb2.LR_SCHEDULER_KIND_POLYNOMIAL),
    ({"optimizer": "OPTIMIZER_KIND_ADAMW", "lr_scheduler_kind": "LR_SCHEDULER_KIND_LINEAR"},
     training_pb2.OPTIMIZER_KIND_ADAMW, training_pb2.LR_SCHEDULER_KIND_LINEAR),
])
def test_names_and_enum_values_map_to_the_enums(options: dict[str, Any], optimizer: int, kind: int) -> None:
    hyper = _hyper(**options)
    assert (hyper.optimizer, hyper.lr_scheduler_kind) == (optimizer, kind)
    assert not hyper.HasField("lr_scheduler")


def test_legacy_constant_with_warmup_stays_the_string_field() -> None:
    hyper = _hyper(lr_scheduler="constant_with_warmup")
    assert hyper.lr_scheduler == "constant_with_warmup" and hyper.lr_scheduler_kind == 0


@pytest.mark.parametrize(("options", "error", "param", "listed"), [
    ({"optimizer": "sgd"}, ValueError, "optimizer", "prodigy"),
    ({"optimizer": 99}, ValueError, "optimizer", "adafactor"),
    ({"optimizer": 1.5}, TypeError, "optimizer", "adamw"),
    ({"optimizer": True}, TypeError, "optimizer", "adamw"),
    ({"lr_scheduler": "step"}, ValueError, "lr_scheduler", "cosine_with_restarts"),
    ({"lr_scheduler_kind": "constant_with_warmup"}, ValueError, "lr_scheduler_kind", "polynomial"),
    ({"lr_scheduler_kind": 42}, ValueError, "lr_scheduler_kind", "constant"),
])
def test_anything_else_names_the_parameter_and_the_accepted_names(
        options: dict[str, Any], error: type[Exception], param: str, listed: str) -> None:
    with pytest.raises(error) as raised:
        _hyper(**options)
    assert str(raised.value).startswith(param) and repr(listed) in str(raised.value)


def test_cli_refuses_an_unknown_optimizer_before_calling() -> None:
    """Port 1 has no server: the refusal must come from the parsing, with exit code 2."""
    result = CliRunner().invoke(app, ["--target", "127.0.0.1:1", "train", "lora", "--base", "tiny", "--dataset", "ds",
                                      "--name", "n", "--prompt", "p", "--optimizer", "sgd", "--lr-scheduler", "cosine"])
    assert result.exit_code == 2, result.output
    assert "optimizer" in result.output and "prodigy" in result.output
    shown = CliRunner().invoke(app, ["train", "lora", "--help"], env={"COLUMNS": "200"})
    assert "--optimizer" in shown.output and "--lr-scheduler" in shown.output
