"""`hivemind-worker run-task PATH`: a task author's tool, through the same executors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from statedir import state_root


@pytest.fixture()
def state_dir():
    # Tasks run as `nobody` in the venv executor, which must reach the state directory.
    d = Path(tempfile.mkdtemp(prefix="hivemind-runtask-", dir=state_root()))
    d.chmod(0o711)
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def run_task(task: Path, state_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cfg = state_dir / "cfg.yaml"
    cfg.write_text(f"node: {{state_dir: {state_dir}}}\nlogging: {{target: stderr}}\n")
    return subprocess.run([sys.executable, "-m", "hivemind", "run-task", str(task), "--config", str(cfg),
                           "--executor", "venv", *extra], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "HIVEMIND_SECRET_PROBE": "x"})


def test_run_task_directory_prints_output_and_writes_result(tmp_path: Path, state_dir: Path) -> None:
    task = tmp_path / "mytask"
    task.mkdir()
    (task / "main.py").write_text("print('hello author')\nopen('answer.txt','w').write('42')\n")
    r = run_task(task, state_dir)
    assert r.returncode == 0, r.stderr
    assert "hello author" in r.stdout
    result = tmp_path / "mytask.result.zip"
    with zipfile.ZipFile(result) as z:
        assert z.read("answer.txt") == b"42"
        assert json.loads(z.read("_hivemind/execution.json"))["exit_code"] == 0
    assert not list((state_dir / "run-task").iterdir())


def test_run_task_zip_failure_exit_code(tmp_path: Path, state_dir: Path) -> None:
    zpath = tmp_path / "bad.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("run.sh", "echo failing >&2; exit 7\n")
    r = run_task(zpath, state_dir)
    assert r.returncode == 1
    assert "failing" in r.stderr and "exit code 7" in r.stderr
    with zipfile.ZipFile(tmp_path / "bad.result.zip") as z:
        assert json.loads(z.read("_hivemind/execution.json"))["exit_code"] == 7


def test_run_task_rejects_a_zip_slip_archive(tmp_path: Path, state_dir: Path) -> None:
    zpath = tmp_path / "slip.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("../../evil.py", "print(1)")
    r = run_task(zpath, state_dir)
    assert r.returncode == 1
    with zipfile.ZipFile(tmp_path / "slip.result.zip") as z:
        record = json.loads(z.read("_hivemind/execution.json"))
    assert record["reason"] == "failed_to_start" and ".." in record["message"]
