"""The `atelier` command: one Typer app with a sub-command group per area."""

from __future__ import annotations

import typer

from atelier.cli.base_model import app as base_model_app

app = typer.Typer(no_args_is_help=True, help="Atelier: personalise diffusion models as a service.")
app.add_typer(base_model_app, name="base-model")
