"""Both metrics backends on this machine: same figures, same errors, native fallback, no leaks,
no hang after loading the Go runtime."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivemind.metrics import MetricsError, MetricsUnavailable, open_metrics
from hivemind.metrics.native import _CSnapshot, _CTree, library_candidates, load_library
from hivemind.metrics.psutil_backend import PsutilSource

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"
LIB = NATIVE / "build" / "libhivemindmetrics.so"


@pytest.fixture(scope="session")
def library() -> Path:
    """The library built from this checkout (make is a no-op when it's up to date)."""
    if shutil.which("go") is None or shutil.which("make") is None:
        pytest.skip("needs the Go toolchain and make to build native/")
    subprocess.run(["make", "-s", "-C", str(NATIVE)], check=True, capture_output=True, timeout=300)
    return LIB


@pytest.fixture
def native(library: Path) -> Iterator[object]:
    src = open_metrics("native", library_path=str(library))
    yield src
    src.close()


def test_backends_agree_on_machine_figures(library: Path) -> None:
    n_src = open_metrics("native", library_path=str(library))
    p_src = open_metrics("psutil")
    assert (n_src.backend, p_src.backend) == ("native", "psutil")
    try:
        n, p = n_src.snapshot("/"), p_src.snapshot("/")
    finally:
        n_src.close()
        p_src.close()
    assert n.cpu_count == p.cpu_count == os.cpu_count()
    assert n.memory_total == p.memory_total
    # Available memory moves between the two reads; 3 % of total covers other tests' churn.
    assert abs(n.memory_available - p.memory_available) <= 0.03 * n.memory_total
    assert n.swap_total == p.swap_total
    assert abs(n.swap_free - p.swap_free) <= 0.03 * max(n.swap_total, 1)
    assert n.disk_total == p.disk_total
    assert abs(n.disk_free - p.disk_free) <= 0.01 * n.disk_total
    for a, b in ((n.load1, p.load1), (n.load5, p.load5), (n.load15, p.load15)):
        assert abs(a - b) <= 0.5 + 0.1 * b  # the kernel updates load every 5 s
    for s in (n, p):
        assert 0.0 <= s.cpu_busy <= 1.0
        assert 0 < s.memory_available <= s.memory_total
        assert 0 <= s.disk_free <= s.disk_total
        assert s.cgroup is None


def test_cpu_busy_is_per_source_and_since_previous_call(library: Path) -> None:
    a = open_metrics("native", library_path=str(library))
    b = open_metrics("native", library_path=str(library))
    try:
        a.snapshot()
        b.snapshot()
        deadline = time.process_time() + 0.3
        while time.process_time() < deadline:  # CPU time, not wall time: one core busy
            pass
        busy = a.snapshot().cpu_busy
        # One core was busy for most of the interval: well over a quarter of 1/cpus.
        assert busy >= 0.25 / (os.cpu_count() or 1)
        b_busy = b.snapshot().cpu_busy  # b's interval is its own, and also saw the loop
        assert b_busy > 0
    finally:
        a.close()
        b.close()


def test_snapshot_errors_name_the_path(library: Path) -> None:
    for src in (open_metrics("native", library_path=str(library)), open_metrics("psutil")):
        with pytest.raises(MetricsError, match="/no/such/dir"):
            src.snapshot("/no/such/dir")
        with pytest.raises(MetricsError, match=r"'\.\.'"):
            src.snapshot("/", "/a/../b")
        src.close()


# --- cgroups -----------------------------------------------------------------------------------

V1_CONTROLLERS = ("memory", "cpuacct", "pids")


@pytest.fixture
def v1_cgroup() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A fresh leaf cgroup in the memory, cpuacct and pids v1 hierarchies, with limits and a
    child process that holds 32 MiB in it."""
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists() or not all((base / c).is_dir() for c in V1_CONTROLLERS):
        pytest.skip("this test drives cgroup v1 hierarchies (the v2 layout is tested with a fixture tree)")
    if os.geteuid() != 0:
        pytest.skip("creating cgroups needs root")
    name = f"hivemind-test-{os.getpid()}"
    made: list[Path] = []
    child: subprocess.Popen[bytes] | None = None
    try:
        for c in V1_CONTROLLERS:
            d = base / c / name
            d.mkdir()
            made.append(d)
        (base / "memory" / name / "memory.limit_in_bytes").write_text(str(256 << 20))
        (base / "pids" / name / "pids.max").write_text("20")
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
            import sys
            blocks = []
            while sys.stdin.readline():
                block = bytearray(32 << 20)
                for i in range(0, len(block), 4096): block[i] = 1
                blocks.append(block)
                print("ready", flush=True)
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for c in V1_CONTROLLERS:
            (base / c / name / "cgroup.procs").write_text(str(child.pid))
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(b"go\n")
        child.stdin.flush()
        assert child.stdout.readline() == b"ready\n"
        yield "/" + name, child
    finally:
        if child is not None:
            child.kill()
            child.wait(timeout=30)
        for d in reversed(made):
            for _ in range(50):
                if not d.exists():
                    break  # the kernel frees a cgroup shortly after its last task exits
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)


def test_backends_agree_on_a_real_v1_cgroup(library: Path,
                                           v1_cgroup: tuple[str, subprocess.Popen[bytes]]) -> None:
    path, _ = v1_cgroup
    n_src = open_metrics("native", library_path=str(library))
    p_src = open_metrics("psutil")
    try:
        n = n_src.snapshot("/", path).cgroup
        p = p_src.snapshot("/", path).cgroup
        n2 = n_src.snapshot("/", path).cgroup
    finally:
        n_src.close()
        p_src.close()
    assert n is not None and p is not None and n2 is not None
    assert n.version == p.version == 1
    assert n.pids_current == p.pids_current == 1
    assert n.pids_limit == p.pids_limit == 20
    assert n.memory_limit == p.memory_limit == 256 << 20
    assert n.memory_current >= 32 << 20
    assert abs(n.memory_current - p.memory_current) <= 0.05 * n.memory_current
    assert n.memory_peak is not None and n.memory_peak >= n.memory_current
    assert 0 < n.cpu_usage_ns <= p.cpu_usage_ns <= n2.cpu_usage_ns  # read in that order


def test_native_sees_a_cgroup_change_and_its_removal(
        library: Path, v1_cgroup: tuple[str, subprocess.Popen[bytes]]) -> None:
    """The library keeps cgroup files open between snapshots: it must still see new values,
    must not keep the cgroup from being removed, and must then report it gone."""
    path, child = v1_cgroup
    assert child.stdin is not None and child.stdout is not None
    src = open_metrics("native", library_path=str(library))
    try:
        before = src.snapshot("/", path).cgroup
        child.stdin.write(b"more\n")  # another 32 MiB
        child.stdin.flush()
        assert child.stdout.readline() == b"ready\n"
        after = src.snapshot("/", path).cgroup
        assert before is not None and after is not None
        assert after.memory_current - before.memory_current >= 30 << 20
        child.kill()
        child.wait(timeout=30)
        name = path.strip("/")
        for c in V1_CONTROLLERS:
            for _ in range(50):  # the kernel frees a cgroup shortly after its last task exits
                try:
                    (Path("/sys/fs/cgroup") / c / name).rmdir()  # while the library holds files
                    break
                except OSError:
                    time.sleep(0.05)
            assert not (Path("/sys/fs/cgroup") / c / name).exists()
        assert src.snapshot("/", path).cgroup is None
    finally:
        src.close()


def test_missing_cgroup_is_none_for_both(library: Path) -> None:
    for src in (open_metrics("native", library_path=str(library)), open_metrics("psutil")):
        assert src.snapshot("/", "/hivemind-no-such-cgroup").cgroup is None
        src.close()


@pytest.fixture
def v2_tree(tmp_path: Path) -> Path:
    files = {
        "cgroup.controllers": "cpu memory pids\n",
        "machine.slice/task/cgroup.procs": "42\n",
        "machine.slice/task/cpu.stat": "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n",
        "machine.slice/task/memory.current": "1048576\n",
        "machine.slice/task/memory.peak": "2097152\n",
        "machine.slice/task/memory.max": "max\n",
        "machine.slice/task/pids.current": "3\n",
        "machine.slice/task/pids.max": "64\n",
        "machine.slice/old/cgroup.procs": "",
        "machine.slice/old/memory.current": "4096\n",
        "machine.slice/old/memory.max": "8192\n",
        "machine.slice/old/pids.max": "max\n",
    }
    for rel, body in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(body)
    return tmp_path


def test_backends_read_a_v2_tree_alike(library: Path, v2_tree: Path) -> None:
    for backend in ("native", "psutil"):
        src = open_metrics(backend, library_path=str(library), cgroup_root=str(v2_tree))
        try:
            task = src.snapshot("/", "/machine.slice/task").cgroup
            old = src.snapshot("/", "machine.slice/old/").cgroup  # no peak file: older kernel
            gone = src.snapshot("/", "/machine.slice/gone").cgroup
        finally:
            src.close()
        assert task is not None and old is not None, backend
        assert (task.version, task.cpu_usage_ns, task.memory_current, task.memory_peak,
                task.memory_limit, task.pids_current, task.pids_limit) == (
                    2, 2_500_000, 1 << 20, 2 << 20, None, 3, 64), backend
        assert (old.memory_current, old.memory_peak, old.memory_limit, old.pids_limit,
                old.cpu_usage_ns) == (4096, None, 8192, None, 0), backend
        assert gone is None, backend


# --- loading and fallback ----------------------------------------------------------------------


def test_auto_prefers_native_when_it_loads(library: Path) -> None:
    src = open_metrics("auto", library_path=str(library))
    assert (src.backend, src.fallback_reason) == ("native", None)
    src.close()


def test_default_search_finds_the_checkout_build(library: Path) -> None:
    assert LIB in library_candidates("")
    src = open_metrics("auto")
    assert src.backend == "native"
    src.close()


def _fake_library(tmp_path: Path, abi: int) -> Path:
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler to build a fake library")
    c = tmp_path / "fake.c"
    c.write_text(f"int hm_abi_version(void) {{ return {abi}; }}\n")
    so = tmp_path / "libfake.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(so), str(c)], check=True, timeout=60)
    return so


@pytest.mark.parametrize("case", ["missing", "garbage", "abi"])
def test_auto_falls_back_to_psutil_with_one_log_line(
        case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if case == "missing":
        path, why = tmp_path / "nope.so", "not found"
    elif case == "garbage":
        path, why = tmp_path / "garbage.so", "can't be loaded"
        path.write_bytes(b"not an ELF file")
    else:
        path, why = _fake_library(tmp_path, 99), "ABI version 99"
    logger = logging.getLogger("test.metrics")
    with caplog.at_level(logging.INFO, logger="test.metrics"):
        src = open_metrics("auto", library_path=str(path), logger=logger)
    assert isinstance(src, PsutilSource)
    assert src.fallback_reason is not None and why in src.fallback_reason
    assert len(caplog.records) == 1 and why in caplog.records[0].getMessage()
    assert src.snapshot().memory_total > 0
    with pytest.raises(MetricsUnavailable, match=why):
        open_metrics("native", library_path=str(path))


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="gpu"):
        open_metrics("gpu")


@pytest.mark.parametrize(("struct", "ctype"), [(_CSnapshot, "hm_snapshot_t"), (_CTree, "hm_tree_t")])
def test_ctypes_struct_matches_the_c_header(tmp_path: Path, struct: type[ctypes.Structure],
                                            ctype: str) -> None:
    """Offsets of every field as the C compiler lays out the struct, against ctypes."""
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    names = [f[0] for f in struct._fields_]
    body = "".join(f'printf("{n} %zu\\n", offsetof({ctype}, {n}));' for n in names)
    prog = tmp_path / "layout.c"
    prog.write_text('#include <stdio.h>\n#include <stddef.h>\n#include "hivemind_metrics.h"\n'
                    f'int main(void) {{ {body} printf("sizeof %zu\\n", sizeof({ctype})); return 0; }}\n')
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-I", str(NATIVE), "-o", str(exe), str(prog)], check=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=30).stdout
    c_layout = dict(line.split() for line in out.splitlines())
    py_layout = {n: str(getattr(struct, n).offset) for n in names}
    py_layout["sizeof"] = str(ctypes.sizeof(struct))
    assert py_layout == c_layout


def test_header_check_passes(library: Path) -> None:
    r = subprocess.run(["make", "-s", "-C", str(NATIVE), "check-header"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_closed_source_and_unknown_handle(library: Path) -> None:
    lib = load_library(str(library))
    assert lib.hm_close(987654) == -1
    assert lib.hm_last_error(987654, None, 0) == -1
    src = open_metrics("native", library_path=str(library))
    src.close()
    src.close()
    with pytest.raises(MetricsError, match="closed"):
        src.snapshot()


# --- resources and process safety --------------------------------------------------------------


# Measured in a process of its own: in the test run's, threads other tests left behind allocate
# while the snapshots run, and their growth was counted as the library's.
LEAK_CHILD = r"""
import resource, sys
from hivemind.metrics import open_metrics

def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)

