"""Properties of the rendered dev and production manifests that operators rely on."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from atelier_api.v1 import inference_pb2, training_pb2
from services.training.worker_health import WORKER_SERVICE
from tests.deploy.manifests import (
    ATELIER_COMPONENTS,
    Manifest,
    atelier_deployments,
    config_data,
    container_port,
    containers,
    effective_settings,
    named,
    of_kind,
    pod_spec,
    quantity_bytes,
    workloads,
)

OVERLAYS = ["dev", "production"]
GRPC_SERVICES = {s.full_name for pb in (inference_pb2, training_pb2) for s in pb.DESCRIPTOR.services_by_name.values()}


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, rendered: dict[str, list[Manifest]]) -> list[Manifest]:
    objs: list[Manifest] = rendered[request.param]
    return objs


def test_all_three_components_are_deployed(overlay: list[Manifest]) -> None:
    assert set(atelier_deployments(overlay)) == set(ATELIER_COMPONENTS)


def test_grpc_probes_target_the_settings_port(overlay: list[Manifest]) -> None:
    for component, port_field in ATELIER_COMPONENTS.items():
        if port_field is None:
            continue
        container = containers(atelier_deployments(overlay)[component])[0]
        port = getattr(effective_settings(overlay, container), port_field)
        assert container_port(container, "grpc") == port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, (component, probe)
        # Readiness asks for the component's own service, which must exist in the contract.
        assert container["readinessProbe"]["grpc"]["service"] in GRPC_SERVICES


def test_worker_probes_use_its_grpc_health_port(overlay: list[Manifest]) -> None:
    container = containers(atelier_deployments(overlay)["training-worker"])[0]
    port = effective_settings(overlay, container).worker_health_port
    assert port and container_port(container, "grpc-health") == port
    for probe in ("startupProbe", "livenessProbe"):  # overall status: the process lives
        assert container[probe]["grpc"] == {"port": port}, probe
    assert container["readinessProbe"]["grpc"] == {"port": port, "service": WORKER_SERVICE}


def test_servers_bind_all_interfaces_so_kubelet_probes_reach_them(overlay: list[Manifest]) -> None:
    for dep in atelier_deployments(overlay).values():
        assert effective_settings(overlay, containers(dep)[0]).host == "0.0.0.0"


def test_metrics_ports_match_settings(overlay: list[Manifest]) -> None:
    for dep in atelier_deployments(overlay).values():
        container = containers(dep)[0]
        assert container_port(container, "metrics") == effective_settings(overlay, container).metrics_port


def test_every_container_has_requests_and_limits(overlay: list[Manifest]) -> None:
    for workload, container in workloads(overlay):
        resources = container.get("resources", {})
        for section in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert resource in resources.get(section, {}), (workload["metadata"]["name"], section, resource)


def _non_root(pod: Manifest, container: Manifest) -> bool:
    merged = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    return merged.get("runAsNonRoot") is True and merged.get("runAsUser", 1) != 0


def test_every_container_is_locked_down(overlay: list[Manifest]) -> None:
    for workload, container in workloads(overlay):
        name = f"{workload['metadata']['name']}/{container['name']}"
        pod = pod_spec(workload)
        context = container.get("securityContext", {})
        assert _non_root(pod, container), name
        assert context.get("allowPrivilegeEscalation") is False, name
        assert context.get("readOnlyRootFilesystem") is True, name
        assert context.get("capabilities", {}).get("drop") == ["ALL"], name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name


def _gpu(container: Manifest, section: str) -> Any:
    return container["resources"][section].get("nvidia.com/gpu")


@pytest.mark.parametrize("target", ["base", "production"])
def test_gpu_deployments_request_one_gpu_on_gpu_nodes(rendered: dict[str, list[Manifest]], target: str) -> None:
    deps = atelier_deployments(rendered[target])
    for component in ("training-worker", "inference"):
        pod = pod_spec(deps[component])
        container = containers(deps[component])[0]
        assert _gpu(container, "requests") == _gpu(container, "limits") == 1, component
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), component
        assert pod["nodeSelector"], component
    api = containers(deps["training-api"])[0]
    assert "nvidia.com/gpu" not in api["resources"]["limits"]


def test_dev_is_cpu_only(dev: list[Manifest]) -> None:
    for workload, container in workloads(dev):
        for section in ("requests", "limits"):
            assert "nvidia.com/gpu" not in container["resources"].get(section, {}), workload["metadata"]["name"]
        assert not pod_spec(workload).get("nodeSelector"), workload["metadata"]["name"]
        assert "cuda" not in container["image"]
    for dep in atelier_deployments(dev).values():
        settings = effective_settings(dev, containers(dep)[0])
        assert (settings.training_device, settings.inference_device) == ("cpu", "cpu")
        assert dep["spec"]["replicas"] == 1


def test_images_are_mapped_from_placeholders(overlay: list[Manifest]) -> None:
    for _, container in workloads(overlay):
        assert container["image"] not in ("atelier-cpu", "atelier-cuda")
        assert ":" in container["image"], f"untagged image {container['image']}"


def test_termination_grace_covers_prestop_and_shutdown_grace(overlay: list[Manifest]) -> None:
    for component, dep in atelier_deployments(overlay).items():
        container = containers(dep)[0]
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        grace = effective_settings(overlay, container).shutdown_grace_seconds
        assert pod_spec(dep)["terminationGracePeriodSeconds"] > pre_stop + grace, component
    worker = containers(atelier_deployments(overlay)["training-worker"])[0]
    assert effective_settings(overlay, worker).shutdown_grace_seconds >= 60  # time to write a checkpoint


def test_state_and_caches_live_on_mounted_volumes(overlay: list[Manifest]) -> None:
    for component, dep in atelier_deployments(overlay).items():
        container = containers(dep)[0]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        settings = effective_settings(overlay, container)
        assert str(settings.data_dir) in mounts and "/tmp" in mounts, component
        assert any(str(settings.cache_dir).startswith(path) for path in mounts), component


def test_cache_bounds_fit_their_volumes_and_memory(overlay: list[Manifest]) -> None:
    dep = atelier_deployments(overlay)["inference"]
    container = containers(dep)[0]
    settings = effective_settings(overlay, container)
    volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    cache_volume = volumes[mounts[str(settings.cache_dir)]]
    assert settings.disk_cache_bytes < quantity_bytes(cache_volume["emptyDir"]["sizeLimit"])
    assert settings.host_cache_bytes < quantity_bytes(container["resources"]["limits"]["memory"])


def test_services_expose_named_container_ports(overlay: list[Manifest]) -> None:
    deps = atelier_deployments(overlay)
    for service in of_kind(overlay, "Service"):
        component = service["spec"]["selector"].get("app.kubernetes.io/component")
        if service["spec"]["selector"].get("app.kubernetes.io/name") != "atelier":
            continue
        container = containers(deps[component])[0]
        for port in service["spec"]["ports"]:
            assert port["port"] == container_port(container, port["targetPort"]), service["metadata"]["name"]


def _selects(obj: Manifest, labels: dict[str, str], key: str = "selector") -> bool:
    wanted = obj["spec"][key].get("matchLabels", {})
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def test_each_deployment_has_pdb_and_network_policy(overlay: list[Manifest]) -> None:
    for component, dep in atelier_deployments(overlay).items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert any(_selects(pdb, labels) for pdb in of_kind(overlay, "PodDisruptionBudget")), component
        policies = [p for p in of_kind(overlay, "NetworkPolicy") if _selects(p, labels, "podSelector")]
        assert any(set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} for p in policies), component


def test_dev_stores_match_settings(dev: list[Manifest]) -> None:
    data = config_data(dev)
    bucket = data["ATELIER_REGISTRY_URL"].removeprefix("s3://").split("/")[0]
    job = named(dev, "Job", "minio-create-bucket")
    assert containers(job)[0]["args"][-1] == f"local/{bucket}"
    minio = named(dev, "Service", "minio")
    assert data["ATELIER_S3_ENDPOINT_URL"] == f"http://minio:{minio['spec']['ports'][0]['port']}"
    secret = named(dev, "Secret", "atelier-postgres")
    assert "@postgres:5432/" in _decoded(secret, "database-url")
    assert _decoded(secret, "database-url").startswith("postgresql+psycopg://")
    assert _decoded(secret, "connection").startswith("postgresql://")


def _decoded(secret: Manifest, key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


def test_production_scaling_owners_drop_replicas(production: list[Manifest]) -> None:
    deps = atelier_deployments(production)
    assert "replicas" not in deps["inference"]["spec"]  # HPA owns it
    assert "replicas" not in deps["training-worker"]["spec"]  # KEDA owns it
    assert named(production, "HorizontalPodAutoscaler", "inference")["spec"]["scaleTargetRef"]["name"] == "inference"


def test_production_uses_external_stores_and_auth(production: list[Manifest]) -> None:
    data = config_data(production)
    assert data["ATELIER_REGISTRY_URL"].startswith("s3://")
    assert "ATELIER_S3_ENDPOINT_URL" not in data
    assert data["ATELIER_AUTH_ENABLED"] == "true"
    assert not of_kind(production, "StatefulSet") and not of_kind(production, "Secret")
