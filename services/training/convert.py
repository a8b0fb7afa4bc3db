"""TrainingService protobuf messages <-> plain values: the training edge.

In: specs -> `TrainConfig` (the caller's values, recipe defaults filled in by
`TrainConfig.resolve`), a CreateTrainingJob request -> `NewJob` with every bad field reported
at once, upload messages -> `UploadHeader` / `ImageChunk`, list filters -> names. Out: job
records and events -> messages. No module behind the servicer reads or builds a message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from atelier_api.v1 import common_pb2, training_pb2
from services.common.config import Settings
from services.common.errors import InvalidInput, Violations
from services.registry.names import validate_alias, validate_base_ref, validate_name
from services.training.records import JobEvent, JobRecord
from services.training.schema import STATES
from services.training.trainers.choices import Optimizer, same_schedule
from services.training.trainers.config import Method, Precision, TrainConfig, validate_config
from services.training.upload import ImageChunk, UploadHeader
from services.training.webhooks import validate_webhook

MAX_REQUEST_ID_CHARS = 128
_H = "spec.hyperparameters."
_STATE_TO_PROTO = {name: training_pb2.JobState.Value(f"JOB_STATE_{name}") for name in STATES}
_PROTO_TO_STATE: dict[int, str] = {int(v): k for k, v in _STATE_TO_PROTO.items()}
_KIND_TO_METHOD: dict[int, Method] = {
    common_pb2.ADAPTER_KIND_LORA: "LORA",
    common_pb2.ADAPTER_KIND_DREAMBOOTH: "DREAMBOOTH",
    common_pb2.ADAPTER_KIND_TEXTUAL_INVERSION: "TEXTUAL_INVERSION",
}
_PRECISION: dict[int, Precision] = {
    training_pb2.MIXED_PRECISION_UNSPECIFIED: "auto",
    training_pb2.MIXED_PRECISION_NO: "no",
    training_pb2.MIXED_PRECISION_FP16: "fp16",
    training_pb2.MIXED_PRECISION_BF16: "bf16",
}
OPTIMIZERS: dict[int, Optimizer] = {
    training_pb2.OPTIMIZER_KIND_UNSPECIFIED: "adamw",
    training_pb2.OPTIMIZER_KIND_ADAMW: "adamw",
    training_pb2.OPTIMIZER_KIND_ADAMW_8BIT: "adamw_8bit",
    training_pb2.OPTIMIZER_KIND_PRODIGY: "prodigy",
    training_pb2.OPTIMIZER_KIND_ADAFACTOR: "adafactor",
}
SCHEDULER_KINDS: dict[int, str] = {
    training_pb2.LR_SCHEDULER_KIND_CONSTANT: "constant",
    training_pb2.LR_SCHEDULER_KIND_LINEAR: "linear",
    training_pb2.LR_SCHEDULER_KIND_COSINE: "cosine",
    training_pb2.LR_SCHEDULER_KIND_COSINE_WITH_RESTARTS: "cosine_with_restarts",
    training_pb2.LR_SCHEDULER_KIND_POLYNOMIAL: "polynomial",
}
_SPEC_TEXT = ("base_model", "dataset_id", "output_name", "output_alias", "description", "instance_prompt")
_OPTIONAL_HYPER = (
    "learning_rate", "max_train_steps", "train_batch_size", "resolution", "gradient_accumulation_steps",
    "lr_scheduler", "lr_warmup_steps", "seed", "gradient_checkpointing", "snr_gamma", "noise_offset",
    "center_crop", "random_flip", "checkpointing_steps", "validation_steps", "train_text_encoder",
    "text_encoder_learning_rate", "max_grad_norm", "adam_weight_decay", "lr_num_cycles", "lr_power",
    "caption_dropout", "shuffle_tags", "keep_tokens", "heldout_validation", "overfit_patience", "stop_on_overfit",
    "publish",
)  # fmt: skip


# --- specs -> TrainConfig ---------------------------------------------------------------
def config_from_proto(spec: training_pb2.TrainingJobSpec, seed: int | None = None) -> TrainConfig:
    """Resolve a spec (see `TrainConfig.resolve`); InvalidInput lists every field that does
    not convert (unknown method or enum number, a scheduler kind contradicting its string)."""
    errors = Violations()
    config = read_config(spec, errors, seed)
    errors.raise_if_any()
    assert config is not None  # no method, no config: that is a violation
    return config


def config_from_stored_spec(data: dict[str, Any]) -> TrainConfig:
    """A job row's stored spec (`spec_to_dict`) resolved again (rows from before the
    resolved config was stored with the job)."""
    return config_from_proto(json_format.ParseDict(data, training_pb2.TrainingJobSpec()))


def read_config(spec: training_pb2.TrainingJobSpec, errors: Violations, seed: int | None = None) -> TrainConfig | None:
    """The spec's config, its conversion violations added to `errors`; None without a known method."""
    method = _KIND_TO_METHOD.get(spec.method)
    if method is None:
        errors.add("spec.method", "must be LORA, DREAMBOOTH or TEXTUAL_INVERSION")
        return None
    return TrainConfig.resolve(method, _spec_values(spec), _hyper_values(spec.hyperparameters, errors), seed)


