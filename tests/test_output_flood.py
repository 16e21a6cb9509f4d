"""Output kept once and bounded, on real executors (issue 14): a task printing 2 GiB leaves at
most the cap (plus a small constant) of output on disk, the worker's own log doesn't grow with
it, and a 256 MiB line without a newline streams through in pieces.

Each task runs through a real TaskRunner and executor (venv; Podman rootful when this machine
has it). Disk use is sampled while the task runs: the task's output files' allocated blocks
(the venv executor's stdout/stderr files, Podman's container log) plus output.log.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hivemind.archive import ArchiveRules
from hivemind.config import PodmanConfig, VenvConfig
from hivemind.devpool.testing import task_zip
from hivemind.executors.base import Executor, ExitReason, Limits, OutputLine
from hivemind.logging_setup import log_task_output, setup_logging
from hivemind.output import TaskOutput
from hivemind.runner import RunnerPaths, RunnerResult, TaskRunner

from statedir import state_root

MiB = 1024 * 1024
GiB = 1024 * MiB
CAP = 8 * MiB
# What the writer gets ahead of its reader: the venv executor's reader punches out what it read
# and everything past the cap as soon as it sees it, so this is write speed x scheduling delay
# (not a hard bound; measured 25 MiB on a loaded 2-core VM); Podman's conmon log is truncated at
# the cap. Either way far below the 2 GiB the task writes (before: 2 GiB log + 2 GiB files).
SLACK = 64 * MiB
IMAGE = "localhost/hivemind-task:latest"
LOG = logging.getLogger("test.output_flood")

FLOOD = ('line=$(head -c 4000 /dev/zero | tr "\\0" x)\n'
         'yes "$line" | head -c 2147483648\necho flood-done >&2\n')
LONG_LINE = ('head -c 268435456 /dev/zero | tr "\\0" y\necho\necho after-the-line >&2\n')
QUIET = 'echo one line\n'


def _podman_usable() -> bool:
    if shutil.which("podman") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["podman", "image", "exists", IMAGE]).returncode == 0


@pytest.fixture(scope="module")
def state() -> Iterator[Path]:
    # Under the shared state root: the venv task user and rootless Podman's user reach it.
    d = Path(tempfile.mkdtemp(prefix="hm-flood-", dir=state_root()))
    d.chmod(0o755)   # the venv task user must reach its workspace
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _hivemind_user() -> bool:
    import pwd

    try:
        pwd.getpwnam("hivemind")
        return True
    except KeyError:
        return False


@pytest.fixture(scope="module", params=["venv", "podman", "podman-rootless"])
def executor(request: pytest.FixtureRequest, state: Path) -> Iterator[Executor]:
    node = f"flood-{uuid.uuid4().hex[:8]}"
    if request.param == "venv":
        from hivemind.executors.venv import VenvExecutor

        cache = state / "venvs"
        cache.mkdir()
        cache.chmod(0o755)
        yield VenvExecutor(VenvConfig(cache_dir=str(cache)), state / "venv-state", LOG, node)
        return
    if not _podman_usable():
        pytest.skip("needs root, podman and the task image (images/build)")
    from hivemind.executors.podman import PodmanExecutor
    from hivemind.executors.podman_service import PodmanService

    if request.param == "podman-rootless":
        if not _hivemind_user():
            pytest.skip("scripts/setup-podman has not created the hivemind user")
        rootless = PodmanExecutor(PodmanConfig(mode="rootless"), node, state / "rootless-state",
                                  LOG, 60)
        try:
            yield rootless
        finally:
            rootless.close()
        return
    sock_dir = Path(tempfile.mkdtemp(prefix="hm-flood-podman-"))
    svc = PodmanService(PodmanConfig(mode="rootful"), LOG, rootful_socket=str(sock_dir / "p.sock"))
    svc.ensure()
    ex = PodmanExecutor(PodmanConfig(mode="rootful"), node, state / "podman-state", LOG,
                        prepare_timeout_s=120, service=svc)
    try:
        yield ex
    finally:
        ex.close()
        svc.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def _allocated(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def _container_log(name: str, rootless: bool) -> Path | None:
    argv = ["podman", "inspect", "--format", "{{.HostConfig.LogConfig.Path}}", name]
    if rootless:   # the container belongs to the hivemind user's Podman
        import pwd

        pw = pwd.getpwnam("hivemind")
        argv = ["runuser", "-u", "hivemind", "--", "env", f"HOME={pw.pw_dir}",
                f"XDG_RUNTIME_DIR=/run/user/{pw.pw_uid}", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, cwd="/")
    path = out.stdout.strip()
    return Path(path) if out.returncode == 0 and path else None


class DiskSampler(threading.Thread):
    """The largest disk use seen of the task's output files while it runs."""

    def __init__(self, files: Callable[[], list[Path]]) -> None:
        super().__init__(daemon=True)
        self._files = files
        self.stop_event = threading.Event()
        self.peak = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.peak = max(self.peak, sum(_allocated(p) for p in self._files()))
            self.stop_event.wait(0.005)


