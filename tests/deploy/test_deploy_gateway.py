"""The Kubernetes HTTP/JSON gateway (deploy/k8s/components/http-gateway) agrees with the protos:
the shipped descriptor set is the generated one, the transcoder serves every annotated service,
exactly the streaming RPCs bypass it to the API pods' embedded gateway, and every Envoy cluster
points at a Service port that exists."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import descriptor_pb2

from services.gateway.routes import Route, load_routes
from tests.deploy.manifests import Manifest, atelier_deployments, container_port, containers, effective_settings, named
from tools.gen_proto import DESCRIPTOR_SET, write_descriptor_set

TRANSCODER = "envoy.filters.http.grpc_json_transcoder"
OVERLAYS = ["dev", "production"]


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, rendered: dict[str, list[Manifest]]) -> list[Manifest]:
    objs: list[Manifest] = rendered[request.param]
    return objs


def _config_map(objs: list[Manifest], prefix: str) -> Manifest:
    return next(c for c in objs if c["kind"] == "ConfigMap" and c["metadata"]["name"].startswith(prefix))


def _envoy(objs: list[Manifest]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(_config_map(objs, "http-gateway-envoy")["data"]["envoy.yaml"])
    return config


def _manager(envoy: dict[str, Any]) -> dict[str, Any]:
    chain = envoy["static_resources"]["listeners"][0]["filter_chains"][0]
    manager: dict[str, Any] = chain["filters"][0]["typed_config"]
    return manager


def _first_match(routes: list[dict[str, Any]], method: str, path: str) -> dict[str, Any]:
    """The first Envoy route matching (method, path), the way Envoy picks one."""
    for route in routes:
        match = route["match"]
        if "path" in match and match["path"] != path:
            continue
        if "prefix" in match and not path.startswith(match["prefix"]):
            continue
        if "safe_regex" in match and not re.fullmatch(match["safe_regex"]["regex"], path):
            continue
        methods = [h["string_match"]["exact"] for h in match.get("headers", []) if h["name"] == ":method"]
        if methods and method not in methods:
            continue
        return route
    raise AssertionError(f"no Envoy route for {method} {path}")


def _filled(route: Route) -> str:
    path = route.template
    for variable in route.variables:
        path = path.replace("{" + variable + "}", "x-1")
    return path


def test_committed_descriptor_set_matches_the_protos(tmp_path: Path) -> None:
    """The drift check `make proto-check` runs: regenerate and compare byte for byte."""
    write_descriptor_set(tmp_path / "atelier.pb")
    assert (tmp_path / "atelier.pb").read_bytes() == DESCRIPTOR_SET.read_bytes(), "run `make proto`"


def test_shipped_descriptor_set_is_the_generated_one_and_holds_every_annotated_service(overlay: list[Manifest]) -> None:
    shipped = base64.b64decode(_config_map(overlay, "http-gateway-descriptors")["binaryData"]["atelier.pb"])
    assert shipped == DESCRIPTOR_SET.read_bytes()  # `make proto-check` keeps this file current
    files = descriptor_pb2.FileDescriptorSet.FromString(shipped).file
    names = {f.name for f in files}
    assert {"google/api/annotations.proto", "google/rpc/status.proto", "google/rpc/error_details.proto"} <= names
    services = {f"{f.package}.{s.name}" for f in files for s in f.service if f.package == "atelier.v1"}
    transcoder = next(f for f in _manager(_envoy(overlay))["http_filters"] if f["name"] == TRANSCODER)["typed_config"]
    assert set(transcoder["services"]) == services == {r.service for r in load_routes()}
    assert transcoder["print_options"]["preserve_proto_field_names"] is True  # same JSON as the embedded gateway
    assert transcoder["convert_grpc_status"] is True


def test_exactly_the_streaming_rpcs_bypass_the_transcoder(overlay: list[Manifest]) -> None:
    routes = _manager(_envoy(overlay))["route_config"]["virtual_hosts"][0]["routes"]
    for route in load_routes():
        chosen = _first_match(routes, route.http_method, _filled(route))
        bypass = chosen.get("typed_per_filter_config", {}).get(TRANSCODER, {}).get("disabled", False)
        streaming = route.client_streaming or route.server_streaming
        assert bypass == streaming, (route.grpc_path, chosen["match"])
        if streaming:
            expected = "inference-http" if route.service.endswith("InferenceService") else "training-http"
            assert chosen["route"]["cluster"] == expected, route.grpc_path
        else:  # after transcoding, the gRPC path picks the cluster of the service
            grpc_route = _first_match(routes, "POST", route.grpc_path)
            expected = "inference-grpc" if route.service.endswith("InferenceService") else "training-grpc"
            assert grpc_route["route"]["cluster"] == expected, route.grpc_path
    assert _first_match(routes, "GET", "/")["route"]["cluster"] == "training-http"  # console, /openapi.json


def test_clusters_point_at_service_ports_of_the_api_pods(overlay: list[Manifest]) -> None:
    deployments = atelier_deployments(overlay)
    for cluster in _envoy(overlay)["static_resources"]["clusters"]:
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        service = named(overlay, "Service", address["address"])
        assert service["spec"]["clusterIP"] == "None"  # per-pod endpoints, balanced by Envoy
        port = next(p for p in service["spec"]["ports"] if p["port"] == address["port_value"])
        container = containers(deployments[service["spec"]["selector"]["app.kubernetes.io/component"]])[0]
        assert container_port(container, port["targetPort"]) == address["port_value"]
        settings = effective_settings(overlay, container)
        if port["targetPort"] == "http":
            assert settings.http_port == address["port_value"]


def test_gateway_deployment_mounts_both_config_maps(overlay: list[Manifest]) -> None:
    deployment = named(overlay, "Deployment", "http-gateway")
    volumes = {v["name"]: v["configMap"]["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]
               if "configMap" in v}
    assert any(n.startswith("http-gateway-descriptors") for n in volumes.values())
    transcoder = next(f for f in _manager(_envoy(overlay))["http_filters"] if f["name"] == TRANSCODER)["typed_config"]
    mounts = {m["mountPath"]: m["name"] for m in containers(deployment)[0]["volumeMounts"]}
    descriptor_dir = transcoder["proto_descriptor"].rsplit("/", 1)[0]
    assert volumes[mounts[descriptor_dir]].startswith("http-gateway-descriptors")