src = open_metrics("native", library_path=sys.argv[1])
# The Go heap grows to its first GC target (~4 MiB) before it levels off: warm up past it.
for _ in range(40000):
    src.snapshot("/", "/")
before = rss_kib()
# Four times as many as the warm-up: the Go heap breathes by up to ~1.3 MiB around its GC target
# on a loaded machine (the collector runs late), while a leak grows with every call.
for _ in range(160000):
    src.snapshot("/", "/")
print(rss_kib() - before)
src.close()
"""


def test_native_snapshots_do_not_leak(library: Path) -> None:
    out = subprocess.run([sys.executable, "-c", LEAK_CHILD, str(library)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    grown = int(out.stdout.split()[-1])
    assert grown < 2048, f"RSS grew {grown} KiB over 160000 snapshots (a leak of 13 bytes a call would pass it)"
    src = open_metrics("native", library_path=str(library))
    src.snapshot("/", "/")
    src.close()
    # Kept-open files are closed with their source. (Counted only now: the Go runtime opens a
    # few descriptors of its own, once, when its poller first starts.)
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        other = open_metrics("native", library_path=str(library))
        other.snapshot("/", "/")
        other.close()
    assert len(os.listdir("/proc/self/fd")) == fds


FORK_SAFETY_CHILD = r"""
import subprocess, sys
import grpc
from concurrent import futures
from hivemind.metrics import open_metrics

