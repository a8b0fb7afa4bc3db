"""Start and stop the HTTP gateway next to the gRPC servers of one process.

The gateway dials the process's own gRPC ports over loopback (TLS when the servers use it,
trusting the configured certificate), so every HTTP call goes through the same interceptor
chain as a gRPC call. `targets` maps a proto service name to the `host:port` serving it;
a route whose service is absent (an `inference`-role process has no TrainingService)
answers 501.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import grpc
from aiohttp import web
from grpc import aio

from services.common.config import Settings
from services.gateway.app import Gateway
from services.gateway.openapi import build_openapi
from services.gateway.routes import load_routes

CONSOLE_DIR = Path(__file__).resolve().parent / "console"
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


@dataclass
class RunningGateway:
    """A started gateway: its bound port and what to close."""

    runner: web.AppRunner
    port: int
    channels: list[aio.Channel] = field(default_factory=list)
    upload_channels: list[grpc.Channel] = field(default_factory=list)

    async def close(self) -> None:
        await self.runner.cleanup()
        for channel in self.channels:
            await channel.close(None)
        for sync_channel in self.upload_channels:
            sync_channel.close()


def dial_host(settings: Settings) -> str:
    """Where the loopback channel dials: the bind address, or 127.0.0.1 for a wildcard bind."""
    return "127.0.0.1" if settings.host in WILDCARD_HOSTS else settings.host


def _options(settings: Settings) -> list[tuple[str, int]]:
    size = settings.grpc_max_message_bytes
    return [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)]


def _credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    if settings.tls_cert_file is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=Path(settings.tls_cert_file).read_bytes())


def _channel(settings: Settings, target: str) -> aio.Channel:
    creds = _credentials(settings)
    if creds is not None:
        return aio.secure_channel(target, creds, options=_options(settings))
    return aio.insecure_channel(target, options=_options(settings))


def _upload_channel(settings: Settings, target: str) -> grpc.Channel:
    """Sync channel for the client-streaming uploads (services/gateway/upload_call.py says why)."""
    creds = _credentials(settings)
    if creds is not None:
        return grpc.secure_channel(target, creds, options=_options(settings))
    return grpc.insecure_channel(target, options=_options(settings))


def build_app(settings: Settings, channels: Mapping[str, aio.Channel], upload_channels: Mapping[str, grpc.Channel],
              console_dir: Path | None) -> web.Application:
    """The aiohttp application: /openapi.json, /v1/... (annotated RPCs), the console at /."""
    routes = load_routes()
    gateway = Gateway(routes, channels, upload_channels, build_openapi(routes), console_dir,
                      settings.http_sse_keepalive_seconds)
    app = web.Application(client_max_size=settings.grpc_max_message_bytes)
    app.router.add_get("/openapi.json", gateway.openapi)
    app.router.add_route("*", "/v1/{tail:.*}", gateway.api)
    app.router.add_get("/{path:.*}", gateway.console)
    return app


async def start_gateway(settings: Settings, targets: Mapping[str, str], port: int,
                        console_dir: Path | None = CONSOLE_DIR) -> RunningGateway:
    """Bind the gateway on `settings.host:port` (0: an ephemeral port) and return it running."""
    by_target = {target: _channel(settings, target) for target in set(targets.values())}
    sync_by_target = {target: _upload_channel(settings, target) for target in set(targets.values())}
    channels = {service: by_target[target] for service, target in targets.items()}
    upload_channels = {service: sync_by_target[target] for service, target in targets.items()}
    # The gRPC servers have drained by the time the gateway closes, so its handlers end at once.
    # handler_cancellation: a client that hangs up cancels its handler, and so its RPC (a watch
    # or a generation stream stops at once, not at its next message).
    runner = web.AppRunner(build_app(settings, channels, upload_channels, console_dir), access_log=None,
                           shutdown_timeout=2.0,
                           handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, port, reuse_port=False)
    await site.start()
    server = cast(asyncio.Server | None, site._server)  # aiohttp exposes the bound sockets only here
    bound = server.sockets[0].getsockname()[1] if server is not None and server.sockets else port
    return RunningGateway(runner, bound, list(by_target.values()), list(sync_by_target.values()))
