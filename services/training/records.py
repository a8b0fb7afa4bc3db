"""Plain records the job store returns; no SQLAlchemy or protobuf types leak out of it."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import InvalidInput
from services.training.schema import TERMINAL_STATES


@dataclass(frozen=True)
class JobRecord:
    """One row of the jobs table."""

    id: str
    tenant: str
    request_id: str
    method: str
    state: str
    spec: dict[str, Any]
    config: dict[str, Any] | None
    step: int
    total_steps: int
    loss: float | None
    learning_rate: float | None
    eta_seconds: float | None
    attempts: int
    error: str
    worker_id: str | None
    lease_expires_at: float | None
    cancel_requested: bool
    output_name: str
    output_version: int | None
    resumed_from_step: int
    metrics: dict[str, float]
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    webhook_url: str = ""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> JobRecord:
        values = dict(row)
        values["metrics"] = dict(values.get("metrics") or {})
        values["cancel_requested"] = bool(values["cancel_requested"])
        values["error"] = values.get("error") or ""
        values["webhook_url"] = values.get("webhook_url") or ""
        values.pop("webhook_secret", None)  # the HMAC key stays in the store
        return cls(**values)


@dataclass(frozen=True)
class ValidationPreview:
    """One validation image a trainer rendered, as PNG bytes."""

    step: int
    prompt: str
    png: bytes

    def to_json(self) -> dict[str, Any]:
        """The JSON-safe form the event log stores (PNG bytes base64-encoded)."""
        return {"step": self.step, "prompt": self.prompt, "png_b64": base64.b64encode(self.png).decode()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ValidationPreview:
        """Read back what `to_json` wrote."""
        return cls(int(data["step"]), str(data["prompt"]), base64.b64decode(data["png_b64"]))


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's event log, which WatchTrainingJob replays."""

    id: int
    job_id: str
    created_at: float
    kind: str
    state: str
    step: int
    loss: float | None
    learning_rate: float | None
    eta_seconds: float | None
    message: str
    payload: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> JobEvent:
        values = dict(row)
        values["payload"] = dict(values.get("payload") or {})
        values["message"] = values.get("message") or ""
        return cls(**values)

    @property
    def published(self) -> tuple[str, int] | None:
        """(adapter name, version) on the event that records a publish."""
        if self.kind != "published":
            return None
        return str(self.payload["name"]), int(self.payload["version"])

    @property
    def previews(self) -> list[ValidationPreview]:
        return [ValidationPreview.from_json(p) for p in self.payload.get("images", [])]


def previews_payload(previews: list[ValidationPreview]) -> dict[str, Any]:
    """JSON-safe form of validation previews for the event log."""
    return {"images": [p.to_json() for p in previews]}


@dataclass(frozen=True)
class LeaseStatus:
    """What a worker learns each time it touches its job: is it still mine, is it cancelled."""

    owned: bool
    cancel_requested: bool = False


def encode_page_token(created_at: float, job_id: str) -> str:
    raw = json.dumps({"c": created_at, "i": job_id}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_page_token(token: str) -> tuple[float, str]:
    """Parse a token made by `encode_page_token`; InvalidInput on anything else."""
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        return float(data["c"]), str(data["i"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput("page_token", "not a token returned by this API") from exc
