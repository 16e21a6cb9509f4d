"""The README's main-job command: `hivemind-worker dev --demo` starts a development pool and a
worker in one process, runs the bundled sample task through them, prints its output, and exits 0."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from e2e import WORKER_HOST, free_port
from statedir import state_root


@pytest.mark.parametrize("executor,protocol", [("venv", "2026-04"), ("auto", "2026-04"), ("venv", "2025-10")])
def test_dev_demo_runs_the_sample_task(executor: str, protocol: str) -> None:
    state = Path(tempfile.mkdtemp(prefix="hivemind-devtest-", dir=state_root()))
    state.chmod(0o711)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "hivemind", "dev", "--demo", "--executor", executor, "--protocol", protocol,
             "--state-dir", str(state), "--pool-listen", f"127.0.0.1:{free_port()}",
             "--worker-host", WORKER_HOST, "--worker-port", str(free_port(WORKER_HOST)), "--status-port", "0"],
            capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        assert "hello from the task, step 5 of 5" in r.stdout
        assert "COMPLETED" in r.stdout
        assert f"development pool (protocol {protocol})" in r.stderr
        assert f"the pool speaks protocol generation {protocol}" in r.stderr
        with zipfile.ZipFile(state / "demo-result.zip") as z:
            assert z.read("result.txt").startswith(b"computed on")
        # The generated worker password is the one file holding a secret: owner-only.
        assert (state / "pool-password").stat().st_mode & 0o777 == 0o600
        password = (state / "pool-password").read_text().strip()
        assert password not in r.stdout + r.stderr
    finally:
        subprocess.run(["rm", "-rf", str(state)], check=False)
