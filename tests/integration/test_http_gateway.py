"""The HTTP/JSON gateway against a live `start_runtime("all")` with auth on (tenants acme, beta
and the admin ops): every annotated route (listed from the descriptors), the OpenAPI document,
multipart dataset upload, a real LoRA job watched over Server-Sent Events, adapters (aliases
with compare-and-swap, export bytes), Generate and GenerateStream (SSE), errors in the
google.rpc.Status shape with their HTTP statuses, tenant isolation, and the console files."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from openapi_spec_validator import validate

from services.gateway.routes import load_routes, public_files
from services.gateway.server import CONSOLE_DIR, RunningGateway, start_gateway
from services.registry.registry import Registry
from tests.fixtures.grpc_servers import loopback_settings
from tests.fixtures.s3 import free_port
from tests.integration.http_gateway_support import (
    ACME,
    BETA,
    KEYS,
    PNG_MAGIC,
    Env,
    assert_status,
    detail_types,
    in_flight,
    running,
    sse_events,
    upload_form,
    wait_in_flight,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tiny_random_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("http")
    settings = loopback_settings(
        auth_enabled=True, api_keys=KEYS, admin_tenants="ops", registry_url=f"file://{tmp / 'registry'}",
        database_url=f"sqlite:///{tmp / 'jobs.db'}", data_dir=tmp / "var", cache_dir=tmp / "cache",
        training_port=free_port(), inference_port=free_port(), http_port=free_port(), worker_poll_seconds=0.2,
        quota_generate_rps=0.01, quota_generate_burst=4)
    Registry.from_settings(settings).base_models.import_folder("tiny", tiny_random_pipeline_dir)
    with running(settings, "all") as env:
        yield env


@dataclass
class Trained:
    dataset: dict[str, Any]
    job: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]


@pytest.fixture(scope="module")
def trained(env: Env) -> Trained:
    """Upload a dataset (multipart), create a LoRA job (JSON), watch it to the end (SSE)."""
    uploaded = env.send("POST", "/v1/datasets", files=upload_form(3))
    assert uploaded.status_code == 200, uploaded.text
    dataset = uploaded.json()["dataset"]
    spec = {"method": "ADAPTER_KIND_LORA", "base_model": "tiny", "dataset_id": dataset["id"], "output_name": "toy",
            "instance_prompt": "a photo of sks toy", "lora": {"rank": 4},
            "hyperparameters": {"maxTrainSteps": 3, "resolution": 32, "seed": "0", "validation_steps": 3,
                                "validation_prompts": ["sks toy"]}}
    created = env.send("POST", "/v1/jobs", {"request_id": "http-1", "spec": spec})
    assert created.status_code == 200, created.text
    job = created.json()["job"]
    with env.get(f"/v1/jobs/{job['id']}:watch", stream=True) as watch:
        assert watch.status_code == 200 and watch.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(watch)
    return Trained(dataset, job, events)


# -- every route, from the descriptors --------------------------------------------------------
def test_every_public_rpc_is_annotated_and_in_the_openapi_document(env: Env) -> None:
    methods = {f"/{s.full_name}/{m.name}" for f in public_files() for s in f.services_by_name.values()
               for m in s.methods}
    routes = load_routes()
    assert {r.grpc_path for r in routes} == methods and len(methods) >= 25
    doc = env.get("/openapi.json", headers={}).json()
    assert doc["openapi"].startswith("3.")
    validate(doc)  # a valid OpenAPI 3 document (openapi-spec-validator)
    assert {(r.http_method.lower(), r.template) for r in routes} == {
        (verb, path) for path, ops in doc["paths"].items() for verb in ops}
    for ops in doc["paths"].values():
        for op in ops.values():
            for ref in json.dumps(op).split('"$ref": "#/components/schemas/')[1:]:
                assert ref.split('"')[0] in doc["components"]["schemas"]


def _fill(template: str) -> str:
    for variable in ("{ref.name}", "{name}", "{alias}", "{id}"):
        template = template.replace(variable, "nope")
    return template.replace("{version}", "9")


def test_every_path_in_the_openapi_document_answers_from_its_rpc(env: Env) -> None:
    """Each documented operation reaches its RPC (X-Atelier-Rpc) and answers JSON, never a 5xx."""
    doc = env.get("/openapi.json", headers={}).json()
    by_route = {(r.http_method, r.template): r.grpc_path for r in load_routes()}
    for template, ops in doc["paths"].items():
        for verb in ops:
            body = ops[verb].get("requestBody", {}).get("content", {})
            kwargs: dict[str, Any] = {"files": [("name", (None, ""))]} if "multipart/form-data" in body else {}
            if "application/json" in body:
                kwargs["json"] = {}
            response = requests.request(verb.upper(), env.url(_fill(template)), headers=ACME, timeout=60, **kwargs)
            assert response.headers.get("X-Atelier-Rpc") == by_route[(verb.upper(), template)], (verb, template)
            assert response.status_code < 500, (verb, template, response.status_code, response.text)
            if response.status_code >= 400:
                assert_status(response, response.status_code, response.json()["code"])


# -- the training flow ----------------------------------------------------------------------
def test_multipart_upload_keeps_files_and_captions(env: Env, trained: Trained) -> None:
    dataset = env.get(f"/v1/datasets/{trained.dataset['id']}").json()["dataset"]
    images = dataset["images"]
    assert [i["filename"] for i in images] == ["img0.png", "img1.png", "img2.png"]
    assert [i["caption"] for i in images] == [f"a photo of sks toy {i}" for i in range(3)]


def test_watch_streams_a_real_training_job_as_server_sent_events(trained: Trained) -> None:
    kinds = [kind for kind, _ in trained.events]
    assert kinds[-1] == "end" and set(kinds[:-1]) == {"message"}, kinds
    updates = [data for kind, data in trained.events if kind == "message"]
    steps = [u["step"] for u in updates]
    assert steps == sorted(steps) and max(steps) == 3
    assert updates[-1]["job"]["state"] == "JOB_STATE_SUCCEEDED"
    assert any(u["loss"] > 0 for u in updates)
    previews = [v for u in updates for v in u["validation_images"]]
    assert previews and base64.b64decode(previews[0]["png"]).startswith(PNG_MAGIC)


def test_job_listing_filters_by_state_and_tenants_are_isolated(env: Env, trained: Trained) -> None:
    succeeded = env.get("/v1/jobs", params={"state": "JOB_STATE_SUCCEEDED"}).json()["jobs"]
    assert trained.job["id"] in [j["id"] for j in succeeded]
    assert env.get("/v1/jobs", params={"state": "JOB_STATE_QUEUED"}).json()["jobs"] == []
    assert env.get("/v1/jobs", headers=BETA).json()["jobs"] == []
    assert_status(env.get(f"/v1/jobs/{trained.job['id']}", headers=BETA), 404, 5)
    assert env.get("/v1/adapters", headers=BETA).json()["adapters"] == []


def test_adapter_versions_aliases_with_compare_and_swap_and_export(env: Env, trained: Trained) -> None:
    versions = env.get("/v1/adapters/toy/versions").json()["versions"]
    assert [v["version"] for v in versions] == [1] and versions[0]["kind"] == "ADAPTER_KIND_LORA"
    moved = env.send("PUT", "/v1/adapters/toy/aliases/prod", {"version": 1})
    assert moved.status_code == 200 and moved.json()["version"] == 1, moved.text
    conflict = assert_status(env.send("PUT", "/v1/adapters/toy/aliases/prod", {"version": 1, "expectedVersion": 7}),
                             412, 9)
    assert "PreconditionFailure" in detail_types(conflict)
    got = env.get("/v1/adapters/toy", params={"ref.alias": "prod"}).json()
    assert got["version"]["version"] == 1 and got["adapter"]["name"] == "toy"
    for fmt in ("ADAPTER_FORMAT_DIFFUSERS", "ADAPTER_FORMAT_KOHYA"):
        exported = env.get("/v1/adapters/toy:export", params={"ref.version": "1", "format": fmt})
        assert exported.status_code == 200, exported.text
        assert exported.headers["Content-Type"] == "application/octet-stream"
        assert hashlib.sha256(exported.content).hexdigest() == exported.headers["X-Atelier-Sha256"]
        assert int(exported.headers["Content-Length"]) == len(exported.content) > 0
        assert ".safetensors" in exported.headers["Content-Disposition"]
    assert env.send("DELETE", "/v1/adapters/toy/aliases/prod").status_code == 200
    assert_status(env.get("/v1/adapters/toy", params={"ref.alias": "prod"}), 404, 5)


def test_generate_and_generate_stream_with_the_trained_adapter(env: Env, trained: Trained) -> None:
    spec = {"base_model": "tiny", "prompt": "a photo of sks toy", "adapters": [{"ref": {"name": "toy"}, "weight": 0.8}],
            "steps": 2, "width": 32, "height": 32, "seed": "1"}
    generated = env.send("POST", "/v1/generate", {"spec": spec})
    assert generated.status_code == 200, generated.text
    assert base64.b64decode(generated.json()["images"][0]["png"]).startswith(PNG_MAGIC)
    with requests.post(env.url("/v1/generate:stream"), json={"spec": spec}, headers=ACME, stream=True,
                       timeout=120) as streamed:
        assert streamed.status_code == 200 and streamed.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(streamed)
    assert events[-1][0] == "end"
    progress = [d["progress"] for k, d in events if k == "message" and "progress" in d]
    results = [d["result"] for k, d in events if k == "message" and "result" in d]
    assert progress and len(results) == 1
    assert results[0]["images"][0]["png"] == generated.json()["images"][0]["png"]  # same seed, same image


def test_adapter_import_round_trips_an_exported_file(env: Env, trained: Trained) -> None:
    exported = env.get("/v1/adapters/toy:export", params={"ref.version": "1"})
    form = [("name", (None, "toy-copy")), ("base_model", (None, "tiny")),
            ("file", (exported.headers["Content-Disposition"].split('"')[1], exported.content))]
    imported = env.send("POST", "/v1/adapters:import", files=form)
    assert imported.status_code == 200, imported.text
    version = imported.json()["version"]
    assert (version["name"], version["version"], version["kind"]) == ("toy-copy", 1, "ADAPTER_KIND_LORA")
    two_files = [*form, ("file", ("again.safetensors", exported.content))]
    assert_status(env.send("POST", "/v1/adapters:import", files=two_files), 400, 3)
    assert [v["version"] for v in env.get("/v1/adapters/toy-copy/versions").json()["versions"]] == [1]


def test_base_model_folder_import_is_multipart_with_relative_paths(env: Env, tiny_random_pipeline_dir: Path) -> None:
    form: list[tuple[str, Any]] = [("name", (None, "tiny-http")), ("description", (None, "via HTTP"))]
    form += [("file", (str(p.relative_to(tiny_random_pipeline_dir)), p.read_bytes()))
             for p in sorted(tiny_random_pipeline_dir.rglob("*")) if p.is_file()]
    assert_status(env.send("POST", "/v1/base-models", files=form), 403, 7)  # admins only
    imported = env.send("POST", "/v1/base-models", files=form, headers={"Authorization": "Bearer key-ops"})
    assert imported.status_code == 200, imported.text
    assert imported.json()["base_model"]["name"] == "tiny-http"
    names = [m["name"] for m in env.get("/v1/base-models").json()["base_models"]]
    assert {"tiny", "tiny-http"} <= set(names)
    assert env.get("/v1/base-models/tiny-http").json()["base_model"]["description"] == "via HTTP"


def test_stream_errors_keep_the_status_shape(env: Env) -> None:
    """A stream that fails after its first message ends with `event: error` carrying a Status;
    one that fails before any message is a plain HTTP error, not a 200 stream."""
    spec = {"base_model": "tiny", "prompt": "x", "adapters": [{"ref": {"name": "missing"}}], "steps": 1,
            "width": 32, "height": 32}
    with requests.post(env.url("/v1/generate:stream"), json={"spec": spec}, headers=ACME, stream=True,
                       timeout=120) as response:
        assert response.status_code == 200  # the server reports "queued" progress before resolving adapters
        events = sse_events(response)
    kind, data = events[-1]
    assert kind == "error" and data["code"] == 5 and "ResourceInfo" in detail_types(data), events
    assert {k for k, _ in events[:-1]} == {"message"}
    with env.get("/v1/jobs/nope:watch", stream=True) as watch:
        assert_status(watch, 404, 5)


def _streams_in_flight(env: Env) -> float:
    return in_flight(env, "/atelier.v1.InferenceService/GenerateStream")


def _time_stream(env: Env, spec: dict[str, Any], hang_up: bool) -> float:
    """Seconds from the first SSE event until no GenerateStream RPC is in flight."""
    ops = {"Authorization": "Bearer key-ops"}
    response = requests.post(env.url("/v1/generate:stream"), json={"spec": spec}, headers=ops, stream=True,
                             timeout=120)
    assert response.status_code == 200, response.text
    lines = response.iter_lines()
    while not next(lines):  # the first event's data line
        pass
    wait_in_flight(env, "/atelier.v1.InferenceService/GenerateStream")
    start = time.monotonic()
    if hang_up:
        response.close()
    else:
        for _ in lines:
            pass
    while _streams_in_flight(env) > 0:
        time.sleep(0.02)
    return time.monotonic() - start


def test_hanging_up_an_event_stream_cancels_its_rpc(env: Env) -> None:
    """Closing the connection ends the RPC long before the generation would have finished."""
    spec = {"base_model": "tiny", "prompt": "a cat", "steps": 80, "width": 32, "height": 32}
    full = _time_stream(env, spec, hang_up=False)
    hung_up = _time_stream(env, spec, hang_up=True)
    assert hung_up < full / 3, (hung_up, full)


# -- errors and auth ------------------------------------------------------------------------
def test_errors_are_status_json_with_the_matching_http_status(env: Env, trained: Trained) -> None:
    missing = assert_status(env.get("/v1/jobs/does-not-exist"), 404, 5)
    assert missing["message"]
    assert_status(env.get("/v1/no-such-route"), 404, 5)
    assert_status(env.send("PATCH", "/v1/jobs"), 405, 12)
    bad = assert_status(env.get("/v1/jobs", params={"page_size": "many"}), 400, 3)
    assert "BadRequest" in detail_types(bad)
    assert_status(env.get("/v1/jobs", params={"colour": "red"}), 400, 3)
    assert_status(env.send("POST", "/v1/jobs", data=b"{not json", headers={**ACME, "Content-Type": "application/json"}),
                  400, 3)
    assert_status(env.send("POST", "/v1/generate", {"spec": {"base_model": "tiny"}}), 400, 3)  # no prompt
    reused = env.send("POST", "/v1/jobs", {"request_id": "http-1", "spec": {**trained.job["spec"], "output_name": "x"}})
    assert "ResourceInfo" in detail_types(assert_status(reused, 409, 6))
    assert_status(env.send("DELETE", "/v1/base-models/tiny"), 403, 7)  # acme is not an admin
    slow = {"spec": {"base_model": "tiny", "prompt": "a cat", "steps": 150, "width": 32, "height": 32}}
    ops_soon = {"Authorization": "Bearer key-ops", "grpc-timeout": "100m"}  # ops: the quota test spends beta's
    assert_status(env.send("POST", "/v1/generate", slow, headers=ops_soon), 504, 4)
    assert_status(env.get("/v1/jobs", headers={**ACME, "grpc-timeout": "soon"}), 400, 3)
    assert env.get("/v1/jobs", headers={**ACME, "grpc-timeout": "30S"}).status_code == 200


def test_uploads_must_be_well_formed_multipart(env: Env) -> None:
    assert_status(env.send("POST", "/v1/datasets", {"name": "x"}), 400, 3)
    late_header = [("image", ("a.png", b"x")), ("name", (None, "late"))]
    assert_status(env.send("POST", "/v1/datasets", files=late_header), 400, 3)
    assert_status(env.send("POST", "/v1/datasets", files=[("name", (None, "empty"))]), 400, 3)


def test_quota_exhaustion_is_429_with_retry_after(env: Env) -> None:
    spec = {"base_model": "tiny", "prompt": "a cat", "steps": 1, "width": 32, "height": 32}
    answers = [env.send("POST", "/v1/generate", {"spec": spec}, headers=BETA) for _ in range(5)]
    assert [a.status_code for a in answers[:4]] == [200] * 4, [a.text for a in answers]
    limited = assert_status(answers[4], 429, 8)
    assert "RetryInfo" in detail_types(limited) and int(answers[4].headers["Retry-After"]) >= 1


def test_auth_is_required_and_the_key_is_checked(env: Env) -> None:
    assert_status(env.get("/v1/jobs", headers={}), 401, 16)
    assert_status(env.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}), 401, 16)
    with env.get("/v1/jobs/x:watch", headers={}, stream=True) as watch:
        assert_status(watch, 401, 16)
    assert env.get("/openapi.json", headers={}).status_code == 200  # the document is public


def test_an_unreachable_backend_is_503(env: Env) -> None:
    """A gateway whose gRPC target is down answers 503 UNAVAILABLE in the Status shape."""
    dead = f"127.0.0.1:{free_port()}"
    settings = env.settings.model_copy(update={"host": "127.0.0.1"})
    gateway: RunningGateway = asyncio.run_coroutine_threadsafe(
        start_gateway(settings, {"atelier.v1.TrainingService": dead}, 0, None), env.loop).result(30)
    try:
        response = requests.get(f"http://127.0.0.1:{gateway.port}/v1/jobs", headers=ACME, timeout=60)
        assert_status(response, 503, 14)
        other = requests.get(f"http://127.0.0.1:{gateway.port}/v1/adapters", headers=ACME, timeout=60)
        assert_status(other, 501, 12)  # RegistryService is not routed by this gateway
        assert_status(requests.get(f"http://127.0.0.1:{gateway.port}/", timeout=60), 404, 5)  # no console
    finally:
        asyncio.run_coroutine_threadsafe(gateway.close(), env.loop).result(30)


def test_console_files_are_served_at_the_root(env: Env) -> None:
    index = env.get("/", headers={})
    assert index.status_code == 200 and index.headers["Content-Type"].startswith("text/html")
    assert index.content == (CONSOLE_DIR / "index.html").read_bytes()
    assert_status(env.get("/%2e%2e/%2e%2e/pyproject.toml", headers={}), 404, 5)
    assert_status(env.get("/no-such-file.js", headers={}), 404, 5)
