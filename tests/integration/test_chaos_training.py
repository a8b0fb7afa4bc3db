"""Chaos rows R1 and R4 on the training side, scaled down (bench/chaos.py runs the full size).

R1: a worker SIGKILLed mid-job, round after round: every job finishes, resumed from a
checkpoint by another worker, with exactly one registry version. R4: the workers' and the
API's PostgreSQL connections go through a loopback fault proxy that "restarts" the database
(drops every connection, refuses new ones) mid-run: no job is lost and none runs twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.config import Settings
from tests.fixtures.chaos_training import db_restart_run, sigkill_rounds
from tests.fixtures.fault_proxy import FaultProxy, via
from tests.integration.test_training_support import TrainingStack, concept_images, stack_settings

pytestmark = pytest.mark.slow


def _stack(tmp_path: Path, s3_settings: Settings, database_url: str, pipeline: Path) -> TrainingStack:
    settings = stack_settings(tmp_path, s3_settings, database_url, lease_seconds=3.0, heartbeat_seconds=0.5,
                              worker_poll_seconds=0.2, shutdown_grace_seconds=20.0)
    return TrainingStack(settings, workers=0)


@pytest.fixture
def db_proxy(postgres_url: str) -> Iterator[FaultProxy]:
    from urllib.parse import urlsplit

    with FaultProxy(urlsplit(postgres_url).port or 5432) as proxy:
        yield proxy


def test_r1_sigkilled_workers_every_job_resumes_and_publishes_once(
        tmp_path: Path, s3_settings: Settings, postgres_url: str, tiny_random_pipeline_dir: Path) -> None:
    with _stack(tmp_path, s3_settings, postgres_url, tiny_random_pipeline_dir) as stack:
        stack.registry.base_models.import_folder("tiny", tiny_random_pipeline_dir)
        ds = stack.upload(concept_images()).dataset.id
        report = sigkill_rounds(stack, ds, kills=2, steps=8, log_dir=tmp_path)
    assert report.kills == 2
    assert [j.state for j in report.jobs] == ["JOB_STATE_SUCCEEDED"] * 2, report
    assert all(j.attempts == 2 and j.claims == 2 for j in report.jobs), report  # killed once, taken over once
    assert all(j.resumed_from_step >= 2 for j in report.jobs), report  # from a checkpoint, not from zero
    assert all(j.versions == 1 for j in report.jobs), report


def test_r4_database_restart_mid_run_loses_no_job_and_runs_none_twice(
        tmp_path: Path, s3_settings: Settings, postgres_url: str, db_proxy: FaultProxy,
        tiny_random_pipeline_dir: Path) -> None:
    with _stack(tmp_path, s3_settings, via(postgres_url, db_proxy), tiny_random_pipeline_dir) as stack:
        stack.registry.base_models.import_folder("tiny", tiny_random_pipeline_dir)
        ds = stack.upload(concept_images()).dataset.id
        report = db_restart_run(stack, db_proxy, ds, jobs=2, steps=8, restarts=2, outage_s=1.5, log_dir=tmp_path)
    assert report.outages == 2
    assert [j.state for j in report.jobs] == ["JOB_STATE_SUCCEEDED"] * 2, report
    assert all(j.claims == 1 and j.attempts == 1 for j in report.jobs), report
    assert all(j.versions == 1 for j in report.jobs), report
