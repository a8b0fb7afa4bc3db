"""Chaos bench: real servers on loopback, faults injected between them and S3 / PostgreSQL by a
loopback fault proxy (tests/fixtures/fault_proxy.py); prints one table of figures + PASS/FAIL.

  R1  SIGKILL a worker mid-job N times: N/N jobs finish, from a checkpoint, one version each.
  R2  4x overload of Generate: process up, excess RESOURCE_EXHAUSTED (+RetryInfo) in < 50 ms,
      RSS bounded (before/after).
  R3  S3 outage: cached adapters keep serving, others UNAVAILABLE with RetryInfo, recovery
      without restart.
  R4  PostgreSQL restart mid-run (through the proxy): no job lost, none run twice.
  R5+ rows of bench/chaos_inputs.py (another module), when it is present.

Everything is bounded: counts are fixed, every wait has a timeout, the proxies bind loopback
only. Needs moto_server (started here) and PostgreSQL at 127.0.0.1:5432 (ATELIER_TEST_POSTGRES_URL).

    .venv/bin/python bench/chaos.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
for entry in (ROOT, ROOT / "bench"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import grpc  # noqa: E402
import psycopg  # noqa: E402
from _chaos_ctx import row  # noqa: E402

from atelier_api.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402
from services.common.config import Settings  # noqa: E402
from services.registry.manifests import LORA_WEIGHTS_FILE  # noqa: E402
from tests.fixtures.chaos import overload, retry_after, rss_bytes, sustained_overload  # noqa: E402
from tests.fixtures.chaos_training import ChaosReport, db_restart_run, sigkill_rounds  # noqa: E402
from tests.fixtures.fault_proxy import FaultProxy, via  # noqa: E402
from tests.fixtures.postgres import ADMIN_URL, _server_url  # noqa: E402
from tests.fixtures.s3 import MotoServer, free_port, make_s3_settings  # noqa: E402
from tests.fixtures.synthetic import LoraFactory  # noqa: E402
from tests.integration.test_inference_support import InferenceEnv, engine_settings, spec, start_env  # noqa: E402
from tests.integration.test_training_support import TrainingStack, concept_images, stack_settings  # noqa: E402

Row = dict[str, str]


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new PostgreSQL database (SQLAlchemy URL), dropped afterwards."""
    name = f"atelier_chaos_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _server_url(name)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def training_stack(tmp: Path, registry: Settings, database_url: str, pipeline: Path) -> Iterator[TrainingStack]:
    settings = stack_settings(tmp, registry, database_url, lease_seconds=3.0, heartbeat_seconds=0.5,
                              worker_poll_seconds=0.2, shutdown_grace_seconds=20.0)
    with TrainingStack(settings, workers=0) as stack:
        stack.registry.base_models.import_folder("tiny", pipeline)
        yield stack


def _jobs_figures(report: ChaosReport) -> str:
    n = len(report.jobs)
    claims = sorted({j.claims for j in report.jobs})
    return (f"{report.finished}/{n} finished, {report.resumed}/{n} resumed from a checkpoint, "
            f"{report.exactly_one_version}/{n} exactly one version, claims per job {claims}, "
            f"{report.seconds:.0f} s")


def r1(tmp: Path, moto: MotoServer, pipeline: Path, kills: int) -> Row:
    (tmp / "r1").mkdir(parents=True, exist_ok=True)
    with fresh_database() as db, training_stack(tmp / "r1", make_s3_settings(moto.endpoint, moto.create_bucket()),
                                                db, pipeline) as stack:
        report = sigkill_rounds(stack, stack.upload(concept_images()).dataset.id, kills=kills, steps=12,
                                log_dir=tmp / "r1")
    n = len(report.jobs)
    ok = (report.kills == kills and report.finished == n and report.resumed == n and report.exactly_one_version == n
          and all(j.claims == 2 for j in report.jobs))  # killed once, taken over once, never a third run
    return row("R1", f"SIGKILL a worker mid-job x{kills}", f"{report.kills} kills; " + _jobs_figures(report), ok)


