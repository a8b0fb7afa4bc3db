"""The `atelier` command: one Typer app with a sub-command group per area.

Everything here talks to a server over gRPC through the SDK. The commands that run the server
itself come from atelier-server when it is installed (see server_commands.py).
"""

from __future__ import annotations

import typer

from atelier.cli import adapters, base_models, dataset, generate, jobs, train
from atelier.cli import usage as usage_cli
from atelier.cli.context import root_callback
from atelier.cli.server_commands import attach_server_commands

app = typer.Typer(no_args_is_help=True, help="Atelier: personalise diffusion models as a service.",
                  pretty_exceptions_enable=False)
app.callback()(root_callback)
base_model_app = typer.Typer(no_args_is_help=True, help="Base models: import and list them; create the tiny one.")
base_model_app.command("import")(base_models.import_base_model)
base_model_app.command("list")(base_models.list_base_models)
registry_app = typer.Typer(no_args_is_help=True, help="Registry maintenance on the configured store (no server).")
app.add_typer(base_model_app, name="base-model")
app.add_typer(dataset.app, name="dataset")
app.add_typer(train.app, name="train")
app.add_typer(jobs.app, name="jobs")
app.add_typer(adapters.app, name="adapters")
app.add_typer(registry_app, name="registry")
app.command("generate")(generate.generate)
app.command("usage")(usage_cli.usage)
attach_server_commands(app, {"base-model": base_model_app, "registry": registry_app})
