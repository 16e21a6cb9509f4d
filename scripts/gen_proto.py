#!/usr/bin/env python3
"""Generate hivemind/_proto/ from proto/ with grpcio-tools.

- proto/*.proto (the hivemind.ext extension) → hivemind/_proto/*_pb2*.py
- proto/vYYYY_MM/nodepool.proto (one per pool protocol generation) → hivemind/_proto/vYYYY_MM/

The virtual include paths map proto/ onto hivemind/_proto, so the generated grpc modules import
their messages as `hivemind._proto.v2025_10.nodepool_pb2` rather than as a top-level module.

Both generations declare package `nodepool` with the same message names, which the protobuf
runtime's default descriptor pool refuses to hold twice ("duplicate symbol"). Each generation's
module therefore builds its descriptors in a pool of its own; nothing is looked up by name in
the default pool, so both import side by side in one process.

`hivemind/_proto/nodepool_pb2*.py` re-export the 2026-04 bindings under their old name for tools
and tests written before there were two generations.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "hivemind" / "_proto"
DEFAULT_GENERATION = "v2026_04"
_HEADER = '"""Generated from proto/ by scripts/gen_proto.py; do not edit."""\n'


def _private_pool(path: Path) -> None:
    text = path.read_text()
    new, n = re.subn(r"_descriptor_pool\.Default\(\)\.AddSerializedFile\(",
                     "_descriptor_pool.DescriptorPool().AddSerializedFile(", text)
    if n != 1:
        raise SystemExit(f"{path}: expected one AddSerializedFile on the default pool, found {n}")
    path.write_text(new)


def _alias(name: str) -> None:
    body = f"from hivemind._proto.{DEFAULT_GENERATION}.{name} import *  # noqa: F403\n"
    for suffix in (".py", ".pyi"):
        if suffix == ".pyi" and name.endswith("_grpc"):
            continue
        (OUT / f"{name}{suffix}").write_text(_HEADER + body)


def main() -> int:
    from grpc_tools import protoc  # type: ignore[import-untyped]

    include = Path(protoc.__file__).parent / "_proto"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "__init__.py").write_text(_HEADER)
    jobs: list[tuple[Path, list[Path], str]] = [(ROOT / "proto", sorted((ROOT / "proto").glob("*.proto")),
                                                 "hivemind/_proto")]
    for gen in sorted(p for p in (ROOT / "proto").iterdir() if p.is_dir() and p.name.startswith("v")):
        (OUT / gen.name).mkdir(exist_ok=True)
        (OUT / gen.name / "__init__.py").write_text(_HEADER)
        jobs.append((gen, sorted(gen.glob("*.proto")), f"hivemind/_proto/{gen.name}"))
    for src, protos, virtual in jobs:
        rc = protoc.main([
            "protoc", f"-I{include}", f"-I{virtual}={src}",
            f"--python_out={ROOT}", f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}",
            *[f"{virtual}/{p.name}" for p in protos],
        ])
        if rc != 0:
            print(f"protoc failed on {src}", file=sys.stderr)
            return int(rc)
        if virtual != "hivemind/_proto":
            for p in protos:
                _private_pool(ROOT / virtual / f"{p.stem}_pb2.py")
    _alias("nodepool_pb2")
    _alias("nodepool_pb2_grpc")
    return 0


if __name__ == "__main__":
    sys.exit(main())
