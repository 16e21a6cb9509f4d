"""Run-step attacks on the venv executor: tasks reaching each other, outliving their end,
leaving files in shared temp dirs, seeing the host's processes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from sandboxes import Lines, make_executor, open_dir

from hivemind.executors.base import Entry, ExitReason, Limits, TaskSpec
from hivemind.executors.venv import MARKER_ENV

pytestmark = pytest.mark.slow
MiB = 1024 * 1024


@pytest.fixture
def base() -> Iterator[Path]:
    d = open_dir("hm-sec-venv-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _spec(base: Path, main: str, timeout_s: float = 120) -> TaskSpec:
    task_id = f"sec-{uuid.uuid4().hex[:8]}"
    ws = base / "ws" / task_id
    ws.mkdir(parents=True)
    (ws / "main.py").write_text(main)
    return TaskSpec(task_id, ws, Entry(("python", "main.py")),
                    Limits(cpus=1.0, memory_bytes=1024 * MiB, timeout_s=timeout_s))


def _task_pids(task_id: str) -> list[int]:
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            cmd = p.cmdline()
            if (p.environ().get(MARKER_ENV) == task_id and cmd[1:2] == ["main.py"]
                    and Path(cmd[0]).name.startswith("python")):
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


# Reads, rewrites, signals and ptraces another task; prints what worked.
NEIGHBOUR = r'''
import ctypes, json, os, signal, sys
ws, pid, sig = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "worked"
    except Exception as exc:
        out[name] = "failed: %s" % type(exc).__name__
attempt("list workspace", lambda: os.listdir(ws))
attempt("read secret", lambda: open(os.path.join(ws, "secret.txt")).read())
attempt("rewrite result", lambda: open(os.path.join(ws, "result.txt"), "w").write("tampered"))
attempt("signal", lambda: os.kill(pid, sig))
attempt("read its memory map", lambda: open("/proc/%d/maps" % pid).read())
def ptrace():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(16, pid, None, None) != 0:   # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), "ptrace")
    libc.ptrace(17, pid, None, None)            # PTRACE_DETACH
if sig:
    attempt("ptrace", ptrace)
print("NEIGHBOUR " + json.dumps(out), flush=True)
'''


def _neighbour_result(lines: list[str]) -> dict[str, str]:
    for line in lines:
        if line.startswith("NEIGHBOUR "):
            return dict(json.loads(line[len("NEIGHBOUR "):]))
    raise AssertionError(f"no result from the attacking task: {lines}")


def test_concurrent_tasks_read_write_signal_ptrace_each_other(base: Path) -> None:
    """a venv task reading, rewriting, signalling (SIGSTOP) and ptracing another running venv task"""
    with make_executor("venv", base) as ex:
        victim = _spec(base, "import os, time\nopen('secret.txt', 'w').write('s3cret')\n"
                             "open('result.txt', 'w').write('honest')\nprint('VICTIM-READY', flush=True)\n"
                             "while not os.path.exists('done'):\n    time.sleep(0.05)\n"
                             "print('result', open('result.txt').read(), flush=True)\n")
        vlines = Lines()
        ex.prepare(victim, vlines, threading.Event())
        ex.start(victim, vlines)
        assert vlines.wait_for("VICTIM-READY")
        (pid,) = _task_pids(victim.task_id)
        # The probe works: from outside the sandbox (root) the same program reaches the victim.
        out = subprocess.run([sys.executable, "-c", NEIGHBOUR, str(victim.workspace), str(pid), "0"],
                             capture_output=True, text=True, timeout=30)
        outside = _neighbour_result(out.stdout.splitlines())
        assert outside["read secret"] == outside["signal"] == outside["list workspace"] == "worked"
        (victim.workspace / "result.txt").write_text("honest")
        attacker = _spec(base, NEIGHBOUR)
        attacker = TaskSpec(attacker.task_id, attacker.workspace,
                            Entry(("python", "main.py", str(victim.workspace), str(pid),
                                   str(int(signal.SIGSTOP)))), attacker.limits)
        alines = Lines()
        ex.prepare(attacker, alines, threading.Event())
        ex.start(attacker, alines)
        ares = ex.wait(attacker.task_id, 60)
        assert ares is not None and ares.exit_code == 0, alines.texts()
        inside = _neighbour_result(alines.texts("stdout"))
        assert all(v.startswith("failed") for v in inside.values()), inside
        assert psutil.Process(pid).status() != psutil.STATUS_STOPPED
        os.close(os.open(victim.workspace / "done", os.O_CREAT | os.O_WRONLY))
        vres = ex.wait(victim.task_id, 60)
        assert vres is not None and vres.exit_code == 0
        assert "result honest" in vlines.texts("stdout")
        for t in (victim.task_id, attacker.task_id):
            ex.cleanup(t)


# setsid + double fork + empty environment: the classic way out of a process group.
IMPLANT = r'''
import os, sys, time
token, beacon = sys.argv[1], sys.argv[2]
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execve(sys.executable, [sys.executable, "-c",
            "import sys, time\nwhile True:\n    open(sys.argv[2], 'a').write('x')\n    time.sleep(0.05)\n",
            token, beacon], {})
    os._exit(0)
while not os.path.exists(beacon):
    time.sleep(0.01)
print("implanted", flush=True)
if len(sys.argv) > 3:
    time.sleep(1000)
'''


def _implant_pids(token: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if token.encode() in cmd:
            found.append(int(name))
    return found


def _beacon_stopped(beacon: Path) -> bool:
    size = beacon.stat().st_size if beacon.exists() else 0
    time.sleep(0.5)
    return (beacon.stat().st_size if beacon.exists() else 0) == size


@pytest.fixture
def beacon_dir() -> Iterator[Path]:
    d = open_dir("hm-sec-beacon-")
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _implant_escapes_outside(beacon_dir: Path) -> None:
    """The probe works: outside the sandbox the implant survives a process-group kill."""
    token = f"hm-implant-{uuid.uuid4().hex[:8]}"
    beacon = beacon_dir / "outside"
    p = subprocess.Popen([sys.executable, "-c", IMPLANT, token, str(beacon)],
                         start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and "implanted" in p.stdout.readline()
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        assert _implant_pids(token) and not _beacon_stopped(beacon)   # it escaped
    finally:
        for pid in _implant_pids(token):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("ending", ["task ends", "task is stopped"])
def test_setsid_double_fork_implant(base: Path, beacon_dir: Path, ending: str) -> None:
    """a setsid + double-fork implant with a cleared environment, checked after the task ends"""
    token = f"hm-implant-{uuid.uuid4().hex[:8]}"
    _implant_escapes_outside(beacon_dir)
    with make_executor("venv", base) as ex:
        spec = _spec(base, IMPLANT)
        beacon = spec.workspace / "beacon"        # the host's /var/tmp is not the task's
        args = [token, str(beacon)] + (["wait"] if ending == "task is stopped" else [])
        spec = TaskSpec(spec.task_id, spec.workspace, Entry(("python", "main.py", *args)), spec.limits)
        lines = Lines()
        ex.prepare(spec, lines, threading.Event())
        ex.start(spec, lines)
        assert lines.wait_for("implanted")
        assert beacon.exists(), "the implant never ran"
        if ending == "task is stopped":
            ex.stop(spec.task_id, grace=0.5)
        res = ex.wait(spec.task_id, 60)
        assert res is not None
        assert res.reason == (ExitReason.STOPPED if ending == "task is stopped" else ExitReason.EXITED)
        ex.cleanup(spec.task_id)
    assert _implant_pids(token) == []
    assert _beacon_stopped(beacon)


def test_files_left_in_shared_temp_dirs(base: Path) -> None:
    """a venv task leaving files in /tmp, /var/tmp, /dev/shm and /run/lock for later tasks"""
    name = f"hm-sec-left-{uuid.uuid4().hex[:8]}"
    dirs = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock"]
    main = ("import sys\nfor d in sys.argv[2:]:\n    open(d + '/' + sys.argv[1], 'w').write('x')\n"
            "    print('wrote', d, flush=True)\n")
    with make_executor("venv", base) as ex:
        spec = _spec(base, main)
        spec = TaskSpec(spec.task_id, spec.workspace, Entry(("python", "main.py", name, *dirs)),
                        spec.limits)
        lines = Lines()
        ex.prepare(spec, lines, threading.Event())
        ex.start(spec, lines)
        res = ex.wait(spec.task_id, 60)
        assert res is not None and res.exit_code == 0, lines.texts()
        assert lines.texts("stdout") == [f"wrote {d}" for d in dirs]   # the writes worked
        ex.cleanup(spec.task_id)
    left = [d for d in dirs if os.path.exists(f"{d}/{name}")]
    for d in left:
        os.unlink(f"{d}/{name}")
    assert left == []


def test_host_processes_are_invisible(base: Path) -> None:
    """a venv task listing or signalling the host's processes"""
    main = ("import os\npids = [int(p) for p in os.listdir('/proc') if p.isdigit()]\n"
            "print('pids', len(pids), flush=True)\n"
            "try:\n    os.kill(1, 0)\n    print('init', open('/proc/1/cmdline').read().split(chr(0))[0], flush=True)\n"
            "except OSError as e:\n    print('init', type(e).__name__, flush=True)\n")
    host_pids = len([p for p in os.listdir("/proc") if p.isdigit()])
    assert host_pids > 20                              # the probe has something to find
    with make_executor("venv", base) as ex:
        spec = _spec(base, main)
        lines = Lines()
        ex.prepare(spec, lines, threading.Event())
        ex.start(spec, lines)
        res = ex.wait(spec.task_id, 60)
        assert res is not None and res.exit_code == 0, lines.texts()
        ex.cleanup(spec.task_id)
    out = dict(line.split(" ", 1) for line in lines.texts("stdout"))
    assert int(out["pids"]) <= 5                       # its own few processes only
    assert out["init"] == "sh"                         # PID 1 is the task's own wrapper


