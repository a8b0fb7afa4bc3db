"""Connection options shared by every client-side command (`--target`, `--api-key`, `--json`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import typer

from atelier.client import Client

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_INFERENCE_TARGET = "127.0.0.1:50052"


@dataclass
class CliOptions:
    target: str
    inference_target: str
    api_key: str | None
    tls: bool
    json: bool
    timeout: float

    def client(self) -> Client:
        return Client(self.target, inference_target=self.inference_target, api_key=self.api_key,
                      tls=self.tls, timeout=self.timeout)


def root_callback(
    ctx: typer.Context,
    target: str = typer.Option(os.environ.get("ATELIER_TARGET", DEFAULT_TARGET), "--target",
                               help="Training/registry API address (env ATELIER_TARGET)."),
    inference_target: str = typer.Option(os.environ.get("ATELIER_INFERENCE_TARGET", DEFAULT_INFERENCE_TARGET),
                                         "--inference-target",
                                         help="Inference API address (env ATELIER_INFERENCE_TARGET)."),
    api_key: str | None = typer.Option(os.environ.get("ATELIER_API_KEY"), "--api-key",
                                       help="API key (env ATELIER_API_KEY)."),
    tls: bool = typer.Option(False, "--tls", help="Use TLS with the system roots."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON output."),
    timeout: float = typer.Option(120.0, "--timeout", help="Per-call deadline in seconds."),
) -> None:
    """Atelier: personalise diffusion models as a service."""
    ctx.obj = CliOptions(target, inference_target, api_key, tls, json_output, timeout)


def options(ctx: typer.Context) -> CliOptions:
    """The root options, whichever sub-command asks."""
    root = ctx.find_root()
    if not isinstance(root.obj, CliOptions):
        raise typer.BadParameter("internal: root options missing")
    return root.obj
