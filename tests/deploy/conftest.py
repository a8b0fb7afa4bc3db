"""Render every kustomize target once per test session (kubectl from the venv, ~1 s in all)."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import Manifest
from tools import deploy_check


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[Manifest]]:
    """Rendered objects by short target name: base, dev, production, envoy."""
    short = {"deploy/k8s/base": "base", "deploy/k8s/overlays/dev": "dev",
             "deploy/k8s/overlays/production": "production", "tests/deploy/kustomize/envoy-routing": "envoy"}
    return {short[target]: deploy_check.render(target) for target in deploy_check.RENDER_TARGETS}


@pytest.fixture(scope="session")
def dev(rendered: dict[str, list[Manifest]]) -> list[Manifest]:
    return rendered["dev"]


@pytest.fixture(scope="session")
def production(rendered: dict[str, list[Manifest]]) -> list[Manifest]:
    return rendered["production"]
