"""`atelier serve`: run Atelier's gRPC servers in this process."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

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
    exit_without_teardown()


def exit_without_teardown() -> None:
    """End the process at once after a clean stop (servers drained, workers and engines closed).

    Interpreter teardown with torch/diffusers loaded frees every module and object one by one:
    3.4 s measured on a loaded 2-core machine, on top of the drain, which breaks the promise
    that the process is gone within `shutdown_grace_seconds` of SIGTERM. Nothing is left to
    clean up at this point, so logs and stdio are flushed and the process exits 0.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
