"""The whole loop through the `atelier` CLI as subprocesses against a real `atelier serve`.

dataset upload -> train lora (watched to SUCCEEDED) -> jobs / adapters commands -> generate
with the adapter; every command's `--json` output parses, and bad input maps to exit 2 with
the status code and field on stderr, a server that is not there to exit 1.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from atelier.demo_images import concept_images, save_all
from tests.e2e.conftest import BASE_MODEL, Services

pytestmark = pytest.mark.slow

ADAPTER = "cli-lora"
JOB_LINE = re.compile(r"job (\S+) lora -> " + ADAPTER)


def ok(result: Any) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return str(result.stdout)


def json_of(services: Services, *args: str) -> Any:
    return json.loads(ok(services.cli("--json", *args)))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cli-concept")
    save_all(concept_images(4, seed=3, pattern="checker"), directory, "disc")
    return directory


@pytest.fixture(scope="module")
def dataset_id(services: Services, image_dir: Path) -> str:
    dataset = json_of(services, "dataset", "upload", str(image_dir), "--name", "cli-disc")
    assert len(dataset["images"]) == 4
    return str(dataset["id"])


@pytest.fixture(scope="module")
def trained(services: Services, dataset_id: str) -> dict[str, str]:
    """`atelier train lora` in its human form: it follows the job to the end and exits 0."""
    result = services.cli("train", "lora", "--base", BASE_MODEL, "--dataset", dataset_id, "--name", ADAPTER,
                          "--prompt", "a photo of sks circle", "--steps", "10", "--resolution", "32", "--seed", "0",
                          "--rank", "4")
    stdout = ok(result)
    match = JOB_LINE.search(stdout)
    assert match, stdout
    assert f"published {ADAPTER}@1" in stdout, stdout
    return {"job_id": match.group(1), "stdout": stdout}


def test_base_model_list_shows_tiny_sd(services: Services) -> None:
    assert BASE_MODEL in ok(services.cli("base-model", "list"))
    models = {m["name"]: m for m in json_of(services, "base-model", "list")}
    assert models[BASE_MODEL]["architecture"] == "stable-diffusion" and len(models[BASE_MODEL]["digest"]) == 64
    assert models[BASE_MODEL]["family"] == "sd1"


def test_base_model_import_over_grpc(services: Services, tmp_path: Path) -> None:
    folder = services.state / "base-models" / BASE_MODEL  # the folder `create-tiny --out` wrote
    imported = json_of(services, "base-model", "import", str(folder), "--name", "tiny-copy", "--description", "copy")
    original = {m["name"]: m for m in json_of(services, "base-model", "list")}[BASE_MODEL]
    assert imported["name"] == "tiny-copy" and imported["digest"] == original["digest"]  # content addressed
    assert "tiny-copy" in ok(services.cli("base-model", "list"))
    again = json_of(services, "base-model", "import", str(folder), "--name", "tiny-copy")
    assert (again["version"], again["digest"]) == (imported["version"], imported["digest"])  # idempotent
    not_a_pipeline = services.cli("base-model", "import", str(tmp_path), "--name", "empty")
    assert not_a_pipeline.returncode == 2 and "model_index.json" in not_a_pipeline.stderr


def test_dataset_upload_prints_an_id(services: Services, image_dir: Path, dataset_id: str) -> None:
    stdout = ok(services.cli("dataset", "upload", str(image_dir)))
    assert re.search(r"dataset \S+: 4 images", stdout), stdout
    assert dataset_id


def test_train_lora_follows_progress_to_succeeded(services: Services, trained: dict[str, str]) -> None:
    assert "step" in trained["stdout"] and "SUCCEEDED" in trained["stdout"]
    job = json_of(services, "jobs", "get", trained["job_id"])[0]
    assert job["state"] == "JOB_STATE_SUCCEEDED"
    assert job["step"] == 10 and job["output"]["name"] == ADAPTER and job["output"]["version"] == 1


def test_train_json_streams_one_event_per_line(services: Services, dataset_id: str) -> None:
    stdout = ok(services.cli("--json", "train", "textual-inversion", "--base", BASE_MODEL, "--dataset", dataset_id,
                             "--name", "cli-ti", "--token", "<cli-disc>", "--init", "circle", "--steps", "4",
                             "--resolution", "32", "--seed", "0"))
    events = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert events and events[-1]["job"]["state"] == "JOB_STATE_SUCCEEDED"
    steps = [e["job"].get("step", 0) for e in events]
    assert steps == sorted(steps) and steps[-1] == 4


def test_jobs_list_and_get(services: Services, trained: dict[str, str]) -> None:
    jobs = json_of(services, "jobs", "list")
    assert trained["job_id"] in {j["id"] for j in jobs}
    succeeded = json_of(services, "jobs", "list", "--state", "succeeded")
    assert all(j["state"] == "JOB_STATE_SUCCEEDED" for j in succeeded) and succeeded
    assert trained["job_id"] in ok(services.cli("jobs", "list"))
    assert "SUCCEEDED" in ok(services.cli("jobs", "get", trained["job_id"]))


def test_adapters_list_get_versions_alias_unalias(services: Services, trained: dict[str, str]) -> None:
    adapters = {a["name"]: a for a in json_of(services, "adapters", "list")}
    assert adapters[ADAPTER]["kind"] == "ADAPTER_KIND_LORA" and adapters[ADAPTER]["latest_version"] == 1
    assert ADAPTER in ok(services.cli("adapters", "list"))
    version = json_of(services, "adapters", "get", f"{ADAPTER}@1")[0]
    assert version["base_model"] == BASE_MODEL and int(version["size_bytes"]) > 0
    assert [v["version"] for v in json_of(services, "adapters", "versions", ADAPTER)] == [1]

    assert json_of(services, "adapters", "alias", ADAPTER, "prod", "1")["version"] == 1
    assert json_of(services, "adapters", "get", f"{ADAPTER}:prod")[0]["version"] == 1
    assert "prod" in ok(services.cli("adapters", "list"))
    assert json_of(services, "adapters", "unalias", ADAPTER, "prod")["deleted"] is True
    gone = services.cli("adapters", "get", f"{ADAPTER}:prod")
    assert gone.returncode == 2 and "NOT_FOUND" in gone.stderr


def test_generate_with_adapter_writes_png(services: Services, trained: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    stdout = ok(services.cli("generate", "a photo of sks circle", "--base", BASE_MODEL, "--adapter", f"{ADAPTER}=0.8",
                             "--seed", "11", "--steps", "4", "--size", "32", "-o", str(out)))
    assert f"{ADAPTER}@1=0.8" in stdout
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (32, 32)

    json_out = tmp_path / "json.png"
    response = json_of(services, "generate", "a photo of sks circle", "--adapter", f"{ADAPTER}@1=0.8", "--seed", "11",
                       "--steps", "4", "--size", "32", "-o", str(json_out))
    assert response["files"] == [str(json_out)]
    assert response["response"]["images"] == [{"seed": 11, "safety_flagged": False}]
    [resolved] = response["response"]["adapters"]
    assert resolved["name"] == ADAPTER and resolved["version"] == 1
    assert json_out.read_bytes() == out.read_bytes()  # same seed, same adapter: same pixels


def test_unknown_adapter_exits_2_naming_the_code(services: Services, tmp_path: Path) -> None:
    result = services.cli("generate", "a photo", "--adapter", "no-such-adapter=0.5", "--steps", "2", "--size", "32",
                          "-o", str(tmp_path / "x.png"))
    assert result.returncode == 2, result.stderr
    assert "NOT_FOUND" in result.stderr and "no-such-adapter" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_bad_weight_exits_2_naming_the_field(services: Services, trained: dict[str, str], tmp_path: Path) -> None:
    result = services.cli("generate", "a photo", "--adapter", f"{ADAPTER}=5", "--steps", "2", "--size", "32",
                          "-o", str(tmp_path / "x.png"))
    assert result.returncode == 2, result.stderr
    assert "INVALID_ARGUMENT" in result.stderr and "spec.adapters[0].weight" in result.stderr


def test_malformed_ref_and_bad_size_exit_2(services: Services, tmp_path: Path) -> None:
    bad_ref = services.cli("generate", "a photo", "--adapter", "x@latest", "-o", str(tmp_path / "x.png"))
    assert bad_ref.returncode == 2 and "version must be a number" in bad_ref.stderr
    bad_size = services.cli("generate", "a photo", "--size", "33", "--steps", "2", "-o", str(tmp_path / "x.png"))
    assert bad_size.returncode == 2 and "spec.width" in bad_size.stderr


def test_missing_dataset_exits_2(services: Services) -> None:
    result = services.cli("train", "lora", "--base", BASE_MODEL, "--dataset", "no-such-dataset", "--name", "x",
                          "--prompt", "a photo of sks circle", "--steps", "2")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "NOT_FOUND" in result.stderr and "no-such-dataset" in result.stderr


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_server_down_exits_1(services: Services) -> None:
    port = closed_port()
    result = services.cli("adapters", "list", extra_root=("--target", f"127.0.0.1:{port}", "--timeout", "2"),
                          timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "UNAVAILABLE" in result.stderr or "DEADLINE_EXCEEDED" in result.stderr
