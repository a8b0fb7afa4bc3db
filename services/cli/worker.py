"""`atelier worker`: run a training worker process against the configured job store and registry."""

from __future__ import annotations

import typer


def worker(
    worker_id: str = typer.Option("", "--id", help="Worker identity (default: hostname-pid-random)."),
) -> None:
    """Claim training jobs from ATELIER_DATABASE_URL and train them until SIGTERM."""
    from services.common.config import Settings
    from services.training.worker_main import run_worker

    raise typer.Exit(run_worker(Settings.model_validate({}), worker_id=worker_id))
