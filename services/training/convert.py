"""Job records and events <-> TrainingService protobuf messages."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, timestamp_pb2

from atelier_api.v1 import common_pb2, training_pb2
from services.common.errors import InvalidInput
from services.training.records import JobEvent, JobRecord
from services.training.schema import STATES
from services.training.trainers.config import METHOD_TO_KIND

_STATE_TO_PROTO = {name: training_pb2.JobState.Value(f"JOB_STATE_{name}") for name in STATES}
_PROTO_TO_STATE: dict[int, str] = {int(v): k for k, v in _STATE_TO_PROTO.items()}
_KIND_TO_METHOD = {v: k for k, v in METHOD_TO_KIND.items()}


def spec_to_dict(spec: training_pb2.TrainingJobSpec) -> dict[str, Any]:
    """The spec as JSON for the job row (proto field names; round-trips exactly)."""
    return json_format.MessageToDict(spec, preserving_proto_field_name=True)


def spec_from_dict(data: dict[str, Any]) -> training_pb2.TrainingJobSpec:
    return json_format.ParseDict(data, training_pb2.TrainingJobSpec(), ignore_unknown_fields=True)


def state_filter(value: int) -> str | None:
    """A JobState filter: None for UNSPECIFIED (no filter)."""
    if value == training_pb2.JOB_STATE_UNSPECIFIED:
        return None
    if value not in _PROTO_TO_STATE:
        raise InvalidInput("state", f"unknown job state {value}")
    return _PROTO_TO_STATE[value]


def method_filter(value: int) -> str | None:
    if value == common_pb2.ADAPTER_KIND_UNSPECIFIED:
        return None
    if value not in _KIND_TO_METHOD:
        raise InvalidInput("method", f"unknown method {value}")
    return _KIND_TO_METHOD[value]


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
    if (published := event.published) is not None:
        response.published.CopyFrom(common_pb2.AdapterRef(name=published[0], version=published[1]))
    return response