src = open_metrics("native", library_path=sys.argv[1])
assert src.backend == "native"
src.snapshot()
# fork+exec of a Python child after the Go runtime started.
out = subprocess.run([sys.executable, "-c", "print('child ok')"], capture_output=True, text=True, timeout=30)
assert out.stdout == "child ok\n", out
# A gRPC server and client in the same process (grpc starts its own threads and pollers).
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
handler = grpc.method_handlers_generic_handler(
    "test.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req[::-1])})
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
    assert ch.unary_unary("/test.Echo/Ping")(b"abc", timeout=20) == b"cba"
server.stop(None).wait(10)
src.snapshot()
print("ok")
"""


def test_subprocess_and_grpc_work_after_loading_the_go_runtime(library: Path) -> None:
    # In a child interpreter so that a hang fails this test by its timeout instead of hanging pytest.
    r = subprocess.run([sys.executable, "-c", FORK_SAFETY_CHILD, str(library)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.endswith("ok\n"), r.stdout + r.stderr


def test_forked_child_gets_an_error_instead_of_a_hang(library: Path) -> None:
    src = open_metrics("native", library_path=str(library))
    src.snapshot()
    pid = os.fork()
    if pid == 0:  # child: must not call into Go
        try:
            src.snapshot()
        except MetricsError:
            os._exit(0)
        os._exit(1)
    try:
        for _ in range(600):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("forked child hung")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        src.close()


def test_one_native_source_shared_by_threads(library: Path) -> None:
    import threading

    src = open_metrics("native", library_path=str(library))
    errors: list[BaseException] = []
    results: list[int] = []

    def work() -> None:
        try:
            for _ in range(300):
                results.append(src.snapshot("/", "/").memory_total)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    src.close()
    assert not errors and len(results) == 1200 and len(set(results)) == 1


TREE = textwrap.dedent("""
    import subprocess, sys, time
    kids = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    buf = bytearray(64 * 1024 * 1024)
    for i in range(0, len(buf), 4096):
        buf[i] = 1
    end = time.process_time() + 0.5
    while time.process_time() < end:
        pass
    print("ready", flush=True)
    sys.stdin.read()
    for k in kids:
        k.kill()
""")


@pytest.mark.parametrize("backend", ["native", "psutil"])
def test_tree_usage_of_a_real_process_tree(library: Path, backend: str) -> None:
    """A parent with two children: both backends count three processes, its CPU and memory."""
    src = open_metrics(backend, library_path=str(library))
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        tree = src.tree(proc.pid)
        assert tree is not None
        assert tree.procs == 3
        assert tree.cpu_seconds >= 0.5
        assert tree.rss_bytes >= 64 * 1024 * 1024
        # The caller's own tree holds the child's: a tree is every descendant, not one level.
        mine = src.tree(os.getpid())
        assert mine is not None and mine.procs >= 4
    finally:
        proc.communicate(b"", timeout=30)
        src.close()
    other = open_metrics(backend, library_path=str(library))
    try:
        assert other.tree(proc.pid) is None          # reaped: gone, not an error
        with pytest.raises(MetricsError):
            other.tree(0)
    finally:
        other.close()


def test_tree_of_a_pid_that_never_existed_is_none(library: Path) -> None:
    for backend in ("native", "psutil"):
        src = open_metrics(backend, library_path=str(library))
        try:
            assert src.tree(2**22 + 7) is None     # above pid_max's default: never a process
        finally:
            src.close()
