"""Startup errors end in one clear message and the documented exit code, never a traceback.

Three classes, each through the real command line of every command that can meet it:
configuration (2), environment (2: a state directory that can't be created), executor (3: the
Podman probe finds no task image). The executor class needs Podman (the probe is real)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "hivemind"]
SAMPLE = ROOT / "hivemind" / "samples" / "hello"
needs_podman = pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.run(CLI + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _assert_clean_failure(res: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == code, out
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, out


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "a-file").write_text("")
    (tmp_path / "pw").write_text("secret-pool-password\n")
    base = ("logging: {target: stderr}\n"
            f"pool: {{password_file: {tmp_path / 'pw'}}}\n"
            "server: {port: 0, listen_host: 127.0.0.1, auth: {mode: legacy, legacy_allowed_peers: [127.0.0.1]}}\n"
            "status: {port: 0}\n")
    out = {
        "bad_key": tmp_path / "bad-key.yaml",
        "bad_state": tmp_path / "bad-state.yaml",
        "no_image": tmp_path / "no-image.yaml",
        "dir": tmp_path,
    }
    out["bad_key"].write_text("executor: {slots: 2, kind: podmann}\nnode: {stat_dir: /x}\n")
    out["bad_state"].write_text(base + f"node: {{state_dir: {tmp_path / 'a-file' / 'state'}}}\n")
    out["no_image"].write_text(base + f"node: {{state_dir: {tmp_path / 'state'}}}\n"
                               "executor: {kind: podman, podman: {image: localhost/hivemind-no-such-image:0}}\n")
    return out


# -- configuration ---------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["check-config"], ["run"], ["run-task", str(SAMPLE)]])
def test_config_error(files: dict[str, Path], command: list[str]) -> None:
    res = _run(command + ["--config", str(files["bad_key"])], files["dir"])
    _assert_clean_failure(res, 2, "executor.kind: 'podmann' is not allowed", "node.stat_dir: unknown key")


def test_config_error_dev(files: dict[str, Path]) -> None:
    res = _run(["dev", "--config", str(files["bad_key"]), "--state-dir", str(files["dir"] / "dev"),
                "--pool-listen", "127.0.0.1:0", "--worker-port", "0", "--status-port", "0"], files["dir"])
    _assert_clean_failure(res, 2, "executor.kind: 'podmann' is not allowed")


def test_missing_config_file(files: dict[str, Path]) -> None:
    res = _run(["run", "--config", str(files["dir"] / "absent.yaml")], files["dir"])
    _assert_clean_failure(res, 2, "does not exist")


# -- environment -----------------------------------------------------------------------------------

def test_environment_error_run(files: dict[str, Path]) -> None:
    res = _run(["run", "--config", str(files["bad_state"])], files["dir"])
    _assert_clean_failure(res, 2, "Not a directory", str(files["dir"] / "a-file"))


def test_environment_error_run_task(files: dict[str, Path]) -> None:
    res = _run(["run-task", str(SAMPLE), "--executor", "venv", "--config", str(files["bad_state"])], files["dir"])
    _assert_clean_failure(res, 2, "node.state_dir", "Not a directory")


def test_environment_error_dev(files: dict[str, Path]) -> None:
    res = _run(["dev", "--state-dir", str(files["dir"] / "a-file" / "state"), "--executor", "venv",
                "--pool-listen", "127.0.0.1:0", "--worker-port", "0", "--status-port", "0"], files["dir"])
    _assert_clean_failure(res, 2, "--state-dir", "Not a directory")


@needs_podman
@pytest.mark.podman
def test_environment_error_port_taken(files: dict[str, Path]) -> None:
    import socket
    import tempfile

    state = Path(tempfile.mkdtemp(prefix="hivemind-startup-", dir="/var/tmp"))
    with socket.socket() as taken, contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, state, ignore_errors=True)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = files["dir"] / "port.yaml"
        cfg.write_text(files["bad_state"].read_text().replace(str(files["dir"] / "a-file" / "state"), str(state))
                       .replace("status: {port: 0}", f"status: {{port: {port}}}"))
        res = _run(["run", "--config", str(cfg)], files["dir"])
    _assert_clean_failure(res, 2, f"status.listen_host/port: can't listen on 127.0.0.1:{port}")


# -- executor --------------------------------------------------------------------------------------

@needs_podman
@pytest.mark.podman
@pytest.mark.parametrize("command", [["run"], ["run-task", str(SAMPLE), "--executor", "podman"]])
def test_executor_error(files: dict[str, Path], command: list[str]) -> None:
    res = _run(command + ["--config", str(files["no_image"])], files["dir"])
    _assert_clean_failure(res, 3, "hivemind-no-such-image")


@needs_podman
@pytest.mark.podman
def test_executor_error_dev(files: dict[str, Path]) -> None:
    res = _run(["dev", "--config", str(files["no_image"]), "--executor", "podman",
                "--state-dir", str(files["dir"] / "dev"),
                "--pool-listen", "127.0.0.1:0", "--worker-port", "0", "--status-port", "0"], files["dir"])
    _assert_clean_failure(res, 3, "Podman is unusable", "hivemind-no-such-image")


def test_secret_never_in_startup_errors(files: dict[str, Path]) -> None:
    for name in ("bad_state", "bad_key"):
        res = _run(["run", "--config", str(files[name])], files["dir"])
        assert "secret-pool-password" not in res.stdout + res.stderr
