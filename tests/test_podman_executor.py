"""PodmanExecutor against a real Podman service (rootful: cgroup v1 applies limits only there).

One private rootful service per module (its own socket, so no other test's service is touched);
every test gets a fresh node id, and a fixture checks that no container with that node's labels
is left behind and that no pip-cache lock remains.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from hivemind.config import PodmanConfig, RequirementsConfig
from hivemind.errors import TaskNotFound
from hivemind.executors.base import (
    Entry,
    Executor,
    ExitReason,
    Limits,
    OutputLine,
    PrepareCancelled,
    TaskSpec,
)
from hivemind.executors.podman import PodmanExecutor
from hivemind.executors.podman_service import PodmanService, ping

from pkgindex import make_wheel, serve_index

IMAGE = "localhost/hivemind-task:latest"
MiB = 1024 * 1024
LOG = logging.getLogger("test-podman")

pytestmark = [pytest.mark.podman]


def _have_image() -> bool:
    if shutil.which("podman") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["podman", "image", "exists", IMAGE]).returncode == 0


if not _have_image():
    pytest.skip("needs root, podman and the task image (images/build)", allow_module_level=True)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodmanService]:
    sock = tmp_path_factory.mktemp("podman") / "podman.sock"
    svc = PodmanService(PodmanConfig(mode="rootful"), LOG, rootful_socket=str(sock))
    svc.ensure()
    assert svc.owned
    yield svc
    svc.close()
    assert not ping(str(sock))


class Sink:
    def __init__(self) -> None:
        self.lines: list[OutputLine] = []
        self._cv = threading.Condition()

    def __call__(self, line: OutputLine) -> None:
        with self._cv:
            self.lines.append(line)
            self._cv.notify_all()

    def texts(self, stream: str | None = None) -> list[str]:
        return [ln.text for ln in self.lines if stream is None or ln.stream == stream]

    def wait_for(self, text: str, timeout: float = 30) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: text in self.texts(), timeout)


@pytest.fixture
def node() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def _our_containers(node: str) -> list[str]:
    out = subprocess.run(["podman", "ps", "-a", "--filter", f"label=hivemind.node_id={node}",
                          "--format", "{{.Names}}"], capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.fixture
def ex(service: PodmanService, node: str, tmp_path: Path) -> Iterator[PodmanExecutor]:
    executor = PodmanExecutor(PodmanConfig(mode="rootful", pids_limit=64), node,
                              tmp_path / "state", LOG, prepare_timeout_s=120, service=service)
    yield executor
    for task_id in executor.orphans():
        executor.stop(task_id, grace=0)
        executor.cleanup(task_id)
    executor.close()
    left = _our_containers(node)
    for name in left:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True)
    assert left == [], f"containers left behind: {left}"
    locks = list((tmp_path / "state").glob("podman-pycache/.*.lock"))
    assert locks == [], f"locks left behind: {locks}"


def _task(tmp_path: Path, code: str, task_id: str = "t1", **limits: object) -> TaskSpec:
    ws = tmp_path / f"ws-{task_id}"
    ws.mkdir()
    (ws / "main.py").write_text(code)
    lim = {"cpus": 1.0, "memory_bytes": 128 * MiB, **limits}
    return TaskSpec(task_id, ws, Entry(("python3", "main.py")), Limits(**lim))  # type: ignore[arg-type]


def test_implements_the_executor_protocol(ex: PodmanExecutor) -> None:
    assert isinstance(ex, Executor)


def test_probe_rootful_reports_applied_limits(ex: PodmanExecutor) -> None:
    st = ex.probe()
    assert st.usable, st.reason
    assert st.enforcement is not None
    assert (st.enforcement.memory, st.enforcement.cpu, st.enforcement.pids) == (True, True, True)
    assert st.enforcement.network_isolated and st.enforcement.readonly_root
    assert ex.orphans() == []          # the probe container is gone


def test_output_arrives_while_task_runs(ex: PodmanExecutor, tmp_path: Path) -> None:
    spec = _task(tmp_path, "import os, sys, time\n"
                 "print('first', flush=True)\nprint('to-stderr', file=sys.stderr, flush=True)\n"
                 "while not os.path.exists('go'): time.sleep(0.02)\nprint('second')\n")
    sink = Sink()
    handle = ex.start(spec, sink)
    assert handle.executor == "podman" and handle.task_id == "t1"
    assert sink.wait_for("first")
    assert ex.wait("t1", timeout=0) is None          # still running: the line came live
    (spec.workspace / "go").touch()
    res = ex.wait("t1", timeout=60)
    assert res is not None and res.reason == ExitReason.EXITED and res.exit_code == 0
    assert sink.texts("stdout") == ["first", "second"]
    assert sink.texts("stderr") == ["to-stderr"]
    assert res.peak_memory_bytes and res.peak_memory_bytes > 1024 * 1024   # rootful cgroup v1
    ex.cleanup("t1")
    ex.cleanup("t1")                                  # idempotent


def test_exit_codes_and_failed_start(ex: PodmanExecutor, tmp_path: Path) -> None:
    ex.start(_task(tmp_path, "raise SystemExit(3)"), Sink())
    res = ex.wait("t1", 60)
    assert res is not None and (res.reason, res.exit_code) == (ExitReason.EXITED, 3)
    bad = _task(tmp_path, "", task_id="t2")
    bad = TaskSpec(bad.task_id, bad.workspace, Entry(("/no/such/binary",)), bad.limits)
    ex.start(bad, Sink())
    res = ex.wait("t2", 60)
    assert res is not None and res.reason == ExitReason.FAILED_TO_START, res
    assert "entry point" in res.message


def test_a_task_that_closes_its_output_is_not_taken_for_ended(ex: PodmanExecutor,
                                                              tmp_path: Path) -> None:
    """The end of a task's output is only a hint that it exited (the exit is then seen by a
    quick inspect): a task that closes stdout and stderr and runs on is waited for."""
    spec = _task(tmp_path, "import os, time\nprint('bye', flush=True)\nos.close(1)\nos.close(2)\n"
                           "time.sleep(1.5)\nopen('/workspace/done', 'w').write('1')\n")
    sink = Sink()
    ex.start(spec, sink)
    res = ex.wait("t1", 60)
    assert res is not None and res.reason == ExitReason.EXITED and res.exit_code == 0, res
    assert (spec.workspace / "done").read_text() == "1"
    assert sink.texts() == ["bye"]
    assert res.finished_at is not None and res.started_at is not None
    assert res.finished_at - res.started_at >= 1.4


def test_memory_limit_ends_out_of_memory(ex: PodmanExecutor, tmp_path: Path) -> None:
    spec = _task(tmp_path, "b = []\nwhile True: b.append(bytearray(8 * 1024 * 1024))\n",
                 memory_bytes=64 * MiB)
    ex.start(spec, Sink())
    res = ex.wait("t1", 60)
    assert res is not None and res.reason == ExitReason.OUT_OF_MEMORY, res


def test_fork_bomb_is_contained_by_pids_limit(ex: PodmanExecutor, tmp_path: Path) -> None:
    spec = _task(tmp_path, "import os, time\nn = 0\ntry:\n    while True:\n"
                 "        if os.fork() == 0:\n            time.sleep(60)\n            os._exit(0)\n"
                 "        n += 1\nexcept OSError as e:\n    print('blocked', n, e.errno, flush=True)\n",
                 pids=32)
    sink = Sink()
    ex.start(spec, sink)
    res = ex.wait("t1", 60)
    assert res is not None and res.exit_code == 0, (res, sink.texts())
    blocked = [t for t in sink.texts() if t.startswith("blocked")]
    assert blocked, sink.texts()
    assert int(blocked[0].split()[1]) < 32


def test_no_network(ex: PodmanExecutor, tmp_path: Path) -> None:
    spec = _task(tmp_path, "import socket\ntry:\n"
                 "    socket.create_connection(('1.1.1.1', 53), timeout=3)\n    print('connected')\n"
                 "except OSError as e:\n    print('refused', e.errno)\n"
                 "print(sorted(n for _, n in socket.if_nameindex()))\n")
    sink = Sink()
    ex.start(spec, sink)
    res = ex.wait("t1", 60)
    assert res is not None and res.exit_code == 0
    assert sink.texts()[0].startswith("refused")
    assert sink.texts()[1] == "['lo']"


def test_writes_only_to_workspace_and_tmp(ex: PodmanExecutor, tmp_path: Path) -> None:
    spec = _task(tmp_path, "for p in ['/workspace/out.txt', '/tmp/x', '/etc/x', '/usr/x', '/x',"
                 " '/home/task/x']:\n    try:\n        open(p, 'w').write('1')\n"
                 "        print(p, 'ok')\n    except OSError as e:\n        print(p, 'denied')\n")
    sink = Sink()
    ex.start(spec, sink)
    res = ex.wait("t1", 60)
    assert res is not None and res.exit_code == 0
    assert sink.texts() == ["/workspace/out.txt ok", "/tmp/x ok", "/etc/x denied",  # noqa: S108
                            "/usr/x denied", "/x denied", "/home/task/x denied"]
    assert (spec.workspace / "out.txt").read_text() == "1"


def test_stop_mid_task(ex: PodmanExecutor, tmp_path: Path) -> None:
    sink = Sink()
    ex.start(_task(tmp_path, "import time\nprint('up', flush=True)\ntime.sleep(300)\n"), sink)
    assert sink.wait_for("up")
    ex.stop("t1", grace=1)
    res = ex.wait("t1", 0)                     # stop returns only once the task is dead
    assert res is not None and res.reason == ExitReason.STOPPED
    ex.stop("t1", grace=1)                     # idempotent


def test_timeout_is_enforced(ex: PodmanExecutor, tmp_path: Path) -> None:
    ex.start(_task(tmp_path, "import time\ntime.sleep(300)\n", timeout_s=1.0), Sink())
    res = ex.wait("t1", 60)
    assert res is not None and res.reason == ExitReason.TIMED_OUT


def test_recover_after_recreating_the_executor(ex: PodmanExecutor, service: PodmanService,
                                               node: str, tmp_path: Path) -> None:
    spec = _task(tmp_path, "import os, time\nprint('one', flush=True)\n"
                 "while not os.path.exists('go'): time.sleep(0.02)\nprint('two')\n"
                 "raise SystemExit(5)\n")
    sink = Sink()
    handle = ex.start(spec, sink)
    assert sink.wait_for("one")
    done = _task(tmp_path, "print('done')", task_id="t2")
    handle2 = ex.start(done, Sink())
    ex.wait("t2", 60)
    # A new daemon: a new executor on the same node id recovers from the persisted handles.
    ex2 = PodmanExecutor(PodmanConfig(mode="rootful"), node, tmp_path / "state", LOG, 60,
                         service=service)
    assert set(ex2.orphans()) == {"t1", "t2"}
    sink2 = Sink()
    ex2.recover(handle, sink2)
    (spec.workspace / "go").touch()
    res = ex2.wait("t1", 60)
    assert res is not None and (res.reason, res.exit_code) == (ExitReason.EXITED, 5)
    assert "two" in sink2.texts()
    ex2.recover(handle2, Sink())               # exited meanwhile: state collected
    res2 = ex2.wait("t2", 5)
    assert res2 is not None and res2.exit_code == 0
    ex2.cleanup("t1")
    ex2.cleanup("t2")
    with pytest.raises(TaskNotFound):
        ex2.recover(handle, Sink())            # gone
    ex2.close()


def test_recover_resumes_after_the_last_recorded_line(ex: PodmanExecutor, service: PodmanService,
                                                     node: str, tmp_path: Path) -> None:
    """The log can only be re-read from the container's start: lines the worker's log already
    holds (`resume`, per stream) are dropped, the rest arrive once, also those printed while no
    worker watched and those of a container that exited meanwhile (issue 15, item 4)."""
    code = ("import os, sys, time\n"
            "print('a1', flush=True); print('e1', file=sys.stderr, flush=True)\n"
            "print('a2', flush=True)\n"
            "while not os.path.exists('go'): time.sleep(0.02)\n"
            "print('a3', flush=True); print('e2', file=sys.stderr, flush=True)\n"
            "while not os.path.exists('end'): time.sleep(0.02)\n"
            "print('a4', flush=True)\n")
    spec = _task(tmp_path, code)
    sink = Sink()
    handle = ex.start(spec, sink)
    assert sink.wait_for("a2") and sink.wait_for("e1")
    seen = {ln.stream: ln.pos for ln in sink.lines}
    assert seen == {"stdout": 2, "stderr": 1}
    (spec.workspace / "go").touch()          # printed while "no worker" follows it
    assert sink.wait_for("e2")
    ex2 = PodmanExecutor(PodmanConfig(mode="rootful"), node, tmp_path / "state", LOG, 60,
                         service=service)
    sink2 = Sink()
    ex2.recover(handle, sink2, resume=seen)
    assert sink2.wait_for("e2")
    (spec.workspace / "end").touch()
    res = ex2.wait("t1", 60)
    assert res is not None and res.exit_code == 0
    assert sink2.texts("stdout") == ["a3", "a4"] and sink2.texts("stderr") == ["e2"]
    # Exited while no worker watched: the same resume collects exactly the unseen lines.
    ex3 = PodmanExecutor(PodmanConfig(mode="rootful"), node, tmp_path / "state", LOG, 60,
                         service=service)
    sink3 = Sink()
    ex3.recover(handle, sink3, resume={"stdout": 3, "stderr": 2})
    assert ex3.wait("t1", 30) is not None
    assert sink3.texts() == ["a4"] and sink3.lines[0].pos == 4
    ex3.cleanup("t1")
    ex2.close()
    ex3.close()


def test_a_service_left_by_a_killed_worker_is_adopted_then_stopped(tmp_path: Path) -> None:
    """Item 5: the worker that started the API service dies without close(); the next one (same
    state dir) adopts it and stops it on close. A recorded PID whose start time differs (reused)
    is never touched."""
    standard = tmp_path / "podman.sock"
    state = tmp_path / "state"
    first = PodmanService(PodmanConfig(mode="rootful"), LOG, rootful_socket=str(standard), state_dir=state)
    first.ensure()
    sock = Path(first.socket_path())
    # A service the worker starts has a socket of its own, never the standard one.
    assert sock != standard and sock.parent == standard.parent and not ping(str(standard))
    record = json.loads((state / "podman-service.json").read_text())
    pid = record["pid"]
    assert psutil.pid_exists(pid) and ping(str(sock))
    # (no first.close(): the worker was killed)
    second = PodmanService(PodmanConfig(mode="rootful"), LOG, rootful_socket=str(standard), state_dir=state)
    assert second.ensure() == f"unix://{sock}" and second.owned
    assert second._proc is None, "it must adopt, not start another"
    second.close()
    assert not ping(str(sock)) and not (state / "podman-service.json").exists()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    # A record naming a live process that isn't the service (PID reused): left alone.
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (state / "podman-service.json").write_text(json.dumps(
            {"pid": bystander.pid, "start_time": 1.0, "socket": str(sock)}))
        third = PodmanService(PodmanConfig(mode="rootful"), LOG, rootful_socket=str(standard),
                              state_dir=state)
        third.ensure()                      # starts its own
        assert bystander.poll() is None and third._proc is not None
        third.close()
    finally:
        bystander.kill()
        bystander.wait()


def test_orphans_never_include_unlabelled_containers(ex: PodmanExecutor, node: str) -> None:
    name = f"hivemind-{node}-foreign"
    subprocess.run(["podman", "create", "--name", name, IMAGE, "true"], check=True,
                   capture_output=True)
    try:
        assert ex.orphans() == []
        ex.cleanup("foreign")                  # same name pattern, but not ours: left alone
        assert subprocess.run(["podman", "container", "exists", name]).returncode == 0
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True)


def _requirements_task(tmp_path: Path, text: str, task_id: str) -> TaskSpec:
    spec = _task(tmp_path, "import hmsix\nprint('hmsix', hmsix.VERSION)\n", task_id=task_id)
    (spec.workspace / "requirements.txt").write_text(text)
    return TaskSpec(spec.task_id, spec.workspace, spec.entry, spec.limits,
                    requirements=spec.workspace / "requirements.txt")


@pytest.mark.slow
def test_requirements_installed_once_then_cached(service: PodmanService, node: str,
                                                 tmp_path: Path) -> None:
    wheels = tmp_path / "index"
    wheels.mkdir()
    make_wheel(wheels, "hmsix", "1.16.0", {"hmsix.py": "VERSION = '1.16.0'\n"})
    with serve_index(wheels) as index:
        ex = PodmanExecutor(PodmanConfig(mode="rootful"), node, tmp_path / "state", LOG, 120,
                            service=service, requirements=RequirementsConfig(index_url=index.url))
        try:
            spec = _requirements_task(tmp_path, "hmsix==1.16.0\n", "t1")
            prep = Sink()
            ex.prepare(spec, prep, threading.Event())
            assert any("hmsix" in t for t in prep.texts("prepare")), prep.texts()
            sink = Sink()
            ex.start(spec, sink)
            res = ex.wait("t1", 60)
            assert res is not None and res.exit_code == 0, sink.texts()
            assert sink.texts() == ["hmsix 1.16.0"]
            fetched = len(index.hits)
            again = _requirements_task(tmp_path, "hmsix==1.16.0\n", "t2")
            prep2 = Sink()
            ex.prepare(again, prep2, threading.Event())
            assert prep2.texts() == ["requirements already installed (cached)"]
            assert len(index.hits) == fetched          # no network the second time
        finally:
            for t in ("t1", "t2"):
                ex.cleanup(t)
            ex.close()


def test_cancel_during_pip_download_leaves_nothing_running(service: PodmanService, node: str,
                                                           tmp_path: Path) -> None:
    # An index on the host that accepts connections and never answers: pip hangs in it.
    srv = socket.create_server(("0.0.0.0", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def hold() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except TimeoutError:
                continue
            except OSError:      # the server socket was closed: the test is over
                return

    port = srv.getsockname()[1]
    ex = PodmanExecutor(PodmanConfig(mode="rootful"), node, tmp_path / "state", LOG, 120,
                        service=service,
                        requirements=RequirementsConfig(index_url=f"http://127.0.0.1:{port}/simple"))
    spec = _requirements_task(tmp_path, "six\n", "t1")
    cancel = threading.Event()
    prep = Sink()
    hold_thread = threading.Thread(target=hold, daemon=True)
    hold_thread.start()
    try:
        def cancel_once_pip_connects() -> None:
            _wait_until(lambda: bool(held), 30)
            cancel.set()

        threading.Thread(target=cancel_once_pip_connects, daemon=True).start()
        with pytest.raises(PrepareCancelled):
            ex.prepare(spec, prep, cancel)
        assert held, "pip never connected to the index"
    finally:
        stop.set()
        hold_thread.join(1)
        for c in held:
            c.close()
        srv.close()
    ex.close()
    assert _our_containers(node) == []
    assert not list((tmp_path / "state" / "podman-pycache").glob(".*tmp*"))
    assert not list((tmp_path / "state" / "podman-pycache").glob(".*wheels*"))


def _wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    ev = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if cond():
            return True
        ev.wait(0.05)
    return cond()


def _hivemind_user() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("hivemind")
    except KeyError:
        return None


@pytest.mark.skipif(_hivemind_user() is None, reason="scripts/setup-podman has not created the hivemind user")
def test_rootless_as_hivemind_user_reports_unenforced_limits(node: str) -> None:
    # The rootless service runs as `hivemind`: workspace and state must be reachable by it,
    # which pytest's 0700 tmp dir is not.
    base = Path(tempfile.mkdtemp(prefix="hivemind-rootless-test-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    ex = PodmanExecutor(PodmanConfig(mode="rootless"), node, base / "state", LOG, 60)
    try:
        st = ex.probe()
        assert st.usable, st.reason
        assert st.enforcement is not None
        assert (st.enforcement.memory, st.enforcement.cpu, st.enforcement.pids) == (False, False, False)
        assert any("memory limit not applied" in n for n in st.enforcement.notes)
        spec = _task(base, "open('/workspace/out.txt', 'w').write('r')\nprint('ok')\n")
        sink = Sink()
        ex.start(spec, sink)
        res = ex.wait("t1", 60)
        assert res is not None and res.exit_code == 0, sink.texts()
        assert (spec.workspace / "out.txt").read_text() == "r"
        ex.cleanup("t1")
        assert ex.orphans() == []
        sock = ex._service.socket_path()
    finally:
        ex.close()
        shutil.rmtree(base, ignore_errors=True)
    assert not ping(sock)                      # the service it started is gone
