"""Helpers for reading rendered Kubernetes manifests in tests/deploy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from services.common.config import Settings

Manifest = dict[str, Any]

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")
# The three Atelier processes and the API port setting each one serves on (None: no API; the
# worker serves only grpc.health.v1 on worker_health_port, see test_deploy_manifests.py).
ATELIER_COMPONENTS = {"training-api": "training_port", "inference": "inference_port", "training-worker": None}
PREFIX = str(Settings.model_config.get("env_prefix", "ATELIER_")).upper()
SETTING_ENV_NAMES = {PREFIX + name.upper() for name in Settings.model_fields}


def of_kind(objs: list[Manifest], kind: str) -> list[Manifest]:
    return [obj for obj in objs if obj["kind"] == kind]


def named(objs: list[Manifest], kind: str, name: str) -> Manifest:
    matches = [obj for obj in of_kind(objs, kind) if obj["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_spec(workload: Manifest) -> Manifest:
    spec: Manifest = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Manifest) -> list[Manifest]:
    spec = pod_spec(workload)
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def workloads(objs: list[Manifest]) -> Iterator[tuple[Manifest, Manifest]]:
    """(workload, container) for every container of every Deployment/StatefulSet/Job."""
    for obj in objs:
        if obj["kind"] in WORKLOAD_KINDS:
            for container in containers(obj):
                yield obj, container


def atelier_deployments(objs: list[Manifest]) -> dict[str, Manifest]:
    """The Atelier Deployments, keyed by app.kubernetes.io/component."""
    result = {}
    for dep in of_kind(objs, "Deployment"):
        labels = dep["metadata"].get("labels", {})
        if labels.get("app.kubernetes.io/name") == "atelier":
            result[labels["app.kubernetes.io/component"]] = dep
    return result


def config_data(objs: list[Manifest]) -> dict[str, str]:
    """The data of the (hash-suffixed) atelier-config ConfigMap."""
    maps = [cm for cm in of_kind(objs, "ConfigMap") if cm["metadata"]["name"].startswith("atelier-config")]
    assert len(maps) == 1, [cm["metadata"]["name"] for cm in maps]
    data: dict[str, str] = maps[0]["data"]
    return data


def env_names(container: Manifest) -> list[str]:
    return [item["name"] for item in container.get("env", [])]


def effective_settings(objs: list[Manifest], container: Manifest) -> Settings:
    """The Settings a container would see: Settings defaults < ConfigMap < literal env values.

    Values from Secrets are unknown at render time and keep their defaults here.
    """
    values: dict[str, str] = dict(config_data(objs))
    values.update({item["name"]: item["value"] for item in container.get("env", []) if "value" in item})
    fields = {key[len(PREFIX):].lower(): value for key, value in values.items() if key.startswith(PREFIX)}
    return Settings(**fields)


def container_port(container: Manifest, name: str) -> int:
    ports = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
    assert name in ports, f"container {container['name']} has no port named {name!r}: {ports}"
    return ports[name]


QUANTITY_SUFFIXES = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "k": 1000, "M": 1000**2,
                     "G": 1000**3, "T": 1000**4}


def quantity_bytes(text: str | int) -> int:
    """Kubernetes memory/storage quantity ("40Gi", "512Mi", "1000") in bytes."""
    text = str(text)
    for suffix, factor in QUANTITY_SUFFIXES.items():
        if text.endswith(suffix) and text[: -len(suffix)].isdigit():
            return int(text[: -len(suffix)]) * factor
    return int(text)
