"""grpc.health.v1 for the training worker process (`atelier worker`).

The worker serves no API, but Kubernetes should still know whether it can do its job. A
small synchronous gRPC server on `worker_health_port` answers:

* `""` (overall, for the startup and liveness probes): SERVING while the process runs,
  NOT_SERVING once shutdown begins. It does not follow the dependencies: restarting a
  worker does not bring a database back, and a liveness failure would kill a job that is
  still training (and checkpointing) through a short outage;
* `atelier.v1.TrainingWorker` (for the readiness probe): SERVING only while the job store
  answers `SELECT 1` and the registry answers a HEAD, both re-checked every
  `worker_health_check_seconds`; a check that hangs past that period counts as a failure.

Plaintext or TLS like every other Atelier server (`services.common.server` options and
credentials), health and reflection only.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import grpc
import sqlalchemy as sa
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.config import Settings
from services.common.server import HEALTH_SERVICE_NAME, server_options
from services.common.server import _server_credentials as server_credentials
from services.registry.registry import Registry
from services.training.jobstore import JobStore

log = logging.getLogger(__name__)

WORKER_SERVICE = "atelier.v1.TrainingWorker"
_PROBE_BASE_MODEL = "health-probe"  # a HEAD of its (absent) manifest: cheap, needs no data


class WorkerHealth:
    """The worker's health server and the thread that keeps its readiness current."""

    def __init__(self, settings: Settings, store: JobStore, registry: Registry) -> None:
        self._settings = settings
        self._store = store
        self._registry = registry
        self._period = settings.worker_health_check_seconds
        self._servicer = health.HealthServicer()
        self._server: grpc.Server | None = None
        self._checks = ThreadPoolExecutor(2, thread_name_prefix="worker-health-check")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-health", daemon=True)
        self.port = 0
        self.ready = False

    def start(self) -> WorkerHealth:
        """Bind and serve (OSError when the port is taken); readiness starts NOT_SERVING."""
        server = grpc.server(ThreadPoolExecutor(4, thread_name_prefix="worker-health-rpc"),
                             options=server_options(self._settings))
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)
        reflection.enable_server_reflection([WORKER_SERVICE, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME],
                                            server)
        address = f"{self._settings.host}:{self._settings.worker_health_port}"
        credentials = server_credentials(self._settings)
        try:
            bound = (server.add_secure_port(address, credentials) if credentials is not None
                     else server.add_insecure_port(address))
        except RuntimeError as exc:
            raise OSError(f"cannot bind the worker health server to {address}: {exc}") from exc
        server.start()
        self._server, self.port = server, bound
        self._set("", True)
        self.check_once()
        self._thread.start()
        log.info("worker health serving", extra={"port": bound})
        return self

    def check_once(self) -> bool:
        """Run both dependency checks (bounded by the check period) and publish the result."""
        future = self._checks.submit(self._problems)
        try:
            problems = future.result(timeout=self._period)
        except FutureTimeout:
            problems = [f"dependency check did not answer within {self._period:g} s"]
        ready = not problems
        if ready != self.ready:
            log.warning("worker readiness: %s", "ready" if ready else "; ".join(problems))
        self.ready = ready
        self._set(WORKER_SERVICE, ready)
        return ready

    def stop(self) -> None:
        """NOT_SERVING everywhere, then close the server."""
        self._stop.set()
        self._servicer.enter_graceful_shutdown()
        if self._server is not None:
            self._server.stop(grace=1.0)
        self._checks.shutdown(wait=False, cancel_futures=True)

    # --- internals ------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self.check_once()

    def _problems(self) -> list[str]:
        problems = []
        try:
            with self._store.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except Exception as exc:  # any failure means "cannot claim or fence jobs now"
            problems.append(f"job store unreachable: {type(exc).__name__}")
        try:
            self._registry.store.exists(self._registry.keys.base_model(_PROBE_BASE_MODEL))
        except Exception as exc:
            problems.append(f"registry unreachable: {type(exc).__name__}")
        return problems

    def _set(self, name: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self._servicer.set(name, status)
