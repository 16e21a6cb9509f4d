#!/usr/bin/env python3
"""Generate hivemind/_proto/*_pb2*.py from proto/*.proto with grpcio-tools.

The virtual include path maps proto/ onto hivemind/_proto, so the generated grpc modules import
their messages as `hivemind._proto.nodepool_pb2` rather than as a top-level module.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "hivemind" / "_proto"


def main() -> int:
    from grpc_tools import protoc  # type: ignore[import-untyped]

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "__init__.py").write_text('"""Generated from proto/ by scripts/gen_proto.py; do not edit."""\n')
    protos = sorted((ROOT / "proto").glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{include}",
        f"-Ihivemind/_proto={ROOT / 'proto'}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *[f"hivemind/_proto/{p.name}" for p in protos],
    ]
    rc = protoc.main(args)
    if rc != 0:
        print("protoc failed", file=sys.stderr)
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
