# What the worker package is built and tested from (relative to the repository root). One list
# for nix/package.nix (lib.fileset.unions) and for tests/test_nix.py, which rebuilds exactly this
# file set to reproduce the package's check phase outside Nix.
[
  ../pyproject.toml
  ../setup.py
  ../README.md
  ../hivemind
  ../proto
  ../scripts/gen_proto.py
  ../tests
  # tests/test_bench_smoke.py imports bench_e2e and the harness.
  ../bench
  ../units
]
