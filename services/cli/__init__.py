"""The server's commands in the `atelier` CLI: `serve`, `worker`, `base-model create-tiny|pretrain-tiny`
and `registry gc`.

They run Atelier's own code (services/*), so they ship with the atelier-server distribution, not
with the SDK. The SDK's CLI finds them through the `atelier.server_commands` entry point
(atelier-server's pyproject.toml) and calls `register`; without the server installed it shows
the same commands as placeholders that say what to install (atelier/cli/server_commands.py).
Every command imports services/* inside its body, so `atelier --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Mapping

import typer

from services.cli import registry_gc, serve, tiny_base, worker


def register(app: typer.Typer, groups: Mapping[str, typer.Typer]) -> None:
    """Attach the server commands to the SDK's root app and its `base-model` / `registry` groups."""
    app.command("serve")(serve.serve)
    app.command("worker")(worker.worker)
    groups["base-model"].command("create-tiny")(tiny_base.create_tiny)
    groups["base-model"].command("pretrain-tiny")(tiny_base.pretrain_tiny)
    groups["registry"].command("gc")(registry_gc.gc)
