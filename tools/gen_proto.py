"""Generate Python stubs (protobuf, gRPC, mypy) from protos/ into clients/python/atelier/v1.

`--check` regenerates into a temporary folder and fails when the committed files differ,
so CI catches a contract edit whose stubs were not regenerated.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "clients" / "python"
PACKAGE_DIR = Path("atelier") / "v1"


def generate(out_root: Path) -> None:
    """Run protoc with the python, grpc and mypy plugins over every .proto file."""
    well_known = str(resources.files("grpc_tools") / "_proto")
    bin_dir = Path(sys.executable).parent
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
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
    (out_root / PACKAGE_DIR / "__init__.py").touch()


def generated_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in (root / PACKAGE_DIR).glob("*") if p.is_file()}


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want, have = generated_files(fresh), generated_files(OUT_ROOT)
        drift = sorted(want ^ have)
        drift += [f for f in sorted(want & have) if not filecmp.cmp(fresh / f, OUT_ROOT / f, shallow=False)]
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
