"""`atelier serve`: run Atelier's gRPC servers in this process."""

from __future__ import annotations

import asyncio

import typer


def serve(
    role: str = typer.Option("all", "--role", help="all (embedded default), training-api or inference."),
) -> None:
    """Serve the APIs configured by ATELIER_* settings until SIGTERM/SIGINT.

    `all` runs the training + registry API, one in-process training worker and the inference
    API, with the registry on a local directory and jobs in SQLite unless configured otherwise.
    """
    from services.common.config import Settings
    from services.runtime import ROLES
    from services.runtime import serve as run

    if role not in ROLES:
        raise typer.BadParameter(f"must be one of {', '.join(ROLES)}", param_hint="--role")
    asyncio.run(run(Settings.model_validate({}), role, announce=lambda line: typer.echo(line)))
