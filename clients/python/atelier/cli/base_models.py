"""`atelier base-model import DIR --name N` and `atelier base-model list`, over gRPC.

Unlike `create-tiny` (which writes local folders and the locally configured registry), these
talk to a running server through the SDK, so they work against a remote cluster too.
"""

from __future__ import annotations

from pathlib import Path

import typer

from atelier.cli.context import options
from atelier.cli.output import console, emit, handle_errors, print_json, to_dict
from atelier_api.v1 import common_pb2

BASE_MODEL_COLUMNS = ["name", "version", "family", "architecture", "size", "files", "digest", "created"]


def base_model_row(model: common_pb2.BaseModel) -> list[object]:
    created = model.created_at.ToDatetime().isoformat(timespec="seconds") if model.HasField("created_at") else ""
    size = f"{model.size_bytes / 1024 / 1024:.1f} MiB"
    return [model.name, model.version, model.family or "-", model.architecture, size, len(model.files),
            model.digest[:12], created]


@handle_errors
def import_base_model(
    ctx: typer.Context,
    directory: Path = typer.Argument(..., exists=True, file_okay=False, help="A diffusers pipeline folder."),
    name: str = typer.Option(..., "--name", help="Registry name, e.g. sd15."),
    description: str = typer.Option("", "--description", help="Free text shown by `list`."),
) -> None:
    """Upload a local diffusers folder as base model NAME (admin key; new bytes: the next version)."""
    opts = options(ctx)
    if not (directory / "model_index.json").is_file():
        raise ValueError(f"{directory} is not a diffusers pipeline folder (no model_index.json)")
    with opts.client() as client:
        model = client.base_models.import_(name, str(directory), description, timeout=max(opts.timeout, 600.0))
    if opts.json:
        print_json(to_dict(model))
    else:
        console.print(f"base model [bold]{model.name}@{model.version}[/bold] ({model.architecture}, "
                      f"{len(model.files)} files, digest {model.digest[:12]})")


@handle_errors
def list_base_models(ctx: typer.Context) -> None:
    """Base models in the server's registry."""
    opts = options(ctx)
    with opts.client() as client:
        models = list(client.base_models.list())
    emit(opts.json, models, "base models", BASE_MODEL_COLUMNS, base_model_row)
