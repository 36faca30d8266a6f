"""Regenerate gen/ from proto/ offline with grpc_tools.protoc and protoc-gen-connectrpc."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
GEN_DIR = ROOT / "gen"
# protoc ships the well-known types (google/protobuf/*.proto) inside grpc_tools.
WELL_KNOWN_TYPES = Path(grpc_tools.__file__).parent / "_proto"


def find_protos() -> list[str]:
    """Return the proto files under proto/, relative to it, in a stable order."""
    return sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Write *_pb2.py, *_pb2.pyi and *_connect.py for every proto file into out_dir."""
    plugin = shutil.which("protoc-gen-connectrpc", path=str(Path(sys.executable).parent))
    if plugin is None:
        raise SystemExit("protoc-gen-connectrpc not found next to the Python interpreter: install the dev dependencies")

    out_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTO_DIR}",
        f"--proto_path={WELL_KNOWN_TYPES}",
        f"--plugin=protoc-gen-connectrpc={plugin}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--connectrpc_out={out_dir}",
        "--connectrpc_opt=protobuf=google",
        *find_protos(),
    ]
    subprocess.run(command, check=True, cwd=PROTO_DIR)

    # Each generated directory becomes a regular package so imports resolve
    # the same way whether gen/ is installed or only on sys.path.
    for directory in [d for d in out_dir.rglob("*") if d.is_dir()]:
        (directory / "__init__.py").touch()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "gen"
        generate(fresh)
        if GEN_DIR.exists():
            shutil.rmtree(GEN_DIR)
        shutil.copytree(fresh, GEN_DIR)
    print(f"generated {len(find_protos())} proto files into {GEN_DIR.relative_to(ROOT)}/")


if __name__ == "__main__":
    main()
