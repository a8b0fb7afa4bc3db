"""The `atelier` command: one Typer app with a sub-command group per area."""

from __future__ import annotations

import typer

from atelier.cli import adapters, base_models, dataset, generate, jobs, train
from atelier.cli import registry as registry_cli
from atelier.cli import serve as serve_cli
from atelier.cli import usage as usage_cli
from atelier.cli import worker as worker_cli
from atelier.cli.base_model import app as base_model_app
from atelier.cli.context import root_callback

app = typer.Typer(no_args_is_help=True, help="Atelier: personalise diffusion models as a service.",
                  pretty_exceptions_enable=False)
app.callback()(root_callback)
app.add_typer(base_model_app, name="base-model")
base_model_app.command("import")(base_models.import_base_model)
base_model_app.command("list")(base_models.list_base_models)
app.add_typer(dataset.app, name="dataset")
app.add_typer(train.app, name="train")
app.add_typer(jobs.app, name="jobs")
app.add_typer(adapters.app, name="adapters")
app.add_typer(registry_cli.app, name="registry")
app.command("generate")(generate.generate)
app.command("usage")(usage_cli.usage)
app.command("worker")(worker_cli.worker)
app.command("serve")(serve_cli.serve)
