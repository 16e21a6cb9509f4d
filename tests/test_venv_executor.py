"""VenvExecutor against real processes: output, exit codes, stop, timeout, users, recovery."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from hivemind.config import VenvConfig
from hivemind.errors import TaskNotFound
from hivemind.executors.base import (
    Entry,
    Executor,
    ExitReason,
    Limits,
    OutputLine,
    TaskHandle,
    TaskSpec,
)
from hivemind.executors.proc import group_members
from hivemind.executors.venv import MARKER_ENV, VenvExecutor

LOG = logging.getLogger("test.venv_executor")
IS_ROOT = os.geteuid() == 0
WAIT = 20.0  # generous bound for waits; never asserted as a duration


@pytest.fixture(scope="module")
def cache_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hm-venvcache-"))
    d.chmod(0o755)   # the task user must reach the venv's python
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def base() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hm-venvexec-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    yield
    left = [p for p in psutil.process_iter(["pid"]) if _is_test_task(p)]
    for p in left:
        p.kill()
    assert left == [], "a task process outlived its test"


def _is_test_task(p: psutil.Process) -> bool:
    try:
        return (p.status() != psutil.STATUS_ZOMBIE
                and p.environ().get(MARKER_ENV, "").startswith("hmtest-"))
    except psutil.Error:
        return False


def host_pid(task_id: str, ns_pid: int) -> int:
    """The host pid of a task process that printed `ns_pid` from inside its PID namespace."""
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get(MARKER_ENV) != task_id:
                continue
            nspid = Path(f"/proc/{p.pid}/status").read_text().split("NSpid:")[1].split("\n")[0].split()
        except (psutil.Error, OSError, IndexError):
            continue
        if int(nspid[-1]) == ns_pid:
            return p.pid
    raise AssertionError(f"no process of {task_id} has pid {ns_pid} in its namespace")


def marked(task_id: str) -> list[int]:
    return [p.pid for p in psutil.process_iter(["pid"]) if _is_test_task(p)
            and p.environ().get(MARKER_ENV) == task_id]


def make_executor(base: Path, cache_dir: Path, **kw: float) -> VenvExecutor:
    cfg = VenvConfig(cache_dir=str(cache_dir))
    return VenvExecutor(cfg, base / "state", LOG, "node-1", **kw)  # type: ignore[arg-type]


class Sink:
    def __init__(self) -> None:
        self.lines: list[OutputLine] = []
        self.cond = threading.Condition()

    def __call__(self, line: OutputLine) -> None:
        with self.cond:
            self.lines.append(line)
            self.cond.notify_all()

    def texts(self, stream: str | None = None) -> list[str]:
        with self.cond:
            return [x.text for x in self.lines if stream is None or x.stream == stream]

    def wait_for(self, text: str, timeout: float = WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: any(text == x.text for x in self.lines), timeout)


_counter = iter(range(10**6))


def spec_for(base: Path, script: str, *, timeout_s: float = 60, memory: int = 1 << 30,
             network: bool = False, env: dict[str, str] | None = None,
             argv: tuple[str, ...] = ("bash", "run.sh")) -> TaskSpec:
    task_id = f"hmtest-{os.getpid()}-{next(_counter)}"
    ws = base / "tasks" / task_id
    ws.mkdir(parents=True)
    (base / "tasks").chmod(0o755)
    (ws / "run.sh").write_text(script)
    return TaskSpec(task_id=task_id, workspace=ws, entry=Entry(argv),
                    limits=Limits(cpus=1, memory_bytes=memory, timeout_s=timeout_s, network=network),
                    env=env or {})


def run_task(ex: VenvExecutor, spec: TaskSpec, sink: Sink | None = None) -> tuple[Sink, object]:
    sink = sink or Sink()
    ex.prepare(spec, sink, threading.Event())
    ex.start(spec, sink)
    result = ex.wait(spec.task_id, WAIT)
    assert result is not None
    ex.cleanup(spec.task_id)
    return sink, result


def test_is_an_executor_and_probe_reports(base: Path, cache_dir: Path) -> None:
    ex = make_executor(base, cache_dir)
    assert isinstance(ex, Executor)
    st = ex.probe()
    assert st.usable, st.reason
    assert st.enforcement is not None
    assert st.enforcement.isolation == "process"
    assert not st.enforcement.cpu
    assert st.enforcement.readonly_root == IS_ROOT      # root mount read-only in its namespace
    assert any("RLIMIT_AS" in n for n in st.enforcement.notes)
    assert st.enforcement.network_isolated == IS_ROOT


def test_output_arrives_while_the_task_runs(base: Path, cache_dir: Path) -> None:
    ex = make_executor(base, cache_dir)
    # The task blocks after its first line until the test has received that line.
    spec = spec_for(base, "echo first\necho oops >&2\nwhile [ ! -e go ]; do sleep 0.01; done\n"
                          "printf 'é%.0s' $(seq 6000); echo\necho second\n")
    sink = Sink()
    ex.prepare(spec, sink, threading.Event())
    ex.start(spec, sink)
    assert sink.wait_for("first")
    assert ex.wait(spec.task_id, 0.05) is None            # still running
    assert "second" not in sink.texts()
    (spec.workspace / "go").touch()
    result = ex.wait(spec.task_id, WAIT)
    assert result is not None and result.reason == ExitReason.EXITED and result.exit_code == 0
    out = sink.texts("stdout")
    assert out[0] == "first" and out[-1] == "second"
    long_pieces = out[1:-1]
    assert "".join(long_pieces) == "é" * 6000            # 12000 bytes, cut below 8 KiB
    assert len(long_pieces) == 2 and all(len(p.encode()) <= 8192 for p in long_pieces)
    assert sink.texts("stderr") == ["oops"]
    assert result.peak_memory_bytes and result.cpu_seconds is not None
    ex.cleanup(spec.task_id)
    assert not (base / "state" / "venv-tasks" / spec.task_id).exists()
    assert spec.workspace.exists()                        # cleanup never touches the workspace


@pytest.mark.parametrize("code", [0, 3])
def test_exit_codes(base: Path, cache_dir: Path, code: int) -> None:
    _, result = run_task(make_executor(base, cache_dir), spec_for(base, f"exit {code}\n"))
    assert result.exit_code == code and result.reason == ExitReason.EXITED  # type: ignore[attr-defined]


def test_python_entry_uses_the_venv(base: Path, cache_dir: Path) -> None:
    ex = make_executor(base, cache_dir)
    spec = spec_for(base, "", argv=("python", "main.py"))
    (spec.workspace / "main.py").write_text("import sys; print(sys.prefix)\n")
    sink, result = run_task(ex, spec)
    assert result.exit_code == 0  # type: ignore[attr-defined]
    assert sink.texts("stdout") == [str(ex.cache.lookup(None))]


def test_stop_kills_background_and_escaped_children(base: Path, cache_dir: Path) -> None:
    ex = make_executor(base, cache_dir)
    spec = spec_for(base, "trap '' TERM\nsleep 1000 & echo $! > bg.pid\n"
                          "setsid sh -c 'echo $$ > escaped.tmp; mv escaped.tmp escaped.pid; exec sleep 1001' &\n"
                          "while [ ! -e escaped.pid ]; do sleep 0.01; done\necho started\nwait\n")
    sink = Sink()
    ex.prepare(spec, sink, threading.Event())
    handle = ex.start(spec, sink)
    assert sink.wait_for("started")
    pgid = handle.state["pgid"]
    bg = host_pid(spec.task_id, int((spec.workspace / "bg.pid").read_text()))
    escaped = host_pid(spec.task_id, int((spec.workspace / "escaped.pid").read_text()))
    assert psutil.pid_exists(bg) and psutil.pid_exists(escaped)
    assert os.getpgid(escaped) != pgid                    # really left the group
    usage = ex.stats(spec.task_id)
    assert usage is not None and usage.pids is not None and usage.pids >= 2
    ex.stop(spec.task_id, grace=0.2)                     # run.sh ignores TERM: needs KILL
    result = ex.wait(spec.task_id, 0)
    assert result is not None and result.reason == ExitReason.STOPPED
    assert group_members(pgid) == []
    for pid in (bg, escaped):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    ex.stop(spec.task_id, grace=0.2)                     # idempotent
    ex.cleanup(spec.task_id)
    ex.cleanup(spec.task_id)


def test_main_exit_kills_leftover_background_processes(base: Path, cache_dir: Path) -> None:
    spec = spec_for(base, "sleep 1000 & echo $! > bg.pid\nexit 0\n")
    _, result = run_task(make_executor(base, cache_dir), spec)
    assert (spec.workspace / "bg.pid").read_text().strip()
    assert result.reason == ExitReason.EXITED  # type: ignore[attr-defined]
    assert marked(spec.task_id) == []


def test_timeout(base: Path, cache_dir: Path) -> None:
    ex = make_executor(base, cache_dir, stop_grace_s=0.2)
    spec = spec_for(base, "echo started\nsleep 1000\n", timeout_s=0.3)
    _, result = run_task(ex, spec)
    assert result.reason == ExitReason.TIMED_OUT  # type: ignore[attr-defined]


def test_memory_limit_reports_out_of_memory(base: Path, cache_dir: Path) -> None:
    spec = spec_for(base, "", argv=("python", "-c", "x = bytearray(400 * 2**20)"),
                    memory=200 * 2**20)
    sink, result = run_task(make_executor(base, cache_dir), spec)
    assert result.reason == ExitReason.OUT_OF_MEMORY, sink.texts()  # type: ignore[attr-defined]
    assert any("MemoryError" in t for t in sink.texts("stderr"))


def test_environment_is_scrubbed(base: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVEMIND_TEST_SECRET", "s3cr3t-value")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/x")
    spec = spec_for(base, "env\n", env={"TASK_VAR": "1"})
    sink, result = run_task(make_executor(base, cache_dir), spec)
    env = dict(t.split("=", 1) for t in sink.texts("stdout") if "=" in t)
    assert "s3cr3t-value" not in "\n".join(sink.texts())
    assert not {"HIVEMIND_TEST_SECRET", "NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY"} & env.keys()
    assert env["HOME"] == str(spec.workspace) and env["LANG"] == "C.UTF-8"
    assert env["PYTHONUNBUFFERED"] == "1" and env["TASK_VAR"] == "1"
    assert env["PATH"].endswith("/bin:/usr/bin:/bin")


@pytest.mark.skipif(not IS_ROOT, reason="needs a root worker (user switch and netns)")
def test_runs_unprivileged_and_without_network(base: Path, cache_dir: Path) -> None:
    spec = spec_for(base, "id -u\necho x > out.txt && echo wrote\ntouch /etc/hm-test 2>/dev/null || echo no-etc\n"
                          "ls /root >/dev/null 2>&1 || echo no-root\ncat /proc/net/dev | tail -n +3 | cut -d: -f1\n"
                          "ulimit -n\ngrep NoNewPrivs /proc/self/status\n")
    sink, result = run_task(make_executor(base, cache_dir), spec)
    out = [t.strip() for t in sink.texts("stdout")]
    assert result.exit_code == 0  # type: ignore[attr-defined]
    assert int(out[0]) >= VenvConfig().uid_range_start          # a uid of its own, not nobody
    assert out[1:4] == ["wrote", "no-etc", "no-root"]
    assert out[4:6] == ["lo", "1024"]                   # only loopback in the namespace
    assert out[6].split() == ["NoNewPrivs:", "1"]
    assert not Path("/etc/hm-test").exists()


def test_failed_to_start(base: Path, cache_dir: Path) -> None:
    ex = make_executor(base, cache_dir)
    spec = spec_for(base, "", argv=("no-such-program-hm",))
    ex.prepare(spec, Sink(), threading.Event())
    handle = ex.start(spec, Sink())
    result = ex.wait(spec.task_id, WAIT)
    assert result is not None and result.reason == ExitReason.FAILED_TO_START
    assert "not found" in result.message
    with pytest.raises(TaskNotFound):
        make_executor(base, cache_dir).recover(handle, Sink())
    ex.cleanup(spec.task_id)


_DAEMON = """
import json, logging, sys, threading
from pathlib import Path
from hivemind.config import VenvConfig
from hivemind.executors.base import Entry, Limits, TaskSpec
from hivemind.executors.venv import VenvExecutor
base, cache, task_id, ws = sys.argv[1:5]
ex = VenvExecutor(VenvConfig(cache_dir=cache), Path(base) / "state", logging.getLogger(), "n")
spec = TaskSpec(task_id, Path(ws), Entry(("bash", "run.sh")), Limits(cpus=1, memory_bytes=1 << 30))
ex.prepare(spec, lambda line: None, threading.Event())
h = ex.start(spec, lambda line: None)
print(json.dumps({"version": h.version, "task_id": h.task_id, "executor": h.executor, "state": dict(h.state)}))
"""


def test_recover_after_daemon_restart(base: Path, cache_dir: Path) -> None:
    """Daemon A (a separate process) starts the task and exits; executor B reattaches."""
    spec = spec_for(base, "echo one\nwhile [ ! -e go ]; do sleep 0.01; done\necho two\nexit 5\n")
    out = subprocess.run([sys.executable, "-c", _DAEMON, str(base), str(cache_dir), spec.task_id,
                          str(spec.workspace)], capture_output=True, text=True, timeout=60, check=True)
    raw = json.loads(out.stdout.strip().splitlines()[-1])
    handle = TaskHandle(**raw)
    ex = make_executor(base, cache_dir)
    assert spec.task_id in ex.orphans()
    sink = Sink()
    ex.recover(handle, sink)
    assert ex.wait(spec.task_id, 0.05) is None
    (spec.workspace / "go").touch()
    assert sink.wait_for("two")                          # the log is tailed again
    result = ex.wait(spec.task_id, WAIT)
    assert result is not None and result.reason == ExitReason.EXITED and result.exit_code == 5
    # A saved how far it had read: "one" comes again only if A hadn't sent it yet.
    assert sink.texts("stdout") in (["one", "two"], ["two"])
    assert ex.orphans() == []
    ex.cleanup(spec.task_id)
    with pytest.raises(TaskNotFound):
        make_executor(base, cache_dir).recover(handle, Sink())


def test_recover_resumes_exactly_after_the_sinks_last_line(base: Path, cache_dir: Path) -> None:
    """The worker's own log is the record (`resume`): its offset files are saved about once a
    second and would repeat lines; each line's pos is the byte offset just past it."""
    spec = spec_for(base, "echo one\necho two\nwhile [ ! -e go ]; do sleep 0.01; done\necho three\n")
    ex = make_executor(base, cache_dir)
    ex.prepare(spec, lambda line: None, threading.Event())
    sink = Sink()
    handle = ex.start(spec, sink)
    assert sink.wait_for("two")
    assert [(ln.text, ln.pos) for ln in sink.lines] == [("one", 4), ("two", 8)]
    for tailer in ex._get(spec.task_id).tailers:   # daemon A stops reading (it died)
        tailer.finish()
    ex2 = make_executor(base, cache_dir)
    sink2 = Sink()
    ex2.recover(handle, sink2, resume={"stdout": sink.lines[-1].pos})
    (spec.workspace / "go").touch()
    result = ex2.wait(spec.task_id, WAIT)
    assert result is not None and result.exit_code == 0
    assert sink2.texts("stdout") == ["three"] and sink2.lines[0].pos == 14
    ex2.cleanup(spec.task_id)
    ex.cleanup(spec.task_id)


def test_recover_then_stop(base: Path, cache_dir: Path) -> None:
    spec = spec_for(base, "sleep 1000 &\nwhile [ ! -e go ]; do sleep 0.01; done\necho up\nwait\n")
    out = subprocess.run([sys.executable, "-c", _DAEMON, str(base), str(cache_dir), spec.task_id,
                          str(spec.workspace)], capture_output=True, text=True, timeout=60, check=True)
    handle = TaskHandle(**json.loads(out.stdout.strip().splitlines()[-1]))
    ex = make_executor(base, cache_dir)
    sink = Sink()
    ex.recover(handle, sink)
    (spec.workspace / "go").touch()
    assert sink.wait_for("up")
    ex.stop(spec.task_id, grace=1)
    result = ex.wait(spec.task_id, 0)
    assert result is not None and result.reason == ExitReason.STOPPED
    assert group_members(handle.state["pgid"]) == []
    ex.cleanup(spec.task_id)


def test_unknown_task_raises(base: Path, cache_dir: Path) -> None:
    ex = make_executor(base, cache_dir)
    with pytest.raises(TaskNotFound):
        ex.wait("hmtest-nope")
    assert ex.stats("hmtest-nope") is None
    ex.cleanup("hmtest-nope")                             # idempotent, no error