def run_task(executor: Executor, base: Path, script: str) -> tuple[RunnerResult, int, TaskOutput]:
    task_id = f"flood-{uuid.uuid4().hex[:8]}"
    task_dir = base / task_id
    task_dir.mkdir(parents=True)
    task_dir.chmod(0o755)
    paths = RunnerPaths(task_dir / "workspace", task_dir / "output.log", task_dir / "result.zip")
    task_log = logging.getLogger("hivemind.task")

    def journal(tid: str, line: OutputLine) -> None:   # what the daemon does with each line
        if line.stream in ("stdout", "stderr"):
            log_task_output(task_log, tid, line.stream, line.text)

    output = TaskOutput(task_id, paths.output_log, journal, max_bytes=CAP)
    results: list[RunnerResult] = []
    container_log: list[Path] = []

    def files() -> list[Path]:
        found = [paths.output_log]
        if executor.name == "venv":
            log_dir = base.parent / "venv-state" / "venv-tasks" / task_id
            found += [log_dir / "stdout.log", log_dir / "stderr.log"]
        else:
            if not container_log:
                from hivemind.executors.container_spec import container_name

                log_path = _container_log(container_name(executor._node, task_id),  # type: ignore[attr-defined]
                                          bool(getattr(executor, "rootless", False)))
                if log_path is not None:
                    container_log.append(log_path)
            found += container_log
        return found

    runner = TaskRunner(
        task_id, executor=executor, paths=paths, archive=task_zip({"run.sh": script}),
        limits=Limits(cpus=1.0, memory_bytes=512 * MiB, timeout_s=600, output_bytes=CAP),
        labels={}, node_id="flood", rules=ArchiveRules(64 * MiB, 100, 64 * MiB, 200),
        max_result_bytes=64 * MiB, stop_grace_s=1, task_timeout_s=600, output=output,
        advance=lambda tid, st: None, started=lambda h: None, finished=results.append,
        logger=logging.getLogger("hivemind.runner"), accepted_at=time.time())
    sampler = DiskSampler(files)
    sampler.start()
    runner.start()
    assert runner.join(600), "the task did not finish"
    sampler.stop_event.set()
    sampler.join()
    (result,) = results
    return result, sampler.peak, output


@pytest.fixture
def worker_log() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buf = io.StringIO()
    setup_logging("info", "stderr", "flood-node", stream=buf)
    yield buf
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)
    root.setLevel(level)


def test_a_2_gib_flood_keeps_one_capped_copy(executor: Executor, state: Path,
                                             worker_log: io.StringIO) -> None:
    base = state / "tasks"
    quiet, _, _ = run_task(executor, base, QUIET)
    assert quiet.exit.reason is ExitReason.EXITED, quiet.record
    quiet_lines = worker_log.getvalue().count("\n")
    mark = len(worker_log.getvalue())
    result, peak, output = run_task(executor, base, FLOOD)
    print(f"{executor.name}: 2 GiB flood, peak output disk use {peak / MiB:.1f} MiB "
          f"(cap {CAP // MiB} MiB)")
    assert result.exit.reason is ExitReason.EXITED and result.exit.exit_code == 0, result.record
    assert peak <= CAP + SLACK
    summary = result.record["output"]
    assert summary["truncated"] is True and summary["bytes"] <= CAP
    # `head -c 2G` exited 0 and the task's last line came after it: the flood was written.
    assert summary["dropped_lines"] > 0
    with zipfile.ZipFile(result.result_zip) as zf:
        log = zf.read("_hivemind/output.log")
    assert len(log) <= CAP and b"output truncated" in log
    # The worker's own log: the same few lines a one-line task gets, no output lines.
    flood_lines = worker_log.getvalue()[mark:].count("\n")
    assert flood_lines <= quiet_lines + 2, worker_log.getvalue()[mark:][-2000:]
    assert "xxxxxxxxxx" not in worker_log.getvalue()
    # (stdout and stderr are separate pipes: their order is not kept exactly.)
    assert any("flood-done" in line for line in output.tail(50))


def test_a_256_mib_line_streams_in_pieces(executor: Executor, state: Path,
                                          worker_log: io.StringIO) -> None:
    result, peak, output = run_task(executor, state / "tasks", LONG_LINE)
    assert result.exit.reason is ExitReason.EXITED and result.exit.exit_code == 0, result.record
    assert peak <= CAP + SLACK
    assert result.record["output"]["truncated"] is True
    # The line came through, cut, and the task's line after it arrived too.
    assert any(line.endswith("after-the-line") for line in output.tail(50))
    if executor.name == "podman":    # every piece went through (the venv reader skips past the cap)
        assert output.lines > 256 * MiB // 8192
