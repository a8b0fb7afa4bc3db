"""Generate Python stubs (protobuf, gRPC, mypy) from protos/ into api/python/atelier_api/v1
(the `atelier-api` distribution), and the descriptor set Envoy's gRPC-JSON transcoder reads
(deploy/k8s/components/http-gateway).

`--check` regenerates into a temporary folder and fails when the committed files differ,
so CI catches a contract edit whose stubs were not regenerated.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from google.rpc import status_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "api" / "python"
# protoc names the output after the proto path (atelier/v1); the Python package is atelier_api.v1,
# so the generated files are moved there and their imports of each other rewritten.
PROTO_DIR = Path("atelier") / "v1"
PACKAGE_DIR = Path("atelier_api") / "v1"
MODULE_REFS = (
    (re.compile(r"^from atelier\.v1 import ", re.M), "from atelier_api.v1 import "),
    (re.compile(r"'atelier\.v1\.(\w+_pb2)'"), r"'atelier_api.v1.\1'"),
)
# Shipped to Envoy (deploy/k8s/components/http-gateway) in a ConfigMap; checked for drift like the stubs.
DESCRIPTOR_SET = ROOT / "deploy" / "k8s" / "components" / "http-gateway" / "atelier.pb"
RPC_PROTOS = ("google/rpc/status.proto", "google/rpc/error_details.proto")


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PROTO_DIR).glob("*.proto"))


def generate(out_root: Path) -> None:
    """protoc into a scratch folder, then move the files under atelier_api/v1 with their imports
    rewritten (what `--check` compares is this post-processed output)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_protoc(Path(tmp))
        target = out_root / PACKAGE_DIR
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted((Path(tmp) / PROTO_DIR).glob("*")):
            text = src.read_text()
            for pattern, repl in MODULE_REFS:
                text = pattern.sub(repl, text)
            (target / src.name).write_text(text)
    (out_root / PACKAGE_DIR / "__init__.py").touch()


def run_protoc(out_root: Path) -> None:
    """Run protoc with the python, grpc and mypy plugins over every .proto file."""
    well_known = str(resources.files("grpc_tools") / "_proto")
    bin_dir = Path(sys.executable).parent
    protos = proto_files()
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def write_descriptor_set(path: Path) -> None:
    """The binary FileDescriptorSet Envoy's gRPC-JSON transcoder reads (the same protos, their
    imports, and google.rpc.Status + error details so `convert_grpc_status` can print them)."""
    well_known = str(resources.files("grpc_tools") / "_proto")
    googleapis = str(Path(status_pb2.__file__).resolve().parents[2])
    protos = proto_files()
    path.parent.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{googleapis}", f"-I{well_known}", "--include_imports",
            f"--descriptor_set_out={path}", *protos, *RPC_PROTOS]
    if protoc.main(args) != 0:
        raise SystemExit("protoc (descriptor set) failed")


def generated_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in (root / PACKAGE_DIR).glob("*") if p.is_file()}


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want, have = generated_files(fresh), generated_files(OUT_ROOT)
        drift = sorted(want ^ have)
        drift += [f for f in sorted(want & have) if not filecmp.cmp(fresh / f, OUT_ROOT / f, shallow=False)]
        write_descriptor_set(fresh / "atelier.pb")
        if not DESCRIPTOR_SET.exists() or not filecmp.cmp(fresh / "atelier.pb", DESCRIPTOR_SET, shallow=False):
            drift.append(str(DESCRIPTOR_SET.relative_to(ROOT)))
        if drift:
            print("generated stubs are stale; run `make proto`:", *drift, sep="\n  ")
            return 1
    print("generated stubs match protos/")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs differ")
    if parser.parse_args().check:
        return check()
    target = OUT_ROOT / PACKAGE_DIR
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    generate(OUT_ROOT)
    write_descriptor_set(DESCRIPTOR_SET)
    return 0


if __name__ == "__main__":
    sys.exit(main())