def _given(message: Message, names: Iterable[str]) -> dict[str, Any]:
    """The optional fields of `message` that the caller set."""
    return {name: getattr(message, name) for name in names if message.HasField(name)}


def _spec_values(spec: training_pb2.TrainingJobSpec) -> dict[str, Any]:
    """Everything but the hyper-parameters; optional fields only where set."""
    pp, ti, lora = spec.prior_preservation, spec.textual_inversion, spec.lora
    out = {name: getattr(spec, name) for name in _SPEC_TEXT}
    out.update(with_prior_preservation=pp.enabled, class_prompt=pp.class_prompt, class_dataset_id=pp.class_dataset_id,
               placeholder_token=ti.placeholder_token, initializer_token=ti.initializer_token)
    if pp.HasField("weight"):
        out["prior_loss_weight"] = pp.weight
    out.update(_given(pp, ["num_class_images"]))
    out.update(_given(ti, ["num_vectors"]))
    out.update(_given(lora, ["rank", "alpha", "dropout", "use_dora", "conv_rank", "conv_alpha"]))
    for name in ("target_modules", "text_encoder_target_modules"):
        if modules := list(getattr(lora, name)):
            out[name] = modules
    return out


def _hyper_values(h: training_pb2.Hyperparameters, errors: Violations) -> dict[str, Any]:
    out = _given(h, _OPTIONAL_HYPER)
    out["mixed_precision"] = _PRECISION.get(h.mixed_precision, "auto")
    if h.validation_prompts:
        out["validation_prompts"] = list(h.validation_prompts)
    optimizer = OPTIMIZERS.get(h.optimizer)
    if optimizer is None:
        errors.add(_H + "optimizer", "unknown optimizer kind")
    else:
        out["optimizer"] = optimizer
    if h.lr_scheduler_kind and (schedule := _schedule(h.lr_scheduler_kind, out.get("lr_scheduler"), errors)):
        out["lr_scheduler"] = schedule
    return out


def _schedule(kind: int, given: str | None, errors: Violations) -> str | None:
    """The schedule `lr_scheduler_kind` names, None (and a violation) when unknown or contradicted."""
    name = SCHEDULER_KINDS.get(kind)
    if name is None:
        errors.add(_H + "lr_scheduler_kind", "unknown scheduler kind")
    elif given is not None and not same_schedule(name, given):
        errors.add(_H + "lr_scheduler_kind", f"{name!r} conflicts with lr_scheduler {given!r}")
    else:
        return name
    return None


# --- CreateTrainingJob ------------------------------------------------------------------
@dataclass(frozen=True)
class NewJob:
    """A CreateTrainingJob request that passed every check that needs no lookup."""

    request_id: str
    spec: dict[str, Any]  # the spec as the job row stores it (`spec_to_dict`)
    config: TrainConfig
    webhook: tuple[str, str] | None


def new_job_from_proto(request: training_pb2.CreateTrainingJobRequest, settings: Settings) -> NewJob:
    """Check the request: one InvalidInput lists every bad field. Whether the base model and
    datasets exist (NOT_FOUND), and the tokenizer checks, come after, in the servicer."""
    errors = Violations()
    errors.check(len(request.request_id) <= MAX_REQUEST_ID_CHARS, "request_id",
                 f"at most {MAX_REQUEST_ID_CHARS} characters")
    webhook = None
    with errors.collect():
        webhook = validate_webhook(request.webhook_url, request.webhook_secret)
    config = read_config(request.spec, errors)
    if config is not None:
        _check_names(config, errors)
        validate_config(config, settings, errors)
    errors.raise_if_any()
    assert config is not None
    return NewJob(request.request_id, spec_to_dict(request.spec), config, webhook)


def _check_names(config: TrainConfig, errors: Violations) -> None:
    """Registry name rules of the names the spec gives (an empty one is validate_config's)."""
    names = [(validate_name, config.output_name, "spec.output_name"),
             (validate_alias, config.output_alias, "spec.output_alias"),
             (validate_base_ref, config.base_model, "spec.base_model"),
             (validate_name, config.dataset_id, "spec.dataset_id")]
    if config.with_prior_preservation:
        names.append((validate_name, config.class_dataset_id, "spec.prior_preservation.class_dataset_id"))
    for check, value, field in names:
        if value:
            with errors.collect():
                check(value, field)


