"""Tables for people, JSON for scripts, and one place that turns errors into exit codes."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from atelier.errors import AtelierRpcError

P = ParamSpec("P")
R = TypeVar("R")

# Errors the caller can fix by changing the request exit 2; everything else exits 1.
BAD_INPUT_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.OUT_OF_RANGE,
})

console = Console()
err_console = Console(stderr=True)


def to_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def print_json_line(value: Any) -> None:
    """One compact JSON document per line (JSON Lines), for streams of events."""
    sys.stdout.write(json.dumps(value, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)


def emit(json_mode: bool, messages: Sequence[Message], title: str, columns: Sequence[str],
         row: Callable[[Any], Sequence[Any]]) -> None:
    """Print messages as a JSON list or as a table built by `row`."""
    if json_mode:
        print_json([to_dict(m) for m in messages])
    else:
        print_table(title, columns, [row(m) for m in messages])


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Print status code, message and offending field; exit 2 for bad input, 1 otherwise."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except AtelierRpcError as error:
            err_console.print(f"[red]error[/red] {error.code.name}: {error.message}")
            for violation in error.field_violations:
                err_console.print(f"  field {violation.field}: {violation.description}")
            if error.resource_name:
                err_console.print(f"  {error.resource_type}: {error.resource_name}")
            raise typer.Exit(2 if error.code in BAD_INPUT_CODES else 1) from None
        except (ValueError, FileNotFoundError) as error:
            err_console.print(f"[red]error[/red] INVALID_ARGUMENT: {error}")
            raise typer.Exit(2) from None

    return wrapper
