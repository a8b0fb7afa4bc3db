"""`atelier registry gc`: maintenance that runs directly on the registry named by ATELIER_* settings.

Like `serve` and `base-model create-tiny`, these commands talk to the object store itself
(ATELIER_REGISTRY_URL, S3 settings), not to a server over gRPC: garbage collection is an
operator's job, not a tenant's.
"""

from __future__ import annotations

import typer


def gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="Report what would be deleted; delete nothing."),
    grace_seconds: float = typer.Option(
        None, "--grace-seconds", min=0,
        help="Keep unreferenced blobs younger than this [default: ATELIER_GC_GRACE_SECONDS]."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="List every blob deleted (or that would be)."),
) -> None:
    """Delete blobs no manifest references and older than the grace period (mark and sweep)."""
    from services.common.config import Settings
    from services.common.errors import AtelierError
    from services.registry.gc import collect_garbage
    from services.registry.registry import Registry

    settings = Settings.model_validate({})
    grace = settings.gc_grace_seconds if grace_seconds is None else grace_seconds
    try:
        report = collect_garbage(Registry.from_settings(settings), grace_seconds=grace, dry_run=dry_run)
    except AtelierError as error:
        typer.echo(f"error: {error.message}", err=True)
        raise typer.Exit(1) from None
    if verbose:
        for info in report.deleted:
            typer.echo(f"{'would delete' if dry_run else 'deleted'} {info.key} ({info.size} bytes)")
    typer.echo(f"{settings.registry_url}: {report.summary()}")