def test_files_left_anywhere_else_on_the_host(base: Path) -> None:
    """a venv task writing into world-writable host directories outside the temp dirs"""
    name = f"hm-sec-left-{uuid.uuid4().hex[:8]}"
    # A world-writable dir on the root filesystem, outside the dirs the task gets private.
    spot = Path(tempfile.mkdtemp(prefix="hm-sec-world-", dir="/var/lib"))
    spot.chmod(0o1777)
    main = ("import sys\ntry:\n    open(sys.argv[1], 'w').write('x')\n    print('wrote')\n"
            "except OSError as e:\n    print('refused', e.errno)\n"
            "open('in-workspace.txt', 'w').write('ok')\n")
    try:
        target = spot / name
        # The probe works: any uid may create files there outside the sandbox.
        probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                                "sh", "-c", f"touch {target} && echo ok"],
                               capture_output=True, text=True)
        assert probe.stdout.strip() == "ok"
        target.unlink()
        with make_executor("venv", base) as ex:
            spec = _spec(base, main)
            spec = TaskSpec(spec.task_id, spec.workspace, Entry(("python", "main.py", str(target))),
                            spec.limits)
            lines = Lines()
            ex.prepare(spec, lines, threading.Event())
            ex.start(spec, lines)
            res = ex.wait(spec.task_id, 60)
            assert res is not None and res.exit_code == 0, lines.texts()
            ex.cleanup(spec.task_id)
        assert lines.texts("stdout") == [f"refused {errno.EROFS}"]
        assert (spec.workspace / "in-workspace.txt").read_text() == "ok"   # its own dir is writable
        assert not target.exists()
    finally:
        shutil.rmtree(spot, ignore_errors=True)
