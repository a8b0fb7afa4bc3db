"""Atelier Python SDK: `Client` / `AsyncClient` over the gRPC API, typed errors, adapter refs."""

from atelier.aio import AsyncClient
from atelier.client import Client, JobHandle
from atelier.errors import (
    AtelierRpcError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from atelier.refs import format_ref, parse_ref, parse_weighted
from atelier.requests import GenerationResult
from atelier.retry import RetryPolicy

__all__ = [
    "AsyncClient",
    "AtelierRpcError",
    "Client",
    "FailedPreconditionError",
    "FieldViolation",
    "GenerationResult",
    "InvalidArgumentError",
    "JobHandle",
    "NotFoundError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "UnavailableError",
    "format_ref",
    "parse_ref",
    "parse_weighted",
]
