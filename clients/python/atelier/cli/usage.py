"""`atelier usage [--hours H | --start ISO --end ISO] [--all-tenants] [--via inference|training]`."""

from __future__ import annotations

import datetime as dt
import time

import typer

from atelier.cli.context import options
from atelier.cli.output import handle_errors, print_json, print_table, to_dict
from atelier.usage import usage_rows


def _parse_time(value: str, flag: str) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{flag}: not an ISO 8601 time: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)  # naive means UTC


@handle_errors
def usage(
    ctx: typer.Context,
    hours: float = typer.Option(24.0, "--hours", help="Window: the last H hours (ignored with --start)."),
    start: str = typer.Option("", "--start", help="Window start, ISO 8601 (naive = UTC)."),
    end: str = typer.Option("", "--end", help="Window end (exclusive), ISO 8601; default now."),
    all_tenants: bool = typer.Option(False, "--all-tenants", help="Every tenant (admin keys only)."),
    via: str = typer.Option("inference", "--via", help="Ask the inference or the training server."),
) -> None:
    """Device seconds per tenant, kind (training/generation) and device (cpu/gpu) in a window."""
    opts = options(ctx)
    begin: float | dt.datetime = _parse_time(start, "--start") if start else time.time() - hours * 3600
    finish = _parse_time(end, "--end") if end else None
    with opts.client() as client:
        response = client.usage(begin, finish, all_tenants=all_tenants, via=via)
    if opts.json:
        print_json(to_dict(response))
        return
    first, last = response.start_time.ToDatetime(dt.UTC), response.end_time.ToDatetime(dt.UTC)
    window = f"{first:%Y-%m-%d %H:%M} .. {last:%Y-%m-%d %H:%M} UTC"
    print_table(f"usage {window}", ["tenant", "kind", "device", "seconds"],
                [(t, k, d, f"{s:.3f}") for t, k, d, s in usage_rows(response)])
