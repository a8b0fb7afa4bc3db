"""The three distributions, installed as a backend team would: `pip install atelier` in a fresh venv.

Installs api/python (atelier-api) and clients/python (atelier) into a brand-new virtualenv (no
system site-packages, nothing of the repository's venv) and checks that the SDK works without
the server: no torch or other ML/storage stack comes with it, its CLI lists and calls a real
RegistryService on loopback, and the server-side commands say what to install instead of
failing obscurely.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from services.common.config import Settings
from services.registry.registry import Registry
from services.registry.servicer import registry_bindings
from services.registry.store import open_store
from tests.fixtures.grpc_servers import ServerThread, loopback_settings
from tests.fixtures.s3 import write_fake_pipeline

ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy",
               "sqlalchemy", "boto3", "alembic", "psycopg")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sdk_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only `pip install ./api/python ./clients/python` and their dependencies."""
    work = tmp_path_factory.mktemp("sdk")
    venv = work / "venv"
    sources = []  # copies, so the build leaves no build/ folders in the checkout
    for source in (ROOT / "api" / "python", ROOT / "clients" / "python"):
        sources.append(work / source.parent.name)
        shutil.copytree(source, sources[-1], ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    *map(str, sources)], check=True, timeout=600, cwd=work)
    return venv


def _run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # cwd outside the repository, so nothing of the source tree is importable by accident.
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=120, cwd=venv.parent, env={"PATH": "/usr/bin:/bin", "HOME": str(venv.parent)})


def test_the_sdk_installs_without_the_server_or_its_ml_stack(sdk_venv: Path) -> None:
    listed = _run(sdk_venv, "python", "-m", "pip", "list", "--format=json", "--disable-pip-version-check")
    installed = {entry["name"].lower() for entry in json.loads(listed.stdout)}
    assert {"atelier", "atelier-api", "grpcio"} <= installed
    assert not installed & {"atelier-server", *SERVER_ONLY}
    probe = ("import importlib.util as u, atelier, atelier.aio, atelier_api.v1.inference_pb2;"
             "from atelier import Client;"
             f"print([m for m in {(*SERVER_ONLY, 'services')!r} if u.find_spec(m)])")
    imported = _run(sdk_venv, "python", "-c", probe)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]"


@pytest.mark.parametrize("command", [["serve"], ["worker"], ["base-model", "create-tiny", "--random"],
                                     ["base-model", "pretrain-tiny"], ["registry", "gc", "--dry-run"]])
def test_server_commands_say_what_to_install(sdk_venv: Path, command: list[str]) -> None:
    result = _run(sdk_venv, "atelier", *command)
    assert result.returncode == 3
    assert f"`atelier {' '.join(part for part in command if not part.startswith('-'))}`" in result.stderr
    assert "pip install atelier-server" in result.stderr


def test_the_sdk_cli_calls_a_real_server(sdk_venv: Path, local_settings: Settings, tmp_path: Path,
                                         grpc_server: Callable[..., ServerThread]) -> None:
    registry = Registry(open_store(local_settings))
    registry.base_models.import_folder("tiny-sd", write_fake_pipeline(tmp_path / "pipe"))
    server = grpc_server(loopback_settings(), lambda: registry_bindings(registry, work_dir=tmp_path / "work"))
    result = _run(sdk_venv, "atelier", "--target", server.target, "--json", "base-model", "list")
    assert result.returncode == 0, result.stderr
    assert [model["name"] for model in json.loads(result.stdout)] == ["tiny-sd"]
    assert "create-tiny" in _run(sdk_venv, "atelier", "base-model", "--help").stdout
