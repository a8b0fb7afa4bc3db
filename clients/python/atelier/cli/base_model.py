"""`atelier base-model ...`: build, pretrain and install the tiny Stable Diffusion base model."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="Base models: create the tiny SD pipeline, pretrain it.")
