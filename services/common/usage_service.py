"""UsageService over gRPC: the caller's device seconds per window, from this process's ledger.

Hosted by every Atelier server next to its own service, backed by the process's one
`UsageLedger` (services/common/usage.py). Training usage comes from the job store, which every
worker writes (services/training/usage_store.py): the training API answers for the fleet.
Generation usage is per inference replica (each answers for its own; the Prometheus counter
is the fleet-wide sum). A tenant sees its own usage; `all_tenants` needs an admin key.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from atelier_api.v1 import usage_pb2, usage_pb2_grpc
from services.common.auth import current_tenant, require_admin
from services.common.errors import InvalidInput
from services.common.server import ServiceBinding
from services.common.usage import UsageLedger

SERVICE_NAME = "atelier.v1.UsageService"
KINDS = {"training": usage_pb2.USAGE_KIND_TRAINING, "generation": usage_pb2.USAGE_KIND_GENERATION}


# google.protobuf.Timestamp's own valid range (0001-01-01 .. 9999-12-31): anything outside it
# cannot be echoed back as a Timestamp, so it is refused up front rather than failing the reply.
_MIN_SECONDS, _MAX_SECONDS = -62135596800, 253402300799


def _seconds(ts: timestamp_pb2.Timestamp, field: str) -> float:
    if not _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS or not 0 <= ts.nanos <= 999_999_999:
        raise InvalidInput(field, "must be a valid timestamp between years 1 and 9999")
    return ts.seconds + ts.nanos / 1e9


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    """Split without a float nanosecond product, clamped to the valid range: a float cannot hold
    9999-12-31T23:59:59.999999999 and rounds it one second past the end."""
    whole = math.floor(seconds)
    if whole > _MAX_SECONDS:
        return timestamp_pb2.Timestamp(seconds=_MAX_SECONDS, nanos=999_999_999)
    return timestamp_pb2.Timestamp(seconds=whole, nanos=min(999_999_999, int((seconds - whole) * 1e9)))


class UsageServicer(usage_pb2_grpc.UsageServiceServicer):
    def __init__(self, ledger: UsageLedger) -> None:
        self._ledger = ledger

    async def GetUsage(self, request: usage_pb2.GetUsageRequest,
                       context: grpc.aio.ServicerContext) -> usage_pb2.GetUsageResponse:
        start = _seconds(request.start_time, "start_time") if request.HasField("start_time") else None
        end = _seconds(request.end_time, "end_time") if request.HasField("end_time") else None
        if start is not None and end is not None and end <= start:
            raise InvalidInput("end_time", "must be after start_time")
        if request.all_tenants:
            require_admin("usage of every tenant")
        # A shared store (the job store, for training) makes the report a database read.
        report = await asyncio.to_thread(self._ledger.report, start, end,
                                         None if request.all_tenants else current_tenant())
        return usage_pb2.GetUsageResponse(
            totals=[usage_pb2.UsageTotal(tenant=t.tenant, kind=KINDS[t.kind], device=t.device, seconds=t.seconds)
                    for t in report.totals],
            start_time=_timestamp(report.start), end_time=_timestamp(report.end),
        )


def usage_bindings(ledger: UsageLedger, **_: Any) -> list[ServiceBinding]:
    servicer = UsageServicer(ledger)

    def register(server: grpc.aio.Server) -> None:
        usage_pb2_grpc.add_UsageServiceServicer_to_server(servicer, server)

    return [ServiceBinding(SERVICE_NAME, register)]
