"""Ctrl-C during `atelier train`: the CLI asks whether to cancel the job or only detach.

A real SIGINT goes to the CLI subprocess while it follows a long job; the answer arrives on
its stdin. "y" cancels the job on the server; "n" leaves it running (then `atelier jobs
cancel` stops it). Either way the CLI exits 130, the shell convention for an interrupt.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from atelier import Client
from atelier.demo_images import concept_images, save_all
from atelier_api.v1 import training_pb2
from tests.e2e.conftest import BASE_MODEL, Services

pytestmark = pytest.mark.slow

JOB_LINE = re.compile(r"job (\S+) lora -> ")


@pytest.fixture(scope="module")
def client(services: Services) -> Iterator[Client]:
    with Client(services.training_target, inference_target=services.inference_target, timeout=60) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def dataset_id(services: Services, tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("interrupt-concept")
    save_all(concept_images(3, seed=4), directory, "disc")
    result = services.cli("--json", "dataset", "upload", str(directory))
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout)["id"])


def wait_running(client: Client, job_id: str, timeout: float = 120.0) -> None:
    """Until the worker has trained at least one step, so Ctrl-C lands mid-training."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.jobs.get(job_id).job
        if job.state == training_pb2.JOB_STATE_RUNNING and job.step >= 1:
            return
        assert job.state in (training_pb2.JOB_STATE_QUEUED, training_pb2.JOB_STATE_RUNNING), job
        time.sleep(0.2)
    pytest.fail(f"job {job_id} never started running")


def interrupt_training(services: Services, client: Client, dataset_id: str, name: str,
                       answer: str) -> tuple[str, subprocess.CompletedProcess[str]]:
    """Start a long `train lora`, SIGINT it once it trains, answer the prompt; returns (job id, result)."""
    command = services.command("train", "lora", "--base", BASE_MODEL, "--dataset", dataset_id, "--name", name,
                               "--prompt", "a photo of sks circle", "--steps", "5000", "--resolution", "32")
    process = subprocess.Popen(command, env=services.cli_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        match = JOB_LINE.search(first)
        assert match, first
        job_id = match.group(1)
        wait_running(client, job_id)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(answer + "\n", timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return job_id, subprocess.CompletedProcess(command, process.returncode, first + stdout, stderr)


def test_ctrl_c_then_yes_cancels_the_job(services: Services, client: Client, dataset_id: str) -> None:
    job_id, result = interrupt_training(services, client, dataset_id, "interrupted-cancel", "y")
    assert result.returncode == 130, result.stdout + result.stderr
    assert f"job {job_id} cancelled" in result.stdout
    assert client.jobs.get(job_id).wait(timeout=120).state == training_pb2.JOB_STATE_CANCELLED


def test_ctrl_c_then_no_detaches_and_jobs_cancel_stops_it(services: Services, client: Client,
                                                          dataset_id: str) -> None:
    job_id, result = interrupt_training(services, client, dataset_id, "interrupted-detach", "n")
    assert result.returncode == 130, result.stdout + result.stderr
    assert f"atelier jobs watch {job_id}" in result.stdout
    time.sleep(0.5)
    assert client.jobs.get(job_id).job.state == training_pb2.JOB_STATE_RUNNING  # detaching left it alone

    cancelled = services.cli("--json", "jobs", "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)[0]["id"] == job_id
    assert client.jobs.get(job_id).wait(timeout=120).state == training_pb2.JOB_STATE_CANCELLED
