"""Process composition for `atelier serve`: which servers a process runs and how it stops.

Roles: `all` (the embedded default: training API + registry API + one in-process worker on
`training_port`, inference on `inference_port`), `training-api` (cluster: no worker) and
`inference` (cluster: inference only). Every server shares one metrics registry, one
authenticator and one /metrics endpoint; SIGTERM drains them together.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from services.common.auth import Authenticator
from services.common.config import Settings
from services.common.process import apply_torch_threads
from services.common.server import RunningServer, serve_until_signalled, start_server
from services.common.telemetry import RpcMetrics, configure_logging, start_metrics_http
from services.common.usage import UsageLedger
from services.common.usage_service import usage_bindings
from services.registry.registry import Registry
from services.training.runtime import TrainingRuntime

if TYPE_CHECKING:
    from services.gateway.server import RunningGateway

log = logging.getLogger(__name__)

ROLES = ("all", "training-api", "inference")
STOP_RESERVE_SECONDS = 2.0


def stop_reserve(grace: float) -> float:
    """The part of the grace period kept for stopping device work and the process after the RPCs.

    `shutdown_grace_seconds` bounds signal-to-exit: in-flight RPCs drain for the grace minus
    this reserve (at most 2 s, a third of short graces), then are cancelled, which aborts
    their device work within one forward block (services/inference/abort.py).
    """
    return min(STOP_RESERVE_SECONDS, grace / 3)


@dataclass
class Runtime:
    """The servers and background parts of one process, for `serve` and for tests."""

    settings: Settings
    servers: dict[str, RunningServer] = field(default_factory=dict)
    training: TrainingRuntime | None = None
    closers: list[Callable[[], object]] = field(default_factory=list)
    gateway: RunningGateway | None = None

    async def close(self, grace: float | None = None) -> None:
        for running in self.servers.values():
            await running.stop(grace)
        await self.shutdown_parts()

    async def shutdown_parts(self) -> None:
        """Stop workers and engines after the servers have drained."""
        if self.training is not None:
            await asyncio.to_thread(self.training.stop)
        for closer in reversed(self.closers):
            result = closer()
            if asyncio.iscoroutine(result):
                await result


async def start_runtime(settings: Settings, role: str = "all",
                        metrics_registry: CollectorRegistry | None = None) -> Runtime:
    """Start the servers `role` needs on the configured ports; returns once all are SERVING."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    metrics_registry = metrics_registry or CollectorRegistry()
    rpc_metrics = RpcMetrics(metrics_registry)
    authenticator = Authenticator.from_settings(settings)
    runtime = Runtime(settings)
    usage = UsageLedger.from_settings(settings, metrics_registry)  # one per process: both servers answer
    registry = Registry.from_settings(settings)
    if role in ("all", "training-api"):
        runtime.training = TrainingRuntime(
            settings, registry=registry, metrics_registry=metrics_registry, workers=1 if role == "all" else 0,
            local_base_models=settings.local_base_models(), usage=usage,
        )
        runtime.servers["training"] = await start_server(
            settings, [*runtime.training.bindings(), *usage_bindings(usage)], settings.training_port, authenticator,
            rpc_metrics)
    if role in ("all", "inference"):
        from services.inference.engine import InferenceEngine
        from services.inference.servicer import inference_bindings

        engine = InferenceEngine(settings, registry, metrics_registry, usage=usage)
        device_timeout = stop_reserve(settings.shutdown_grace_seconds) / 2
        runtime.closers.append(lambda: engine.close(device_timeout))
        runtime.servers["inference"] = await start_server(
            settings, [*inference_bindings(engine), *usage_bindings(usage)], settings.inference_port, authenticator,
            rpc_metrics)
    if runtime.training is not None:
        runtime.training.start_workers()
    metrics_http = start_metrics_http(metrics_registry, settings.metrics_port, settings.host)
    if metrics_http is not None:
        runtime.closers.append(metrics_http.close)
    if settings.http_port:
        try:
            await _start_http_gateway(runtime)
        except BaseException:  # e.g. the port is taken: stop what started, then fail loudly
            await runtime.close(0)
            raise
    return runtime


async def _start_http_gateway(runtime: Runtime) -> None:
    """HTTP/JSON + console on `http_port`, dialling this process's own gRPC servers (first server
    wins for a service both host, e.g. UsageService: the embedded process has one ledger)."""
    from services.gateway.server import dial_host, start_gateway

    settings = runtime.settings
    targets: dict[str, str] = {}
    for running in runtime.servers.values():
        for name in running.service_names:
            targets.setdefault(name, f"{dial_host(settings)}:{running.port}")
    runtime.gateway = await start_gateway(settings, targets, settings.http_port)
    runtime.closers.append(runtime.gateway.close)  # closers run in reverse: the gateway closes first


async def serve(settings: Settings, role: str, announce: Callable[[str], None] = print) -> None:
    """Run until SIGTERM/SIGINT: drain in-flight RPCs for the grace period, then stop workers."""
    configure_logging(settings)
    logging.getLogger().setLevel(settings.log_level.upper())
    apply_torch_threads(settings)
    runtime = await start_runtime(settings, role)
    for name, running in runtime.servers.items():
        announce(f"{name} API listening on {settings.host}:{running.port} ({', '.join(running.service_names)})")
    if settings.metrics_port:
        announce(f"metrics on http://{settings.host}:{settings.metrics_port}/metrics")
    if runtime.gateway is not None:
        announce(f"HTTP/JSON API and console on http://{settings.host}:{runtime.gateway.port}/ (/openapi.json)")
    try:
        grace = settings.shutdown_grace_seconds
        await serve_until_signalled(list(runtime.servers.values()), grace - stop_reserve(grace))
    finally:
        await runtime.shutdown_parts()
