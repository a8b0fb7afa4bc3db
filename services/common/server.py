"""The one gRPC server bootstrap every Atelier service uses.

`start_server` builds a grpc.aio server with the same plumbing everywhere, so a servicer only
brings its `ServiceBinding`:

* grpc.health.v1: overall ("") and one entry per binding, SERVING once started and
  NOT_SERVING from the moment shutdown begins (so Kubernetes stops routing first); a binding's
  `on_start` gets the RunningServer and may report its own health later (the inference
  service goes NOT_SERVING while its device is stuck on abandoned work);
* a binding's `warmup` is awaited once the port is bound, with health NOT_SERVING meanwhile (the
  inference server attaches its pinned and preloaded adapters); if it fails the server stops
  and the error propagates, so a process that cannot warm up never reports SERVING;
* server reflection listing the bindings, health and reflection (grpcurl, debugging);
* interceptors, outermost first: request id + access log, metrics, error mapping, auth.
  Error mapping sits outside auth so a rejected key is reported, counted and logged like
  any other error, and inside metrics so the metrics see the final status code;
* max message sizes both ways, optional TLS, SO_REUSEPORT off (a second process on the same
  port fails loudly instead of silently sharing it).

`install_signal_handlers` gives SIGTERM/SIGINT a graceful stop: health goes NOT_SERVING, the
servers stop accepting new RPCs, in-flight RPCs get up to the grace period; a second signal
stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from services.common.auth import Authenticator, AuthInterceptor
from services.common.config import Settings
from services.common.deadlines import DeadlineInterceptor
from services.common.error_mapping import ErrorMappingInterceptor
from services.common.errors import InvalidInput
from services.common.telemetry import MetricsInterceptor, RequestIdInterceptor, RpcMetrics

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@dataclass
class ServiceBinding:
    """A service to host: its full proto name and how to add its servicer to a server.

    Example: ServiceBinding("atelier.v1.RegistryService",
                            lambda s: registry_pb2_grpc.add_RegistryServiceServicer_to_server(svc, s))
    """

    name: str
    register: Callable[[aio.Server], None]
    on_start: Callable[[RunningServer], None] | None = None  # called once the server is SERVING
    warmup: Callable[[], Awaitable[None]] | None = None  # awaited before SERVING (warm start)


@dataclass
class RunningServer:
    """A started server. `health` is the aio HealthServicer (`await health.set(name, status)`)."""

    server: aio.Server
    port: int
    health: HealthServicer
    metrics: RpcMetrics
    service_names: list[str] = field(default_factory=list)
    tls: bool = False

    async def set_serving(self, name: str, serving: bool) -> None:
        """Report one service (or "" for the whole server) as (not) serving."""
        await self.health.set(name, SERVING if serving else NOT_SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Go NOT_SERVING, refuse new RPCs, give in-flight ones `grace` seconds (None: none)."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (True) or `timeout` passed (False)."""
        return await self.server.wait_for_termination(timeout)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    size = settings.grpc_max_message_bytes
    return [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        ("grpc.so_reuseport", 0),
    ]


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials when a cert and key are configured; both or neither must be set."""
    cert, key = settings.tls_cert_file, settings.tls_key_file
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        missing = "tls_cert_file" if cert is None else "tls_key_file"
        raise InvalidInput(missing, "TLS needs both tls_cert_file and tls_key_file")
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])


def _bind(server: aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError as exc:
        raise OSError(f"cannot bind gRPC server to {address}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    return bound


async def _warm_up(server: aio.Server, health: HealthServicer, bindings: Sequence[ServiceBinding],
                   names: Sequence[str]) -> None:
    warmups = [b.warmup for b in bindings if b.warmup is not None]
    if not warmups:
        return
    for name in ["", *names]:
        await health.set(name, NOT_SERVING)
    try:
        for warmup in warmups:
            await warmup()
    except BaseException:
        await server.stop(None)
        raise


async def start_server(settings: Settings, bindings: list[ServiceBinding], port: int,
                       authenticator: Authenticator | None = None,
                       metrics: RpcMetrics | None = None) -> RunningServer:
    """Build, bind and start a server on settings.host:port (0 picks a free port).

    `authenticator` defaults to one built from settings; `metrics` defaults to a private
    registry (pass a shared RpcMetrics to export it via `start_metrics_http`). Must be
    awaited on the event loop that will serve the RPCs.
    """
    auth = authenticator or Authenticator.from_settings(settings)
    rpc_metrics = metrics or RpcMetrics(CollectorRegistry())
    credentials = _server_credentials(settings)
    interceptors = [RequestIdInterceptor(), MetricsInterceptor(rpc_metrics),
                    ErrorMappingInterceptor(), AuthInterceptor(auth), DeadlineInterceptor()]
    server = aio.server(interceptors=interceptors, options=server_options(settings))

    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [b.name for b in bindings]
    for binding in bindings:
        binding.register(server)
    reflection.enable_server_reflection([*names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server)

    bound = _bind(server, f"{settings.host}:{port}", credentials)
    await server.start()
    await _warm_up(server, health, bindings, names)
    for name in ["", *names]:
        await health.set(name, SERVING)
    log.info("grpc server started", extra={"grpc_port": bound, "services": ",".join(names),
                                           "tls": credentials is not None, "auth": auth.enabled})
    running = RunningServer(server, bound, health, rpc_metrics, names, credentials is not None)
    for binding in bindings:
        if binding.on_start is not None:
            binding.on_start(running)
    return running


async def shutdown_servers(servers: Sequence[RunningServer], grace: float | None) -> None:
    """Stop several servers together: all go NOT_SERVING first, then all drain in parallel."""
    for running in servers:
        await running.health.enter_graceful_shutdown()
    await asyncio.gather(*(running.server.stop(grace) for running in servers))


def install_signal_handlers(servers: Sequence[RunningServer], grace: float,
                            signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
                            ) -> asyncio.Event:
    """On the first signal drain gracefully for `grace` seconds; on a second, stop now.

    Returns an event set once every server has stopped. Must run on the servers' loop.
    """
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    state = {"signals": 0}
    tasks: set[asyncio.Task[None]] = set()

    async def _stop(grace_now: float) -> None:
        await shutdown_servers(servers, grace_now)
        stopped.set()

    def _on_signal(signum: signal.Signals) -> None:
        state["signals"] += 1
        grace_now = grace if state["signals"] == 1 else 0.0
        log.warning("shutdown signal received", extra={"signal": signum.name, "grace_seconds": grace_now})
        task = loop.create_task(_stop(grace_now))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    for signum in signals:
        loop.add_signal_handler(signum, _on_signal, signum)
    return stopped


async def serve_until_signalled(servers: Sequence[RunningServer], grace: float) -> None:
    """Entry-point helper: install the signal handlers, then wait until every server stopped."""
    install_signal_handlers(servers, grace)
    await asyncio.gather(*(running.wait_for_termination() for running in servers))
