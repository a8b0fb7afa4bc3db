"""The deploy files agree with the Python code: settings, SQL, routing header, image layout."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from atelier.refs import ROUTING_HEADER
from atelier_api.v1 import inference_pb2
from services.common.config import Settings
from services.training.sql import QUEUED_JOBS_COUNT_SQL
from tests.deploy.manifests import (
    PREFIX,
    SETTING_ENV_NAMES,
    Manifest,
    atelier_deployments,
    config_data,
    env_names,
    named,
    of_kind,
    workloads,
)
from tools import deploy_gen

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy/docker/Dockerfile"
INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def unknown_setting_names(names: list[str]) -> list[str]:
    """ATELIER_* names that are not Settings fields (a typo silently configures nothing)."""
    return sorted(n for n in names if n.startswith(PREFIX) and n not in SETTING_ENV_NAMES)


def dockerfile_env_names() -> list[str]:
    return re.findall(r"\b(ATELIER_[A-Z0-9_]+)=", DOCKERFILE.read_text())


def test_unknown_setting_detector_flags_typos() -> None:
    assert unknown_setting_names(["ATELIER_TRAINING_PORT", "ATELIER_TRAINNG_PORT", "HOME"]) == [
        "ATELIER_TRAINNG_PORT"]


@pytest.mark.parametrize("target", ["base", "dev", "production", "envoy"])
def test_every_atelier_env_name_is_a_setting(rendered: dict[str, list[Manifest]], target: str) -> None:
    objs = rendered[target]
    names = list(config_data(objs))
    for _, container in workloads(objs):
        names += env_names(container)
    assert unknown_setting_names(names) == []
    assert unknown_setting_names(dockerfile_env_names()) == []


@pytest.mark.parametrize("target", ["dev", "production"])
def test_config_values_parse_as_settings(rendered: dict[str, list[Manifest]], target: str) -> None:
    data = config_data(rendered[target])
    Settings(**{key[len(PREFIX):].lower(): value for key, value in data.items()})


def test_keda_query_is_the_job_store_query(production: list[Manifest]) -> None:
    scaled = named(production, "ScaledObject", "training-worker")
    triggers = {t["name"]: t for t in scaled["spec"]["triggers"]}
    assert triggers["queued"]["type"] == "postgresql"
    assert triggers["queued"]["metadata"]["query"] == QUEUED_JOBS_COUNT_SQL
    assert triggers["running"]["metadata"]["query"] == deploy_gen.running_jobs_count_sql()
    formula = scaled["spec"]["advanced"]["scalingModifiers"]["formula"]
    assert set(re.findall(r"[a-z_]+", formula)) == set(triggers)
    assert scaled["spec"]["scaleTargetRef"]["name"] in atelier_deployments(production)
    auth_names = {t["authenticationRef"]["name"] for t in triggers.values()}
    assert auth_names == {a["metadata"]["name"] for a in of_kind(production, "TriggerAuthentication")}


def test_keda_file_on_disk_carries_the_imported_query() -> None:
    on_disk = yaml.safe_load(deploy_gen.SCALEDOBJECT_PATH.read_text())
    assert on_disk["spec"]["triggers"][0]["metadata"]["query"] == QUEUED_JOBS_COUNT_SQL


def test_istio_hashes_on_the_sdk_routing_header(production: list[Manifest]) -> None:
    rule = named(production, "DestinationRule", "inference")
    assert rule["spec"]["host"] == named(production, "Service", "inference")["metadata"]["name"]
    assert rule["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]["httpHeaderName"] == ROUTING_HEADER


def test_envoy_router_hashes_on_header_and_health_checks_inference(rendered: dict[str, list[Manifest]]) -> None:
    objs = rendered["envoy"]
    config_map = next(c for c in of_kind(objs, "ConfigMap") if c["metadata"]["name"].startswith("inference-router"))
    envoy = yaml.safe_load(config_map["data"]["envoy.yaml"])
    listener = envoy["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    route = manager["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["hash_policy"] == [{"header": {"header_name": ROUTING_HEADER}}]
    cluster = envoy["static_resources"]["clusters"][0]
    assert cluster["lb_policy"] == "RING_HASH"
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == INFERENCE_SERVICE
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    headless = named(objs, "Service", address["socket_address"]["address"])
    assert headless["spec"]["clusterIP"] == "None"
    assert address["socket_address"]["port_value"] == Settings.model_fields["inference_port"].default
    assert listener["address"]["socket_address"]["port_value"] == Settings.model_fields["inference_port"].default


def test_hpa_queue_metric_is_served_by_the_adapter_rules(production: list[Manifest]) -> None:
    hpa = named(production, "HorizontalPodAutoscaler", "inference")
    metric = next(m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods")
    values = yaml.safe_load((ROOT / "deploy/k8s/components/hpa/prometheus-adapter-values.yaml").read_text())
    assert metric in [rule["name"]["as"] for rule in values["rules"]["custom"]]


def test_alerts_refer_to_scraped_jobs(production: list[Manifest]) -> None:
    monitor = named(production, "ServiceMonitor", "atelier")
    jobs = {svc["metadata"]["labels"][monitor["spec"]["jobLabel"]] for svc in of_kind(production, "Service")
            if svc["metadata"]["labels"].get("app.kubernetes.io/name") == "atelier"}
    assert jobs == {"training-api", "training-worker", "inference"}
    rules = named(production, "PrometheusRule", "atelier")["spec"]["groups"]
    exprs = " ".join(rule["expr"] for group in rules for rule in group["rules"])
    for job in re.findall(r'job=~?"([^"]+)"', exprs):
        assert set(job.split("|")) <= jobs, job
    for svc in of_kind(production, "Service"):
        if svc["metadata"]["labels"].get("app.kubernetes.io/name") == "atelier":
            assert monitor["spec"]["endpoints"][0]["port"] in [p["name"] for p in svc["spec"]["ports"]]


def test_operations_doc_settings_table_lists_every_setting() -> None:
    doc = deploy_gen.OPERATIONS_DOC.read_text()
    assert deploy_gen.operations_doc_with_table(doc) == doc, "run: .venv/bin/python tools/deploy_gen.py"
    for name in SETTING_ENV_NAMES:
        assert f"`{name}`" in doc


def _stage(name: str) -> str:
    text = DOCKERFILE.read_text()
    match = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", text, re.M | re.S)
    assert match, f"no stage {name}"
    return match.group(1)


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_dockerfile_targets_run_atelier_as_non_root(target: str) -> None:
    stage = _stage(target)
    assert re.search(r"^USER 10001:10001$", stage, re.M)
    assert re.search(r"^COPY --from=builder-" + target + r" /opt/atelier /opt/atelier$", stage, re.M)
    base = _stage("app-base")
    assert 'ENTRYPOINT ["atelier"]' in base
    for var in ("HOME", "ATELIER_DATA_DIR", "ATELIER_CACHE_DIR", "XDG_CACHE_HOME", "HF_HOME", "TORCH_HOME"):
        assert re.search(rf"\b{var}=/var/lib/atelier\b", base), var


def test_cuda_builder_installs_torch_cuda_build_and_cpu_builder_the_cpu_one() -> None:
    assert "download.pytorch.org/whl/cpu" in _stage("builder-cpu")
    assert "whl/cpu" not in _stage("builder-cuda")


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("**")] == "**"  # deny everything, then allow what the Dockerfile copies
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.M))
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for sources in copied:
        assert set(sources.split()) <= allowed, sources
        assert all((ROOT / source).exists() for source in sources.split()), sources


def test_image_installs_all_three_distributions() -> None:
    """atelier-server depends on atelier-api and atelier by name; the image installs them from source."""
    for stage in ("builder-cpu", "builder-cuda"):
        install = re.search(r"^RUN pip install --no-cache-dir (.+) && pip check$", _stage(stage), re.M)
        assert install is not None and install.group(1).split() == ["./api/python", '"./clients/python[demo]"', "."]

