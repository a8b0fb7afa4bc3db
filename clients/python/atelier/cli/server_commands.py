"""The server's commands (`serve`, `worker`, `base-model create-tiny`, ...) as the SDK's CLI sees them.

They run Atelier's server code, which ships in the atelier-server distribution (services/cli),
so the SDK never imports it: atelier-server announces a `register` function under the entry
point group below. When no distribution provides it (`pip install atelier` alone, the usual
case for a backend team that only calls the API), the same command names exist as
placeholders that say what to install, instead of an unhelpful "No such command".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib.metadata import entry_points

import typer

ENTRY_POINT_GROUP = "atelier.server_commands"
SERVER_PACKAGE = "atelier-server"

# (group or "" for the root, command, what it does): the commands atelier-server registers.
SERVER_COMMANDS = (
    ("", "serve", "Run Atelier's gRPC servers in this process."),
    ("", "worker", "Run a training worker against the configured job store."),
    ("base-model", "create-tiny", "Write the tiny SD pipeline to a folder (and the registry)."),
    ("base-model", "pretrain-tiny", "Train the tiny pipeline from scratch."),
    ("registry", "gc", "Delete blobs no manifest references (runs on the store itself)."),
)


def attach_server_commands(app: typer.Typer, groups: Mapping[str, typer.Typer]) -> None:
    """Let every installed server distribution register its commands; placeholders if there is none."""
    registered = False
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()(app, groups)
        registered = True
    if not registered:
        for group, name, summary in SERVER_COMMANDS:
            target = groups[group] if group else app
            target.command(name, help=f"{summary} [needs {SERVER_PACKAGE}]",
                           context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                           add_help_option=False)(_needs_server(f"{group} {name}".strip()))


def _needs_server(command: str) -> Callable[[], None]:
    def placeholder() -> None:
        typer.echo(f"error: `atelier {command}` runs Atelier's server code, which is not installed here.\n"
                   f"Install it with: pip install {SERVER_PACKAGE}", err=True)
        raise typer.Exit(3)

    return placeholder
