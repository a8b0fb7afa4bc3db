"""`atelier adapters list|get|versions|alias|delete`."""

from __future__ import annotations

import typer

from atelier.cli.adapters_io import register as register_import_export
from atelier.cli.context import options
from atelier.cli.jobs import method_name
from atelier.cli.output import console, emit, handle_errors, print_json, to_dict
from atelier_api.v1 import common_pb2

app = typer.Typer(no_args_is_help=True, help="Adapters in the registry: versions, aliases, import and export.")
register_import_export(app)


def adapter_row(adapter: common_pb2.Adapter) -> list[object]:
    aliases = ", ".join(f"{k}->{v}" for k, v in sorted(adapter.aliases.items()))
    return [adapter.name, method_name(adapter.kind), adapter.base_model, adapter.latest_version, aliases]


def version_row(version: common_pb2.AdapterVersion) -> list[object]:
    created = version.created_at.ToDatetime().isoformat(timespec="seconds") if version.HasField("created_at") else ""
    base = f"{version.base_model} ({version.base_family})" if version.base_family else version.base_model
    return [f"{version.name}@{version.version}", method_name(version.kind), base,
            ", ".join(version.trigger_tokens), version.size_bytes, version.source_format, created]


VERSION_COLUMNS = ["adapter", "kind", "base", "tokens", "bytes", "format", "created"]


@app.command("list")
@handle_errors
def list_adapters(ctx: typer.Context, base: str = typer.Option("", "--base", help="Only this base model.")) -> None:
    """Adapters of your tenant."""
    opts = options(ctx)
    with opts.client() as client:
        adapters = list(client.adapters.list(base_model=base))
    emit(opts.json, adapters, "adapters", ["name", "kind", "base", "latest", "aliases"], adapter_row)


@app.command("get")
@handle_errors
def get_adapter(ctx: typer.Context, ref: str = typer.Argument(..., help="name, name@version or name:alias")) -> None:
    """One adapter version's manifest."""
    opts = options(ctx)
    with opts.client() as client:
        response = client.adapters.get(ref)
    emit(opts.json, [response.version], "adapter version", VERSION_COLUMNS, version_row)


@app.command("versions")
@handle_errors
def versions(ctx: typer.Context, name: str) -> None:
    """Every version of an adapter."""
    opts = options(ctx)
    with opts.client() as client:
        emit(opts.json, list(client.adapters.versions(name)), f"{name} versions", VERSION_COLUMNS, version_row)


@app.command("alias")
@handle_errors
def set_alias(ctx: typer.Context, name: str, alias: str, version: int,
              expect: int | None = typer.Option(None, "--expect", help="Only if the alias now points here (0 = new).")
              ) -> None:
    """Point ALIAS of NAME at VERSION (compare-and-swap with --expect)."""
    opts = options(ctx)
    with opts.client() as client:
        response = client.adapters.set_alias(name, alias, version, expected_version=expect)
    if opts.json:
        print_json(to_dict(response))
    else:
        console.print(f"{name}:{alias} -> {response.version}")


@app.command("delete")
@handle_errors
def delete(ctx: typer.Context, name: str, version: int) -> None:
    """Delete one version (its blobs stay until garbage collection)."""
    opts = options(ctx)
    with opts.client() as client:
        client.adapters.delete(name, version)
    if opts.json:
        print_json({"name": name, "version": version, "deleted": True})
    else:
        console.print(f"deleted {name}@{version}")


@app.command("unalias")
@handle_errors
def delete_alias(ctx: typer.Context, name: str, alias: str) -> None:
    """Remove an alias; the version it pointed at stays."""
    opts = options(ctx)
    with opts.client() as client:
        client.adapters.delete_alias(name, alias)
    if opts.json:
        print_json({"name": name, "alias": alias, "deleted": True})
    else:
        console.print(f"removed {name}:{alias}")