# --- uploads and list filters -----------------------------------------------------------
def upload_part(message: training_pb2.UploadDatasetRequest) -> UploadHeader | ImageChunk:
    """One message of an UploadDataset stream as the assembler takes it."""
    which = message.WhichOneof("payload")
    if which == "header":
        return UploadHeader(message.header.name)
    if which == "image":
        chunk = message.image
        return ImageChunk(chunk.index, chunk.filename, chunk.caption, chunk.data)
    raise InvalidInput("payload", "each message must carry a header or an image chunk")


def _filter(value: int, table: Mapping[int, str], field: str, what: str) -> str | None:
    """A list filter's name: None for 0 (UNSPECIFIED: no filter); InvalidInput when unknown."""
    if value == 0:
        return None
    if value not in table:
        raise InvalidInput(field, f"unknown {what} {value}")
    return table[value]


def state_filter(value: int) -> str | None:
    """A JobState filter: None for UNSPECIFIED (no filter)."""
    return _filter(value, _PROTO_TO_STATE, "state", "job state")


def method_filter(value: int) -> str | None:
    """An AdapterKind filter on the job's method: None for UNSPECIFIED."""
    return _filter(value, _KIND_TO_METHOD, "method", "method")


# --- out: records and events -> messages ------------------------------------------------
def spec_to_dict(spec: training_pb2.TrainingJobSpec) -> dict[str, Any]:
    """The spec as JSON for the job row (proto field names; round-trips exactly)."""
    return json_format.MessageToDict(spec, preserving_proto_field_name=True)


def spec_from_dict(data: dict[str, Any]) -> training_pb2.TrainingJobSpec:
    return json_format.ParseDict(data, training_pb2.TrainingJobSpec(), ignore_unknown_fields=True)


def _ts(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def job_to_proto(job: JobRecord) -> training_pb2.TrainingJob:
    message = training_pb2.TrainingJob(
        id=job.id,
        tenant=job.tenant,
        spec=spec_from_dict(job.spec),
        state=_STATE_TO_PROTO[job.state],
        step=job.step,
        total_steps=job.total_steps,
        loss=job.loss or 0.0,
        attempts=job.attempts,
        error=job.error,
        request_id=job.request_id,
        worker_id=job.worker_id or "",
        metrics=job.metrics,
        resumed_from_step=job.resumed_from_step,
        webhook_url=job.webhook_url,
    )
    for name in ("created_at", "started_at", "finished_at"):
        ts = _ts(getattr(job, name))
        if ts is not None:
            getattr(message, name).CopyFrom(ts)
    if job.state == "SUCCEEDED" and job.output_version:
        message.output.CopyFrom(common_pb2.AdapterRef(name=job.output_name, version=job.output_version))
    return message


def snapshot_response(job: JobRecord, message: str = "") -> training_pb2.WatchTrainingJobResponse:
    """The first message of a Watch: the job as it stands now."""
    response = training_pb2.WatchTrainingJobResponse(
        job=job_to_proto(job),
        step=job.step,
        loss=job.loss or 0.0,
        learning_rate=job.learning_rate or 0.0,
        eta_seconds=job.eta_seconds or 0.0,
        message=message or f"job is {job.state}",
    )
    if job.state == "SUCCEEDED" and job.output_version:
        response.published.CopyFrom(common_pb2.AdapterRef(name=job.output_name, version=job.output_version))
    return response


def event_response(event: JobEvent, job: JobRecord) -> training_pb2.WatchTrainingJobResponse:
    """One logged event, with the job as it stood after it (state and step from the event)."""
    snapshot = job_to_proto(job)
    snapshot.state = _STATE_TO_PROTO[event.state]
    if event.state != "SUCCEEDED":
        snapshot.ClearField("output")
    if event.kind in ("progress", "published"):
        snapshot.step = event.step
    response = training_pb2.WatchTrainingJobResponse(
        job=snapshot,
        step=event.step,
        loss=event.loss or 0.0,
        learning_rate=event.learning_rate or 0.0,
        eta_seconds=event.eta_seconds or 0.0,
        message=event.message or event.kind,
        validation_images=[
            training_pb2.ValidationImage(step=p.step, prompt=p.prompt, png=p.png) for p in event.previews
        ],
    )
    if (held := event.payload.get("validation")) is not None:  # a held-out validation event
        response.validation_loss = float(held["loss"])
        response.best_validation_loss = float(held["best_loss"])
        response.best_step = int(held["best_step"])
        response.overfit_warning = str(held.get("warning", ""))
    if (published := event.published) is not None:
        response.published.CopyFrom(common_pb2.AdapterRef(name=published[0], version=published[1]))
    return response
