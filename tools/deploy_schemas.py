"""Write the JSON schemas deploy-check validates custom resources against.

kubernetes-validate knows only built-in kinds, so the CRDs Atelier uses (KEDA ScaledObject and
TriggerAuthentication, Prometheus Operator ServiceMonitor and PrometheusRule, Istio
DestinationRule) are checked against schemas kept in deploy/k8s/schemas/<group>/<kind>_<ver>.json.
They are structural subsets of the upstream CRDs: the fields Atelier uses (and their common
siblings) with the upstream types, enums and required lists, unknown fields rejected so a typo
fails. Edit this file, not the JSON; `--check` (run by deploy-check) fails when they differ.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_DIR = ROOT / "deploy/k8s/schemas"

Schema = dict[str, Any]
S: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
B: Schema = {"type": "boolean"}
ANY_OBJECT: Schema = {"type": "object"}
STRMAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
# Prometheus duration ("30s", "1h30m") and Go/protobuf duration ("1.5s", "300ms").
PROM_DURATION: Schema = {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?"
                                                      "(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
GO_DURATION: Schema = {"type": "string", "pattern": "^([0-9]+(\\.[0-9]+)?(ms|s|m|h))+$"}


def obj(props: Schema, required: tuple[str, ...] = (), **extra: Any) -> Schema:
    """A closed object: listed properties only."""
    schema: Schema = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    schema.update(extra)
    return schema


def arr(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


def enum(*values: str) -> Schema:
    return {"enum": list(values)}


def int_min(minimum: int, maximum: int | None = None) -> Schema:
    schema: Schema = {"type": "integer", "minimum": minimum}
    if maximum is not None:
        schema["maximum"] = maximum
    return schema


def resource(api_version: str, kind: str, spec: Schema, source: str) -> Schema:
    """Top-level schema for one custom resource kind."""
    metadata = obj({"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
                    "namespace": S, "labels": STRMAP, "annotations": STRMAP}, ("name",))
    metadata["additionalProperties"] = True
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{kind} ({api_version})",
        "description": f"Structural subset of the {kind} CRD for Atelier's deploy-check; source: {source}.",
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind},
                       "metadata": metadata, "spec": spec},
        "additionalProperties": False,
    }


# --- KEDA ------------------------------------------------------------------------------------

def _hpa_rules() -> Schema:
    policy = obj({"type": enum("Pods", "Percent"), "value": int_min(1), "periodSeconds": int_min(1, 1800)},
                 ("type", "value", "periodSeconds"))
    return obj({"stabilizationWindowSeconds": int_min(0, 3600), "selectPolicy": enum("Max", "Min", "Disabled"),
                "policies": arr(policy)})


def scaledobject() -> Schema:
    trigger = obj({
        "type": S, "name": S, "metadata": STRMAP, "useCachedMetrics": B,
        "metricType": enum("AverageValue", "Value", "Utilization"),
        "authenticationRef": obj({"name": S, "kind": enum("TriggerAuthentication", "ClusterTriggerAuthentication")},
                                 ("name",)),
    }, ("type", "metadata"), allOf=[{
        "if": {"properties": {"type": {"const": "postgresql"}}},
        "then": {"properties": {"metadata": {"required": ["query", "targetQueryValue"]}}},
    }])
    advanced = obj({
        "restoreToOriginalReplicaCount": B,
        "horizontalPodAutoscalerConfig": obj({"name": S, "behavior": obj({"scaleUp": _hpa_rules(),
                                                                          "scaleDown": _hpa_rules()})}),
        "scalingModifiers": obj({"formula": S, "target": S, "activationTarget": S,
                                 "metricType": enum("AverageValue", "Value")}),
    })
    spec = obj({
        "scaleTargetRef": obj({"name": S, "kind": S, "apiVersion": S, "envSourceContainerName": S}, ("name",)),
        "pollingInterval": int_min(1), "cooldownPeriod": int_min(0), "initialCooldownPeriod": int_min(0),
        "idleReplicaCount": int_min(0), "minReplicaCount": int_min(0), "maxReplicaCount": int_min(1),
        "fallback": obj({"failureThreshold": int_min(0), "replicas": int_min(0),
                         "behavior": enum("static", "currentReplicas", "currentReplicasIfHigher",
                                          "currentReplicasIfLower")}, ("failureThreshold", "replicas")),
        "advanced": advanced,
        "triggers": arr(trigger, minItems=1),
    }, ("scaleTargetRef", "triggers"), allOf=[{
        # A scalingModifiers formula names triggers, so each trigger needs a name.
        "if": {"required": ["advanced"], "properties": {"advanced": {"required": ["scalingModifiers"]}}},
        "then": {"properties": {
            "triggers": {"items": {"required": ["name"]}},
            "advanced": {"properties": {"scalingModifiers": {"required": ["formula", "target"]}}}}},
    }])
    return resource("keda.sh/v1alpha1", "ScaledObject", spec,
                    "kedacore/keda config/crd/bases/keda.sh_scaledobjects.yaml; KEDA >= 2.12 scalingModifiers")


def triggerauthentication() -> Schema:
    ref = obj({"parameter": S, "name": S, "key": S}, ("parameter", "name", "key"))
    spec = obj({
        "secretTargetRef": arr(ref), "configMapTargetRef": arr(ref),
        "env": arr(obj({"parameter": S, "name": S, "containerName": S}, ("parameter", "name"))),
        "podIdentity": obj({"provider": enum("none", "azure-workload", "aws", "aws-eks", "gcp"),
                            "identityId": S, "roleArn": S, "identityOwner": S}, ("provider",)),
        "hashiCorpVault": ANY_OBJECT, "azureKeyVault": ANY_OBJECT, "awsSecretManager": ANY_OBJECT,
        "gcpSecretManager": ANY_OBJECT, "boundServiceAccountToken": arr(ANY_OBJECT),
    }, minProperties=1)
    return resource("keda.sh/v1alpha1", "TriggerAuthentication", spec,
                    "kedacore/keda config/crd/bases/keda.sh_triggerauthentications.yaml")


# --- Prometheus Operator -----------------------------------------------------------------------

def servicemonitor() -> Schema:
    actions = ("replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod", "labelmap",
               "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep", "lowercase", "Lowercase",
               "uppercase", "Uppercase", "keepequal", "KeepEqual", "dropequal", "DropEqual")
    relabel = obj({"sourceLabels": arr(S), "separator": S, "targetLabel": S, "regex": S, "modulus": INT,
                   "replacement": S, "action": enum(*actions)})
    endpoint = obj({
        "port": S, "targetPort": {"type": ["integer", "string"]}, "path": S,
        "scheme": enum("http", "https", "HTTP", "HTTPS"), "params": ANY_OBJECT,
        "interval": PROM_DURATION, "scrapeTimeout": PROM_DURATION, "honorLabels": B, "honorTimestamps": B,
        "trackTimestampsStaleness": B, "relabelings": arr(relabel), "metricRelabelings": arr(relabel),
        "followRedirects": B, "enableHttp2": B, "filterRunning": B, "proxyUrl": S, "tlsConfig": ANY_OBJECT,
        "authorization": ANY_OBJECT, "basicAuth": ANY_OBJECT, "oauth2": ANY_OBJECT, "bearerTokenSecret": ANY_OBJECT,
    })
    selector = obj({"matchLabels": STRMAP, "matchExpressions": arr(obj(
        {"key": S, "operator": enum("In", "NotIn", "Exists", "DoesNotExist"), "values": arr(S)},
        ("key", "operator")))})
    spec = obj({
        "selector": selector, "endpoints": arr(endpoint), "jobLabel": S,
        "namespaceSelector": obj({"any": B, "matchNames": arr(S)}),
        "targetLabels": arr(S), "podTargetLabels": arr(S), "sampleLimit": INT, "targetLimit": INT, "labelLimit": INT,
        "scrapeClass": S, "scrapeProtocols": arr(S), "attachMetadata": obj({"node": B}),
    }, ("selector",))
    return resource("monitoring.coreos.com/v1", "ServiceMonitor", spec,
                    "prometheus-operator example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml")


def prometheusrule() -> Schema:
    rule = obj({"alert": S, "record": S, "expr": {"type": ["integer", "string"], "minLength": 1},
                "for": PROM_DURATION, "keep_firing_for": PROM_DURATION, "labels": STRMAP, "annotations": STRMAP},
               ("expr",), oneOf=[{"required": ["alert"]}, {"required": ["record"]}])
    group = obj({"name": {"type": "string", "minLength": 1}, "interval": PROM_DURATION,
                 "query_offset": PROM_DURATION, "limit": INT, "partial_response_strategy": S, "labels": STRMAP,
                 "rules": arr(rule)}, ("name",))
    return resource("monitoring.coreos.com/v1", "PrometheusRule", obj({"groups": arr(group)}),
                    "prometheus-operator example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml")


# --- Istio -----------------------------------------------------------------------------------------

def _traffic_policy() -> Schema:
    hash_keys = ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName")
    consistent_hash = obj({
        "httpHeaderName": {"type": "string", "minLength": 1},
        "httpCookie": obj({"name": S, "path": S, "ttl": GO_DURATION, "attributes": arr(ANY_OBJECT)}, ("name",)),
        "useSourceIp": B, "httpQueryParameterName": S,
        "ringHash": obj({"minimumRingSize": int_min(0)}), "maglev": obj({"tableSize": int_min(0)}),
        "minimumRingSize": int_min(0),
    }, oneOf=[{"required": [key]} for key in hash_keys], **{"not": {"required": ["ringHash", "maglev"]}})
    load_balancer = obj({
        "simple": enum("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST"),
        "consistentHash": consistent_hash, "localityLbSetting": ANY_OBJECT, "warmupDurationSecs": GO_DURATION,
        "warmup": ANY_OBJECT,
    }, **{"not": {"required": ["simple", "consistentHash"]}})
    connection_pool = obj({
        "tcp": obj({"maxConnections": INT, "connectTimeout": GO_DURATION, "maxConnectionDuration": GO_DURATION,
                    "idleTimeout": GO_DURATION,
                    "tcpKeepalive": obj({"probes": INT, "time": GO_DURATION, "interval": GO_DURATION})}),
        "http": obj({"http1MaxPendingRequests": INT, "http2MaxRequests": INT, "maxRequestsPerConnection": INT,
                     "maxRetries": INT, "idleTimeout": GO_DURATION, "useClientProtocol": B,
                     "h2UpgradePolicy": enum("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"), "maxConcurrentStreams": INT}),
    })
    outlier = obj({"consecutiveErrors": INT, "consecutive5xxErrors": int_min(0),
                   "consecutiveGatewayErrors": int_min(0), "consecutiveLocalOriginFailures": INT,
                   "splitExternalLocalOriginErrors": B, "interval": GO_DURATION, "baseEjectionTime": GO_DURATION,
                   "maxEjectionPercent": int_min(0, 100), "minHealthPercent": int_min(0, 100)})
    return obj({"loadBalancer": load_balancer, "connectionPool": connection_pool, "outlierDetection": outlier,
                "tls": ANY_OBJECT, "portLevelSettings": arr(ANY_OBJECT), "tunnel": ANY_OBJECT,
                "proxyProtocol": ANY_OBJECT})


def destinationrule() -> Schema:
    policy = _traffic_policy()
    spec = obj({"host": {"type": "string", "minLength": 1}, "trafficPolicy": policy,
                "subsets": arr(obj({"name": S, "labels": STRMAP, "trafficPolicy": policy}, ("name",))),
                "exportTo": arr(S), "workloadSelector": obj({"matchLabels": STRMAP})}, ("host",))
    return resource("networking.istio.io/v1", "DestinationRule", spec,
                    "istio/api networking/v1alpha3/destination_rule.proto (served as v1 since Istio 1.22)")


# --- files -------------------------------------------------------------------------------------------

def schema_files() -> dict[Path, str]:
    """Every vendored schema file and its exact content."""
    files = {}
    for build in (scaledobject, triggerauthentication, servicemonitor, prometheusrule, destinationrule):
        schema = build()
        api_version = schema["properties"]["apiVersion"]["const"]
        group, _, version = api_version.rpartition("/")
        kind = schema["properties"]["kind"]["const"].lower()
        files[SCHEMA_DIR / group / f"{kind}_{version}.json"] = json.dumps(schema, indent=2) + "\n"
    return files


def stale_schemas() -> list[Path]:
    return [path for path, text in schema_files().items() if not path.exists() or path.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a schema file is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_schemas()
        for path in stale:
            print(f"stale schema: {path.relative_to(ROOT)} (run: python tools/deploy_schemas.py)")
        return 1 if stale else 0
    for path, text in schema_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
