"""`atelier adapters import FILE ...` and `atelier adapters export REF ... -o FILE`.

Import streams a local adapter file (diffusers/PEFT or kohya LoRA, diffusers or A1111/SDXL
embedding) to RegistryService.ImportAdapter; the server detects the format, checks it
against the base model and stores it. Export streams a version back in the format another
tool reads (kohya for A1111/ComfyUI LoRAs, A1111 embeddings, DreamBooth as a zipped diffusers
folder or a single-file checkpoint), verifying size and sha256 before the file appears.

`register(app)` adds both commands to an existing Typer group (the `adapters` group).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import grpc
import typer

from atelier.cli.context import options
from atelier.cli.output import console, handle_errors, print_json, to_dict
from atelier.errors import from_grpc_error
from atelier.refs import parse_ref
from atelier.transport import call_metadata, file_chunks
from atelier_api.v1 import common_pb2, registry_pb2

T = TypeVar("T")

KINDS = {
    "": common_pb2.ADAPTER_KIND_UNSPECIFIED,
    "lora": common_pb2.ADAPTER_KIND_LORA,
    "ti": common_pb2.ADAPTER_KIND_TEXTUAL_INVERSION,
    "textual-inversion": common_pb2.ADAPTER_KIND_TEXTUAL_INVERSION,
}
FORMATS = {
    "": registry_pb2.ADAPTER_FORMAT_UNSPECIFIED,
    "diffusers": registry_pb2.ADAPTER_FORMAT_DIFFUSERS,
    "kohya": registry_pb2.ADAPTER_FORMAT_KOHYA,
    "a1111": registry_pb2.ADAPTER_FORMAT_A1111,
    "checkpoint": registry_pb2.ADAPTER_FORMAT_CHECKPOINT,
}


def _choice(table: Mapping[str, T], value: str, what: str) -> T:
    key = value.strip().lower()
    if key not in table:
        raise ValueError(f"{what} must be one of {', '.join(k for k in table if k)}; got {value!r}")
    return table[key]


def import_messages(path: Path, header: registry_pb2.ImportAdapterHeader
                    ) -> Iterator[registry_pb2.ImportAdapterRequest]:
    """One header, then the file in chunks (never the whole file in memory)."""
    yield registry_pb2.ImportAdapterRequest(header=header)
    for chunk in file_chunks(path):
        yield registry_pb2.ImportAdapterRequest(chunk=chunk)


def receive_export(responses: Iterable[registry_pb2.ExportAdapterResponse], out: Path
                   ) -> tuple[registry_pb2.ExportAdapterHeader, Path]:
    """Write the streamed file next to its destination, verify it, then move it in place.

    `out` may be a directory: the server's file name is used inside it.
    """
    stream = iter(responses)
    first = next(stream, None)
    if first is None or first.WhichOneof("payload") != "header":
        raise ValueError("the server's export stream did not start with a header")
    header = first.header
    dest = out / Path(header.filename).name if out.is_dir() else out
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            for message in stream:
                digest.update(message.chunk)
                size += len(message.chunk)
                handle.write(message.chunk)
        if size != header.size or digest.hexdigest() != header.sha256:
            raise ValueError(f"export of {header.filename} arrived damaged ({size} of {header.size} bytes)")
        os.replace(tmp_name, dest)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return header, dest


@handle_errors
def import_adapter(
    ctx: typer.Context,
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="The .safetensors file to import."),
    name: str = typer.Option(..., "--name", help="Adapter name in your tenant."),
    base: str = typer.Option(..., "--base", help="Base model the adapter was trained for."),
    kind: str = typer.Option("", "--kind", help="lora or ti (default: detected from the file)."),
    fmt: str = typer.Option("", "--format", help="diffusers, kohya or a1111 (default: detected)."),
    token: str = typer.Option("", "--token", help="Textual inversion: the word to use in prompts."),
    description: str = typer.Option("", "--description", help="Free text stored with the version."),
) -> None:
    """Import a LoRA or embedding made with diffusers, kohya, A1111 or ComfyUI."""
    opts = options(ctx)
    header = registry_pb2.ImportAdapterHeader(
        name=name, base_model=base, kind=_choice(KINDS, kind, "--kind"),
        format=_choice(FORMATS, fmt, "--format"), filename=file.name,
        description=description, trigger_token=token, size=file.stat().st_size,
    )
    with opts.client() as client:
        try:
            response = client.registry.ImportAdapter(import_messages(file, header), timeout=opts.timeout,
                                                     metadata=call_metadata(opts.api_key, ()))
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None
    version = response.version
    if opts.json:
        print_json(to_dict(version))
        return
    tokens = f" token {', '.join(version.trigger_tokens)}" if version.trigger_tokens else ""
    console.print(f"imported {version.name}@{version.version} from {version.source_format}{tokens}")


@handle_errors
def export_adapter(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="name, name@version or name:alias"),
    fmt: str = typer.Option("diffusers", "--format", help="diffusers, kohya, a1111 or checkpoint."),
    output: Path = typer.Option(..., "-o", "--output", help="Destination file (or directory)."),
) -> None:
    """Export a version for another tool: kohya LoRA, A1111 embedding, DreamBooth checkpoint."""
    opts = options(ctx)
    request = registry_pb2.ExportAdapterRequest(ref=parse_ref(ref), format=_choice(FORMATS, fmt, "--format"))
    with opts.client() as client:
        try:
            stream = client.registry.ExportAdapter(request, timeout=opts.timeout,
                                                   metadata=call_metadata(opts.api_key, ()))
            header, dest = receive_export(stream, output)
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None
    if opts.json:
        print_json({"path": str(dest), **to_dict(header)})
        return
    console.print(f"wrote {dest} ({header.size} bytes, {header.version.name}@{header.version.version})")


def register(group: typer.Typer) -> None:
    """Add `import` and `export` to a Typer group (the clients' `atelier adapters`)."""
    group.command("import")(import_adapter)
    group.command("export")(export_adapter)


app = typer.Typer(no_args_is_help=True, help="Import and export adapters in other tools' formats.")
register(app)
