"""Wait for an Atelier server to report SERVING on grpc.health.v1 (scripts, demos, tests)."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def wait_until_serving(target: str, timeout: float = 120.0, service: str = "", poll: float = 0.2) -> None:
    """Poll the health service until `service` ("" = the whole server) is SERVING.

    Raises TimeoutError naming the target when it is not SERVING within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(poll)
    raise TimeoutError(f"{target} did not become SERVING within {timeout:.0f} s")
