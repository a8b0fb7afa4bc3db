"""Accounting requests: `Client.usage(...)` and `atelier usage` build them here."""

from __future__ import annotations

import datetime as dt

from google.protobuf import timestamp_pb2

from atelier_api.v1 import usage_pb2

TimeLike = float | dt.datetime | None
KIND_NAMES = {usage_pb2.USAGE_KIND_TRAINING: "training", usage_pb2.USAGE_KIND_GENERATION: "generation"}


def _timestamp(value: float | dt.datetime) -> timestamp_pb2.Timestamp:
    seconds = value.timestamp() if isinstance(value, dt.datetime) else float(value)
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def usage_request(start: TimeLike = None, end: TimeLike = None, all_tenants: bool = False) -> usage_pb2.GetUsageRequest:
    """[start, end) as epoch seconds or aware datetimes; None leaves that side open."""
    request = usage_pb2.GetUsageRequest(all_tenants=all_tenants)
    if start is not None:
        request.start_time.CopyFrom(_timestamp(start))
    if end is not None:
        request.end_time.CopyFrom(_timestamp(end))
    return request


def usage_rows(response: usage_pb2.GetUsageResponse) -> list[tuple[str, str, str, float]]:
    """(tenant, kind, device, seconds) per total, for tables and scripts."""
    return [(t.tenant, KIND_NAMES.get(t.kind, "unknown"), t.device, t.seconds) for t in response.totals]
