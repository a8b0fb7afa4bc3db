"""One real `atelier serve` process for the whole e2e session, exactly as a user starts it.

The server runs as a subprocess on the embedded default (local registry directory, SQLite job
store, one in-process worker) in a temporary state folder, with the random tiny base model
imported as `tiny-sd` by the CLI itself. Ports are 0 and read back from the server's own
"listening on" lines, so there is no pick-then-bind race. At the end the fixture sends SIGTERM
and asserts the process drains and exits 0.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from atelier.health import wait_until_serving

BASE_MODEL = "tiny-sd"
LISTENING = re.compile(r"^(training|inference) API listening on ([\d.]+):(\d+)", re.MULTILINE)
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Services:
    """Where the e2e server listens and how to run the CLI against it."""

    training_target: str
    inference_target: str
    env: dict[str, str]
    state: Path
    log: Path

    def cli(self, *args: str, timeout: float = 300.0,
            extra_root: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        """Run `atelier --target ... --inference-target ... ARGS` and capture its output."""
        return subprocess.run(self.command(*extra_root, *args), env=self.cli_env(), capture_output=True, text=True,
                              timeout=timeout, check=False)

    def command(self, *args: str) -> list[str]:
        return [atelier_executable(), "--target", self.training_target, "--inference-target", self.inference_target,
                *args]

    def cli_env(self) -> dict[str, str]:
        return {**self.env, "COLUMNS": "240"}  # rich tables wide enough that ids are not ellipsised


def atelier_executable() -> str:
    """The `atelier` entry point installed next to the running interpreter (the venv's)."""
    candidate = Path(sys.executable).parent / "atelier"
    return str(candidate) if candidate.exists() else "atelier"


def server_env(state: Path) -> dict[str, str]:
    """Embedded-default settings confined to `state`; ports 0 so the OS picks free ones."""
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "ATELIER_DATA_DIR": str(state),
        "ATELIER_REGISTRY_URL": f"file://{state / 'registry'}",
        "ATELIER_DATABASE_URL": f"sqlite:///{state / 'atelier.db'}",
        "ATELIER_CACHE_DIR": str(state / "cache"),
        "ATELIER_HOST": "127.0.0.1",
        "ATELIER_TRAINING_PORT": "0",
        "ATELIER_INFERENCE_PORT": "0",
        "ATELIER_METRICS_PORT": "0",
        "ATELIER_AUTH_ENABLED": "false",
        "ATELIER_LOG_JSON": "false",
        "ATELIER_LOG_LEVEL": "WARNING",
        "ATELIER_WORKER_POLL_SECONDS": "0.2",
        "ATELIER_SHUTDOWN_GRACE_SECONDS": "5",
        "OMP_NUM_THREADS": "1",
    }


def read_ports(stdout: Path, process: subprocess.Popen[bytes], log: Path) -> dict[str, str]:
    """Wait for both "<role> API listening on host:port" lines; fail fast if the server dies."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        found = {m.group(1): f"{m.group(2)}:{m.group(3)}" for m in LISTENING.finditer(stdout.read_text())}
        if len(found) == 2:
            return found
        if process.poll() is not None:
            pytest.fail(f"atelier serve exited {process.returncode} before listening:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"atelier serve did not announce its ports within {START_TIMEOUT_S:.0f} s")


def wait_serving(target: str, timeout: float = 30.0) -> None:
    try:
        wait_until_serving(target, timeout)
    except TimeoutError as error:
        pytest.fail(str(error))


def stop(process: subprocess.Popen[bytes], log: Path) -> int:
    """SIGTERM, wait for the drain; kill (and fail) only if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"atelier serve ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    state = tmp_path_factory.mktemp("e2e-state")
    env = server_env(state)
    created = subprocess.run(
        [atelier_executable(), "base-model", "create-tiny", "--random", "--import", "--name", BASE_MODEL,
         "--out", str(state / "base-models" / BASE_MODEL)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    stdout, log = state / "serve.out", state / "serve.log"
    with stdout.open("wb") as out, log.open("wb") as err:
        process = subprocess.Popen([atelier_executable(), "serve"], env=env, stdout=out, stderr=err)
    try:
        ports = read_ports(stdout, process, log)
        for target in ports.values():
            wait_serving(target)
        yield Services(ports["training"], ports["inference"], env, state, log)
    finally:
        code = stop(process, log)
    assert code == 0, f"atelier serve exited {code} after SIGTERM:\n{log.read_text()[-4000:]}"
