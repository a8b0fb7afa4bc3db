"""Every kustomize target renders and validates; the validators really reject bad input."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tests.deploy.manifests import Manifest, named
from tools import deploy_check, deploy_gen, deploy_schemas


@pytest.mark.parametrize("target", ["base", "dev", "production", "envoy"])
def test_target_renders_and_validates(rendered: dict[str, list[Manifest]], target: str) -> None:
    objs = rendered[target]
    assert objs, f"{target} rendered nothing"
    assert deploy_check.validate_objects(objs) == []


def test_custom_resources_use_vendored_schemas(production: list[Manifest]) -> None:
    groups = {obj["apiVersion"].rpartition("/")[0] for obj in production}
    custom_groups = {group for group in groups if "." in group and not group.endswith(".k8s.io")}
    assert custom_groups == {"keda.sh", "monitoring.coreos.com", "networking.istio.io"}
    custom = [obj for obj in production if obj["apiVersion"].rpartition("/")[0] in custom_groups]
    kinds = {obj["kind"] for obj in custom}
    assert kinds == {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule",
                     "DestinationRule"}
    for obj in custom:
        assert deploy_check.schema_path(obj).exists(), obj["kind"]


def test_builtin_validation_rejects_typos_and_wrong_types(production: list[Manifest]) -> None:
    dep = copy.deepcopy(named(production, "Deployment", "inference"))
    container = dep["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbe"]["grcp"] = container["livenessProbe"].pop("grpc")
    assert any("grcp" in error for error in deploy_check.validate_object(dep))

    dep = copy.deepcopy(named(production, "Deployment", "inference"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    assert deploy_check.validate_object(dep)


def test_scaledobject_schema_rejects_missing_triggers_and_query(production: list[Manifest]) -> None:
    scaled = named(production, "ScaledObject", "training-worker")
    broken = copy.deepcopy(scaled)
    del broken["spec"]["triggers"]
    assert any("triggers" in error for error in deploy_check.validate_object(broken))

    broken = copy.deepcopy(scaled)
    del broken["spec"]["triggers"][0]["metadata"]["query"]
    assert any("query" in error for error in deploy_check.validate_object(broken))

    broken = copy.deepcopy(scaled)
    del broken["spec"]["triggers"][1]["name"]  # the scalingModifiers formula needs names
    assert any("name" in error for error in deploy_check.validate_object(broken))


def test_other_crd_schemas_reject_broken_objects(production: list[Manifest]) -> None:
    rule = copy.deepcopy(named(production, "DestinationRule", "inference"))
    rule["spec"]["trafficPolicy"]["loadBalancer"]["consistentHash"]["useSourceIp"] = True  # two hash keys
    assert deploy_check.validate_object(rule)

    monitor = copy.deepcopy(named(production, "ServiceMonitor", "atelier"))
    del monitor["spec"]["selector"]
    assert any("selector" in error for error in deploy_check.validate_object(monitor))

    alerts = copy.deepcopy(named(production, "PrometheusRule", "atelier"))
    alerts["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    assert deploy_check.validate_object(alerts)

    auth = copy.deepcopy(named(production, "TriggerAuthentication", "atelier-postgres"))
    del auth["spec"]["secretTargetRef"][0]["key"]
    assert deploy_check.validate_object(auth)


def test_unknown_custom_kind_is_an_error() -> None:
    obj = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}}
    errors = deploy_check.validate_object(obj)
    assert errors and "no vendored schema" in errors[0]


def test_generated_files_are_current() -> None:
    assert deploy_gen.stale_files() == [], "run: .venv/bin/python tools/deploy_gen.py"
    assert deploy_schemas.stale_schemas() == [], "run: .venv/bin/python tools/deploy_schemas.py"


def test_stale_detection_notices_a_changed_query(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy_path = tmp_path / "scaledobject.yaml"
    copy_path.write_text(deploy_gen.scaledobject_yaml().replace("'QUEUED'", "'PENDING'"))
    monkeypatch.setattr(deploy_gen, "SCALEDOBJECT_PATH", copy_path)
    assert deploy_gen.stale_files() == [copy_path]


def test_hadolint_passes_on_dockerfile_and_catches_bad_one(tmp_path: Path) -> None:
    assert deploy_check.hadolint() == []
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nCMD python app.py\n")
    findings = "\n".join(deploy_check.hadolint(bad))
    assert "DL3007" in findings  # :latest tag
    assert "DL3008" in findings  # unpinned apt package
