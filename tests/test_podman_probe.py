"""The Podman probe, with exactly the create options tasks get, in each mode the worker uses.

When a runtime piece is missing (catatonit, runc, the image) this is the test that fails, and it
fails with the probe's own reason: the same command `scripts/setup` ends with."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hivemind.executors.base import Enforcement, ExecutorStatus
from hivemind.probe import describe, fix_for

ROOT = Path(__file__).resolve().parent.parent

# What Podman 4.3 said on a fresh Debian 12 without catatonit (recorded from a real create).
CATATONIT_MISSING = ("podman service error: 500 Server Error: Internal Server Error (container-init binary not "
                     "found on the host: stat /usr/libexec/podman/catatonit: no such file or directory)")


def test_missing_catatonit_names_the_package() -> None:
    line = describe("podman", "rootless", ExecutorStatus("podman", False, CATATONIT_MISSING))
    assert line.startswith("podman rootless: UNUSABLE: ")
    assert "apt-get install catatonit" in line


def test_unknown_failure_has_no_invented_fix() -> None:
    assert fix_for("podman service error: something else") == ""


def test_usable_line_lists_enforced_limits() -> None:
    enf = Enforcement("container", memory=True, cpu=False, pids=True, network_isolated=True, readonly_root=True)
    line = describe("podman", "rootful", ExecutorStatus("podman", True, "podman 4.3.1 rootful", enf))
    assert line == "podman rootful: usable (podman 4.3.1 rootful); limits enforced: memory, pids"


@pytest.mark.podman
@pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")
@pytest.mark.parametrize("mode", ["rootless", "rootful"])
def test_probe_runs_task_options(mode: str, tmp_path: Path) -> None:
    if mode == "rootful" and os.geteuid() != 0:
        pytest.skip("rootful Podman needs root")
    res = subprocess.run([sys.executable, "-m", "hivemind", "probe", "--executor", "podman", "--mode", mode],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=180)
    out = res.stdout + res.stderr
    # The probe's reason is the assertion message: a missing piece reads as itself here.
    assert res.returncode == 0, out
    assert f"podman {mode}: usable" in out, out