def r4(tmp: Path, moto: MotoServer, pipeline: Path, jobs: int, restarts: int, outage_s: float) -> Row:
    (tmp / "r4").mkdir(parents=True, exist_ok=True)
    with fresh_database() as db, FaultProxy(urlsplit(db).port or 5432) as proxy, \
            training_stack(tmp / "r4", make_s3_settings(moto.endpoint, moto.create_bucket()), via(db, proxy),
                           pipeline) as stack:
        report = db_restart_run(stack, proxy, stack.upload(concept_images()).dataset.id, jobs=jobs, steps=12,
                                restarts=restarts, outage_s=outage_s, log_dir=tmp / "r4")
    n = len(report.jobs)
    ok = report.finished == n and report.run_once == n and report.exactly_one_version == n
    return row("R4", f"PostgreSQL restart ({outage_s:g} s) x{restarts} mid-run",
               f"{report.outages} restarts; " + _jobs_figures(report), ok)


def _pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


@contextmanager
def inference_process(settings: Settings, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`atelier serve --role inference` as its own process (configured by ATELIER_* only), so
    its refusal latency and RSS are its own, not shared with this driver's client threads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")}
    env.update({f"ATELIER_{k.upper()}": str(v) for k, v in settings.model_dump().items() if v is not None})
    env.update({"ATELIER_LOG_JSON": "false", "OMP_NUM_THREADS": "1", "ATELIER_TORCH_THREADS": "1",
                "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'clients' / 'python'}"})
    exe = Path(sys.executable).with_name("atelier")
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(exe), "serve", "--role", "inference"], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def r2(tmp: Path, moto: MotoServer, pipeline: Path, seconds: float, queue: int = 8) -> Row:
    (tmp / "r2").mkdir(parents=True, exist_ok=True)
    port = free_port()
    settings = engine_settings(moto.endpoint, moto.create_bucket(), tmp / "r2", pipeline, queue_size=queue,
                               max_batch_size=1, batch_wait_ms=0.0, inference_port=port, metrics_port=0)
    with inference_process(settings, tmp / "r2" / "inference.log") as proc, \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=120)
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        stub.Generate(inference_pb2.GenerateRequest(spec=spec(steps=2)), timeout=120)
        burst = overload(stub, 4 * queue, steps=8)  # also warms: first-overload allocations are not growth
        before = rss_bytes(proc.pid)
        result = sustained_overload(stub, 4 * queue, seconds, steps=8)
        after = rss_bytes(proc.pid)
        alive = proc.poll() is None and len(stub.Generate(inference_pb2.GenerateRequest(spec=spec(steps=2)),
                                                          timeout=60).images) == 1
    rejected = result.rejected_ms
    growth = (after - before) / 2**20
    ok = (alive and not result.other and not result.missing_retry_info and not burst.other and rejected != []
          and _pct(rejected, 0.99) < 50 and growth < 150)
    figures = (f"{4 * queue} callers for {seconds:g} s on queue {queue}: {result.ok} served, {len(rejected)} "
               f"RESOURCE_EXHAUSTED (p50 {_pct(rejected, 0.5):.1f} ms, p99 {_pct(rejected, 0.99):.1f} ms, "
               f"{result.missing_retry_info} without RetryInfo), {len(result.other)} other; first burst of "
               f"{4 * queue} at once: refusals p50 {_pct(burst.rejected_ms, 0.5):.0f} ms; server RSS "
               f"{before / 2**20:.0f} -> {after / 2**20:.0f} MiB; process up and serving after: {alive}")
    return row("R2", "4x overload of Generate", figures, ok)


def _probe(env: InferenceEnv, adapter: str, timeout: float = 30) -> tuple[str, float, float | None]:
    started = time.monotonic()
    try:
        env.stub.Generate(_request(adapter), timeout=timeout)
        return "OK", (time.monotonic() - started) * 1000, None
    except grpc.RpcError as err:
        return err.code().name, (time.monotonic() - started) * 1000, retry_after(err)


def _request(adapter: str) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(spec=spec(adapters=[(adapter, 1.0)], steps=2))


