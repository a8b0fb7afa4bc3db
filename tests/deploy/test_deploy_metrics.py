"""Alerts and autoscaling read metrics the processes really export (names taken from the code)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from services.common.config import Settings
from services.common.telemetry import RpcMetrics
from services.inference.metrics import InferenceMetrics
from services.training.jobstore import JobStore
from services.training.metrics import WorkerMetrics, register_store_metrics
from tests.deploy.manifests import Manifest, named

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",),
            "summary": ("_count", "_sum", "")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """Every series name the three processes can export, from their own metric classes."""
    tmp = tmp_path_factory.mktemp("metrics")
    registry = CollectorRegistry()
    RpcMetrics(registry)
    InferenceMetrics(registry)
    WorkerMetrics(registry)
    store = JobStore.open(Settings(database_url=f"sqlite:///{tmp / 'jobs.db'}", data_dir=tmp))
    try:
        register_store_metrics(registry, store)
        names = set()
        for family in registry.collect():
            names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
        yield names
    finally:
        store.close()


def _referenced(text: str) -> set[str]:
    return set(re.findall(r"\batelier_[a-z_]+[a-z]", text))


def test_alert_expressions_use_exported_metrics(production: list[Manifest], exported: set[str]) -> None:
    rules = named(production, "PrometheusRule", "atelier")["spec"]["groups"]
    exprs = "\n".join(rule["expr"] for group in rules for rule in group["rules"])
    referenced = _referenced(exprs)
    assert referenced, "no atelier_* metric in the alerts?"
    assert referenced <= exported, sorted(referenced - exported)


def test_autoscaling_metric_is_exported(production: list[Manifest], exported: set[str]) -> None:
    hpa = named(production, "HorizontalPodAutoscaler", "inference")
    pods_metrics = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    adapter_rules = (ROOT / "deploy/k8s/components/hpa/prometheus-adapter-values.yaml").read_text()
    assert pods_metrics | _referenced(adapter_rules) <= exported


def test_documented_metrics_are_exported(exported: set[str]) -> None:
    doc = (ROOT / "docs/operations.md").read_text()
    documented = _referenced(doc)
    assert documented, "docs/operations.md names no metric"
    # Prose may name a histogram by its family name (without _bucket/_count/_sum).
    families = {name.removesuffix("_bucket") for name in exported if name.endswith("_bucket")}
    assert documented <= exported | families, sorted(documented - exported - families)
