"""Wire types stay at the servicer edge: no domain module under services/ imports a `_pb2`.

Proto <-> domain conversion happens only at the edge; domain modules take and return plain
values. A module may import generated `*_pb2` / `*_pb2_grpc` modules only if it is

* a servicer (`servicer.py`, anywhere) or a converter (`convert.py`, anywhere): the edge
  itself, which turns messages into plain values and back;
* one of the named files below, each an edge of another kind: inference's converter (it
  validates the GenerationSpec message), the gRPC error mapping (google.rpc details), the
  server wiring (health and reflection), two servicers under other names, and the gateway
  (HTTP <-> gRPC transcoding).

A new module that needs a message is wrong here: convert at the servicer and pass plain
values in (see services/training/convert.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

SERVICES = Path(__file__).resolve().parents[2] / "services"
EDGE_FILE_NAMES = {"servicer.py": "servicer", "convert.py": "converter"}
EDGE_FILES = {
    "inference/validation.py": "inference's converter: validates the GenerationSpec message",
    "common/error_mapping.py": "domain errors -> gRPC status with google.rpc details",
    "common/server.py": "server wiring: health and reflection services",
    "common/usage_service.py": "a servicer (UsageService)",
    "training/worker_health.py": "a servicer (the worker's gRPC health service)",
}
EDGE_FOLDERS = {"gateway": "HTTP <-> gRPC transcoding edge"}


def wire_imports(source: str) -> list[str]:
    """The generated protobuf/gRPC modules a module imports (`x_pb2`, `x_pb2_grpc`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [name for name in names if _is_wire(name)]
    return sorted(set(found))


def _is_wire(dotted: str) -> bool:
    last = dotted.rsplit(".", 1)[-1]
    return last.endswith("_pb2") or last.endswith("_pb2_grpc")


def allowed(relative: Path) -> bool:
    return (relative.name in EDGE_FILE_NAMES or relative.as_posix() in EDGE_FILES
            or relative.parts[0] in EDGE_FOLDERS)


def test_the_detector_sees_every_import_form() -> None:
    source = ("import atelier_api.v1.common_pb2\nfrom atelier_api.v1 import training_pb2, training_pb2_grpc\n"
              "from atelier_api.v1.inference_pb2 import GenerationSpec\nfrom google.protobuf import json_format\n"
              "def f():\n    from google.rpc import error_details_pb2\n")
    assert wire_imports(source) == [
        "atelier_api.v1.common_pb2", "atelier_api.v1.inference_pb2", "atelier_api.v1.training_pb2",
        "atelier_api.v1.training_pb2_grpc", "google.rpc.error_details_pb2",
    ]


def test_the_allow_list_names_existing_files() -> None:
    for relative in EDGE_FILES:
        assert (SERVICES / relative).is_file(), relative
    for folder in EDGE_FOLDERS:
        assert (SERVICES / folder).is_dir(), folder


def test_only_servicers_and_converters_import_wire_types() -> None:
    offenders = []
    for path in sorted(SERVICES.rglob("*.py")):
        relative = path.relative_to(SERVICES)
        if allowed(relative):
            continue
        if imports := wire_imports(path.read_text(encoding="utf-8")):
            offenders.append(f"services/{relative.as_posix()}: {', '.join(imports)}")
    assert not offenders, ("domain modules import wire types; convert at the servicer edge instead:\n"
                           + "\n".join(offenders))