def r3(tmp: Path, moto: MotoServer, pipeline: Path, outage_s: float) -> Row:
    with FaultProxy(moto.port) as proxy:
        settings = engine_settings(proxy.url, moto.create_bucket(), tmp / "r3", pipeline, s3_read_timeout_seconds=2.0)
        env = start_env(settings, pipeline, ref_ttl_seconds=0.0)
        try:
            factory = LoraFactory(pipeline)
            for i, name in enumerate(("cached", "cold")):
                env.publish(name, "LORA", {LORA_WEIGHTS_FILE: factory.write(tmp / "r3" / name, seed=i)})
            warm = _probe(env, "cached")[0] == "OK"
            proxy.outage()
            cached, cold = [], []
            ends = time.monotonic() + outage_s
            while time.monotonic() < ends:
                cached.append(_probe(env, "cached"))
                cold.append(_probe(env, "cold"))
            proxy.heal()
            healed = _probe(env, "cold")
        finally:
            proxy.heal()
            env.close()
    cached_ok = sum(c[0] == "OK" for c in cached)
    cold_unavailable = sum(c[0] == "UNAVAILABLE" and bool(c[2]) for c in cold)
    ok = warm and cached_ok == len(cached) and cold_unavailable == len(cold) and healed[0] == "OK"
    figures = (f"{outage_s:g} s outage: cached {cached_ok}/{len(cached)} served (p50 "
               f"{_pct([c[1] for c in cached], 0.5):.0f} ms); uncached {cold_unavailable}/{len(cold)} UNAVAILABLE "
               f"+RetryInfo (p50 {_pct([c[1] for c in cold], 0.5):.0f} ms); after heal, uncached: {healed[0]} "
               f"in {healed[1]:.0f} ms, no restart")
    return row("R3", "S3 outage", figures, ok)


def input_rows(tmp: Path, pipeline: Path, quick: bool) -> list[Row]:
    """Rows of bench/chaos_inputs.py over a runtime its support module starts; none if absent."""
    try:
        from chaos_inputs import input_rows as rows_of

        from tests.integration.chaos_inputs_support import chaos_context
        from tests.integration.chaos_inputs_support import stack_settings as inputs_settings
    except ImportError as exc:
        print(f"(input rows skipped: {exc})", file=sys.stderr)
        return []
    settings = inputs_settings(tmp / "inputs", f"file://{tmp / 'inputs' / 'registry'}")
    with chaos_context(settings, pipeline, tmp / "inputs") as ctx:
        ctx.quick = quick
        return list(rows_of(ctx))


def guarded(name: str, what: str, fn: Callable[[], list[Row] | Row]) -> list[Row]:
    """Run one row; an exception is a FAIL row with its message, never the end of the bench."""
    started = time.monotonic()
    try:
        out = fn()
    except Exception as exc:
        traceback.print_exc()
        return [row(name, what, f"error after {time.monotonic() - started:.0f} s: {type(exc).__name__}: "
                                f"{str(exc)[:160]}", False)]
    return out if isinstance(out, list) else [out]


def print_table(rows: list[Row]) -> None:
    print("| row | fault | figures | verdict |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['what']} | {r['figures']} | {r['verdict']} |")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smoke sizes (2 kills, 3 s outages)")
    parser.add_argument("--only", default="", help="comma-separated rows to run, e.g. R2,R3 (default: all)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from services.tinymodel.pipeline import build_random_pipeline

    kills, outage, restarts, jobs, seconds = (2, 3.0, 1, 2, 4.0) if args.quick else (10, 30.0, 3, 4, 20.0)
    moto = MotoServer()
    moto.start()
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as tmpdir:
            tmp = Path(tmpdir)
            pipeline = build_random_pipeline(tmp / "tiny-sd-random", seed=0)
            plan: list[tuple[str, str, Callable[[], list[Row] | Row]]] = [
                ("R1", "SIGKILL a worker mid-job", lambda: r1(tmp, moto, pipeline, kills)),
                ("R2", "4x overload of Generate", lambda: r2(tmp, moto, pipeline, seconds)),
                ("R3", "S3 outage", lambda: r3(tmp, moto, pipeline, outage)),
                ("R4", "PostgreSQL restart", lambda: r4(tmp, moto, pipeline, jobs, restarts,
                                                        3.0 if args.quick else 5.0)),
                ("R5+", "input rows", lambda: input_rows(tmp, pipeline, args.quick)),
            ]
            only = {name.strip() for name in args.only.split(",") if name.strip()}
            rows = [r for name, what, fn in plan if not only or name in only for r in guarded(name, what, fn)]
    finally:
        moto.stop()
    print(f"\nchaos bench ({'quick' if args.quick else 'full'}), {time.monotonic() - started:.0f} s\n")
    print_table(rows)
    return 0 if all(r["verdict"] == "PASS" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
