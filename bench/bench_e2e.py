"""End-to-end benchmarks of the worker daemon against a real development pool over real gRPC, each
next to the baseline a user would otherwise run, measured in the same run.

Every function returns a `Measurement` (samples for the worker and for the baseline); `report.py`
turns a list of them into the table, JSON and plot. Times are monotonic seconds.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from harness import Setup

from hivemind.devpool.testing import task_zip, wait_for

IMAGE = "localhost/hivemind-task:latest"
PRINT_TASK = {"main.py": "print(1, flush=True)\n"}
MIB = 1024 * 1024
# The worker runs rootful Podman here because the bare `podman run` baseline runs as root too.
PODMAN: dict[str, Any] = {"kind": "podman", "podman": {"mode": "rootful", "image": IMAGE}}
VENV: dict[str, Any] = {"kind": "venv"}
ROOTLESS_USER = "hivemind"     # executor.podman.rootless_user's default, set up by scripts/setup


@dataclass
class Measurement:
    name: str
    unit: str
    worker: list[float]
    baseline: list[float]
    baseline_name: str
    target: str
    # "ratio" (worker / baseline <= limit), "ratio_min" (worker / baseline >= limit),
    # "delta" (worker - baseline <= limit), "abs" (worker <= limit)
    kind: str
    limit: float
    notes: list[str] = field(default_factory=list)

    def median(self, which: str) -> float:
        values = self.worker if which == "worker" else self.baseline
        return statistics.median(values) if values else float("nan")

    def figure(self) -> float:
        w, b = self.median("worker"), self.median("baseline")
        if self.kind in ("ratio", "ratio_min"):
            return w / b if b else float("nan")
        if self.kind == "delta":
            return w - b
        return w

    def met(self) -> bool:
        f = self.figure()
        return f >= self.limit if self.kind == "ratio_min" else f <= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "worker": self.worker, "baseline": self.baseline,
                "baseline_name": self.baseline_name, "target": self.target, "kind": self.kind,
                "limit": self.limit, "figure": self.figure(), "met": self.met(), "notes": self.notes,
                "worker_median": self.median("worker"), "baseline_median": self.median("baseline")}


def podman_usable() -> str:
    """'' when rootful Podman and the task image are there, else why not."""
    if os.geteuid() != 0:
        return "needs root (the baseline and the worker run rootful Podman)"
    try:
        if subprocess.run(["podman", "image", "exists", IMAGE], capture_output=True, timeout=60).returncode:
            return f"image {IMAGE} is missing: run images/build"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"podman is unusable: {exc}"
    return ""


# -- baselines -----------------------------------------------------------------------------------
def first_line_s(argv: list[str], cwd: Path | None = None) -> float:
    """Seconds from spawning argv to reading its first stdout line."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=cwd)
    assert p.stdout is not None
    line = p.stdout.readline()
    t1 = time.monotonic()
    p.stdout.read()
    p.stdout.close()
    if p.wait() != 0 or not line:
        raise RuntimeError(f"{argv} failed")
    return t1 - t0


def bare_podman_argv() -> list[str]:
    return ["podman", "run", "--rm", "--network", "none", IMAGE, "python3", "-c", "print(1)"]


# -- dispatch latency ----------------------------------------------------------------------------
def _latency_run(setup: Setup, task_id: str, data: bytes, timeout: float = 60) -> float:
    """From the ExecuteTask call to the first output at the pool; then waits for the result, so
    runs never overlap."""
    pool = setup.pool
    task = pool.add_task(task_id, data)
    t0 = time.monotonic()
    ok, msg = pool.execute(task, data)
    if not ok:
        raise RuntimeError(f"worker declined {task_id}: {msg}")
    # Ends early when the task ended without output (a broken executor), instead of timing out.
    wait_for(lambda: task_id in pool.first_output or pool.status(task_id) in ("COMPLETED", "FAILED"),
             timeout, f"first output of {task_id}", 0.005)
    t1 = pool.first_output.get(task_id)
    if t1 is None:
        raise RuntimeError(f"{task_id} ended without output: {_record_message(setup, task_id)}")
    wait_for(lambda: pool.status(task_id) in ("COMPLETED", "FAILED"), timeout, f"{task_id} to finish", 0.02)
    if pool.status(task_id) != "COMPLETED":
        raise RuntimeError(f"{task_id} failed: {pool.pool.task(task_id)}")
    return float(t1 - t0)


def _record_message(setup: Setup, task_id: str) -> str:
    """The execution record's message from the task's result, or why there is none."""
    import json
    import zipfile

    t = setup.pool.pool.task(task_id)
    if t is None or t.result_path is None:
        return f"no result (pool status {t.status if t else '?'}: {t.message if t else ''})"
    with zipfile.ZipFile(t.result_path) as z:
        rec = json.loads(z.read("_hivemind/execution.json"))
    return f"{rec.get('reason')}: {rec.get('message')}"


def dispatch_latency(executor: str, runs: int, log: Callable[[str], None]) -> Measurement:
    data = task_zip(PRINT_TASK)
    scratch = Path(tempfile.mkdtemp(prefix="hm-bench-bare-"))
    (scratch / "main.py").write_text(PRINT_TASK["main.py"])
    cfg: dict[str, Any]
    if executor == "podman":
        bare_argv, bare_cwd, cfg = bare_podman_argv(), None, PODMAN
        baseline_name = "bare `podman run --rm --network none` (rootful)"
    else:
        bare_argv, bare_cwd, cfg = [sys.executable, "main.py"], scratch, VENV
        baseline_name = "bare subprocess (python main.py)"
    worker: list[float] = []
    bare: list[float] = []
    try:
        with Setup(cfg) as setup:
            # Warm-up: the venv cache, podman's image and storage, the page cache.
            _latency_run(setup, f"warm-{executor}", data, timeout=300)
            first_line_s(bare_argv, bare_cwd)
            for i in range(runs):  # interleaved, so drift on the machine hits both alike
                bare.append(first_line_s(bare_argv, bare_cwd))
                worker.append(_latency_run(setup, f"lat-{executor}-{i}", data))
            log(f"dispatch latency {executor}: worker {statistics.median(worker) * 1000:.0f} ms, "
                f"bare {statistics.median(bare) * 1000:.0f} ms")
    finally:
        subprocess.run(["rm", "-rf", str(scratch)])
    if executor == "podman":
        return Measurement("dispatch latency, Podman", "ms", [x * 1000 for x in worker], [x * 1000 for x in bare],
                           baseline_name, "<= 1.25x bare podman", "ratio", 1.25)
    return Measurement("dispatch latency, cached venv", "ms", [x * 1000 for x in worker], [x * 1000 for x in bare],
                       baseline_name, "<= +40 ms over bare subprocess", "delta", 40.0)


# -- throughput ----------------------------------------------------------------------------------
def rootless_prefix() -> list[str]:
    """How the rootless baseline runs podman: as executor.podman.rootless_user, in its session."""
    import pwd

    user = pwd.getpwnam(ROOTLESS_USER)
    return ["runuser", "-u", ROOTLESS_USER, "--", "env", f"XDG_RUNTIME_DIR=/run/user/{user.pw_uid}",
            f"HOME={user.pw_dir}"]


def xargs_podman_s(n: int, slots: int, mode: str = "rootful") -> float:
    prefix = rootless_prefix() if mode == "rootless" else []
    argv = ["xargs", "-P", str(slots), "-I{}", *prefix, *bare_podman_argv()]
    t0 = time.monotonic()
    subprocess.run(argv, input="".join(f"{i}\n" for i in range(n)).encode(), stdout=subprocess.DEVNULL, check=True)
    return time.monotonic() - t0


def worker_batch_s(setup: Setup, n: int, prefix: str) -> float:
    """Submits n tasks at once, feeding ExecuteTask as fast as the worker accepts (a declined call,
    the worker being full, is retried after 10 ms, like a pool round on a fast interval); returns
    seconds from the first call to the last result stored by the pool."""
    data = task_zip(PRINT_TASK)
    pool = setup.pool
    tasks = [pool.add_task(f"{prefix}-{i}", data) for i in range(n)]
    t0 = time.monotonic()
    for task in tasks:
        while True:
            ok, _ = pool.execute(task, data, fresh_channel=False)
            if ok:
                break
            time.sleep(0.01)
    ids = [t.task_id for t in tasks]
    wait_for(lambda: all(pool.status(t) in ("COMPLETED", "FAILED") for t in ids), 600, "the batch", 0.05)
    elapsed = time.monotonic() - t0
    failed = [t for t in ids if pool.status(t) != "COMPLETED"]
    if failed:
        raise RuntimeError(f"{len(failed)} tasks failed, e.g. {pool.pool.task(failed[0])}")
    return elapsed


TIMING_LINE = re.compile(r"task (\S+) timing: (.*)$")


def phase_medians(log_text: str, prefix: str) -> dict[str, float]:
    """Median length (ms) of each phase over the batch's tasks, from the worker's `task.timing`
    log lines (the runner's marks: quota, workspace, prepared, created, container_started,
    started, first_output, exited, collected, packed, removed)."""
    per_phase: dict[str, list[float]] = {}
    for line in log_text.splitlines():
        m = TIMING_LINE.search(line)
        if m is None or not m.group(1).startswith(prefix + "-"):
            continue
        for part in m.group(2).split(", "):
            name, _, rest = part.partition(" ")
            with contextlib.suppress(ValueError):
                per_phase.setdefault(name, []).append(float(rest.split()[0]))
    return {k: statistics.median(v) for k, v in per_phase.items()}


def phase_note(phases: dict[str, float]) -> str:
    return "per task, median ms: " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items())


def throughput(n: int, repeats: int, log: Callable[[str], None], mode: str = "rootful") -> Measurement:
    slots = os.cpu_count() or 2
    worker: list[float] = []
    bare: list[float] = []
    busy: list[float] = []
    daemon_cpu: list[float] = []
    own_cpu: list[float] = []
    phases: dict[str, list[float]] = {}
    cfg = {**PODMAN, "podman": {**PODMAN["podman"], "mode": mode}}
    with Setup(cfg, extra={"executor": {"slots": slots}}) as setup:
        daemon = psutil.Process(setup.worker.pid)
        worker_batch_s(setup, slots, "warm")
        for r in range(repeats):
            bare.append(n / xargs_podman_s(n, slots, mode))
            m0, d0, own0 = psutil.cpu_times(), _tree_cpu(daemon), _own_cpu(daemon)
            worker.append(n / worker_batch_s(setup, n, f"tp{r}"))
            m1, d1, own1 = psutil.cpu_times(), _tree_cpu(daemon), _own_cpu(daemon)
            own_cpu.append(1000.0 * (own1 - own0) / n)
            busy.append(100.0 * (1 - (m1.idle - m0.idle) / (sum(m1) - sum(m0))))
            daemon_cpu.append(1000.0 * (d1 - d0) / n)
            round_phases = phase_medians(setup.worker.log_path.read_text(errors="replace"), f"tp{r}")
            for k, v in round_phases.items():
                phases.setdefault(k, []).append(v)
            log(f"throughput {mode} round {r}: worker {worker[-1]:.2f}/s, xargs {bare[-1]:.2f}/s, "
                f"machine {busy[-1]:.0f} % busy, daemon+podman service {daemon_cpu[-1]:.0f} ms CPU/task "
                f"(daemon alone {own_cpu[-1]:.0f}); "
                f"{phase_note(round_phases)}")
    return Measurement(f"throughput {mode}, {n} tasks, {slots} slots", "tasks/s", worker, bare,
                       f"xargs -P {slots} podman run ({mode})", ">= 1.0x xargs", "ratio_min", 1.0,
                       ["ExecuteTask driven directly (retry 10 ms after a decline), not the pool's 10 s rounds",
                        f"during the worker's batches: machine {statistics.median(busy):.0f} % busy, daemon and its "
                        f"podman service {statistics.median(daemon_cpu):.0f} ms CPU per task (the daemon alone "
                        f"{statistics.median(own_cpu):.0f} ms)",
                        phase_note({k: statistics.median(v) for k, v in phases.items()})])


def _own_cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _tree_cpu(proc: psutil.Process) -> float:
    total = 0.0
    for p in (proc, *proc.children(recursive=True)):
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


# -- idle footprint ------------------------------------------------------------------------------
def idle_footprint(seconds: float, log: Callable[[str], None], *, podman: bool = True) -> list[Measurement]:
    """RSS and CPU of the registered, idle daemon (default heartbeat, status API on), against a bare
    Python process that imports grpc and sleeps, sampled over the same window."""
    from hivemind.devpool.testing import free_port

    bare = subprocess.Popen([sys.executable, "-c", "import grpc, time; time.sleep(100000)"])
    floor = subprocess.Popen([sys.executable, "-c", GRPC_FLOOR, str(os.cpu_count() or 2)])
    status_port = free_port()
    try:
        with Setup(PODMAN if podman else VENV, extra={"status": {"enabled": True, "port": status_port}}) as setup:
            proc = psutil.Process(setup.worker.pid)
            bproc = psutil.Process(bare.pid)
            time.sleep(min(5.0, seconds / 4))  # past registration and the first heartbeats
            c0, b0 = proc.cpu_times(), bproc.cpu_times()
            t0 = time.monotonic()
            rss: list[float] = []
            brss: list[float] = []
            frss: list[float] = []
            split: list[tuple[float, float]] = []
            fsplit: list[tuple[float, float]] = []
            while time.monotonic() - t0 < seconds:
                split.append(_rss_split(proc.pid))
                rss.append(sum(split[-1]))   # what psutil's rss is: the same kernel counters
                brss.append(bproc.memory_info().rss / MIB)
                if floor.poll() is None:
                    fsplit.append(_rss_split(floor.pid))
                    frss.append(sum(fsplit[-1]))
                time.sleep(1.0)
            wall = time.monotonic() - t0
            c1, b1 = proc.cpu_times(), bproc.cpu_times()
            children = sum(c.memory_info().rss for c in proc.children(recursive=True)) / MIB
            full = proc.memory_full_info()
            threads = proc.num_threads()
            kinds = _thread_kinds(proc.pid)
            # The status API loads Falcon and its app on its first connection: what that costs.
            conn = http.client.HTTPConnection("127.0.0.1", status_port, timeout=30)
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            conn.close()
            time.sleep(2.0)
            after_request = proc.memory_info().rss / MIB
    finally:
        for p in (bare, floor):
            p.kill()
            p.wait()
    if not frss:
        raise RuntimeError(f"the gRPC floor process exited with {floor.returncode}")
    cpu = 100.0 * ((c1.user + c1.system) - (c0.user + c0.system)) / wall
    bcpu = 100.0 * ((b1.user + b1.system) - (b0.user + b0.system)) / wall
    log(f"idle: rss {statistics.median(rss):.1f} MiB, cpu {cpu:.3f} % over {wall:.0f} s")
    note = (f"{'podman' if podman else 'venv'} executor, window {wall:.0f} s, heartbeat 5 s, status API on, "
            f"{threads} threads ({kinds}); PSS {full.pss / MIB:.1f} MiB, USS {full.uss / MIB:.1f} MiB at the end "
            f"(RSS counts the shared libraries whole); children (podman service) RSS {children:.1f} MiB, not counted; "
            f"after the status API's first request (Falcon and the app load then) RSS {after_request:.1f} MiB")
    anon, file = (statistics.median(x) for x in zip(*split, strict=True))
    fanon, ffile = (statistics.median(x) for x in zip(*fsplit, strict=True))
    floor_note = (f"anonymous {anon:.1f} MiB, file-backed {file:.1f} (the floor: {fanon:.1f} and {ffile:.1f}); the floor "
                  "is a process that only serves gRPC and calls itself once over a channel, as the worker's server "
                  "and pool channel do")
    return [Measurement("idle RSS", "MiB", rss, brss, "python -c 'import grpc; sleep'", "<= 45 MiB", "abs", 45.0,
                        [note]),
            Measurement("idle RSS beyond a bare gRPC server and client", "MiB", rss, frss,
                        "gRPC server + channel, one call, idle", "reported (no target)", "delta", 1e9, [floor_note]),
            Measurement("idle CPU", "% of a core", [cpu], [bcpu], "python -c 'import grpc; sleep'", "<= 0.3 %",
                        "abs", 0.3, [note])]


# What any Python process pays for what the worker does over gRPC (a server, and a channel to the
# pool) before a line of the worker's own runs: the floor under the idle figure.
GRPC_FLOOR = """
import sys, time
from concurrent import futures
import grpc
server = grpc.server(futures.ThreadPoolExecutor(max_workers=int(sys.argv[1])))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
channel = grpc.insecure_channel(f"127.0.0.1:{port}")
try:
    channel.unary_unary("/floor.Floor/Call")(b"", timeout=30)
except grpc.RpcError as exc:
    assert exc.code() == grpc.StatusCode.UNIMPLEMENTED, exc
time.sleep(100000)
"""


def _rss_split(pid: int) -> tuple[float, float]:
    """(anonymous, file-backed) resident MiB: file-backed pages are shared and reclaimable, the
    anonymous ones are what the process alone holds."""
    fields: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) / 1024
    return fields.get("RssAnon", 0.0), fields.get("RssFile", 0.0) + fields.get("RssShmem", 0.0)


def _thread_kinds(pid: int) -> str:
    """The process's threads by kernel name: Python's own show as `python`, gRPC's C core names
    its (event_engine, grpc_global_timer, lifeguard), so the split says whose threads they are."""
    kinds: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                name = (task / "comm").read_text().strip()
                kinds[name] = kinds.get(name, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))


# -- large results -------------------------------------------------------------------------------
def big_task(files: int, file_mib: int) -> dict[str, str]:
    return {"main.py": (
        "import os\n"
        f"for i in range({files}):\n"
        "    with open(f'blob{i}.bin', 'wb') as f:\n"
        f"        for _ in range({file_mib}):\n"
        "            f.write(os.urandom(1 << 20))\n"
        "print('written', flush=True)\n")}


def large_result(files: int, file_mib: int, log: Callable[[str], None]) -> Measurement:
    """Peak RSS growth of the daemon (sampled every 50 ms) from accepting the task until the pool
    stored its result; random (incompressible) data, so the archive is as large as the files."""
    total_mib = files * file_mib
    data = task_zip(big_task(files, file_mib))
    cap_mb = max(1024, 2 * total_mib)
    with Setup(VENV, extra={"archive": {"max_result_mb": cap_mb}}) as setup:
        proc = psutil.Process(setup.worker.pid)
        _latency_run(setup, "warm-big", task_zip(PRINT_TASK), timeout=300)
        time.sleep(1.0)
        before = proc.memory_info().rss / MIB
        samples: list[float] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append(proc.memory_info().rss / MIB)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        task = setup.pool.add_task("big-result", data, memory_gb=2)
        try:
            ok, msg = setup.pool.execute(task, data)
            if not ok:
                raise RuntimeError(f"worker declined the large task: {msg}")
            wait_for(lambda: setup.pool.status("big-result") in ("COMPLETED", "FAILED"), 600,
                     "the large result", 0.1)
        finally:
            done.set()
            sampler.join()
        t = setup.pool.pool.task("big-result")
        assert t is not None
        if t.status != "COMPLETED":
            raise RuntimeError(f"large task failed: {t.message}\n{setup.worker.log_tail()}")
        chunked = "big-result" in setup.pool.chunked.task_ids
        size = t.result_size / MIB
    growth = max(samples) - before
    log(f"large result: {size:.0f} MiB archive, chunked={chunked}, RSS {before:.0f} -> peak {max(samples):.0f} MiB")
    return Measurement(f"large result ({files} x {file_mib} MiB)", "MiB RSS growth", [growth], [before],
                       "daemon RSS before the task", "<= 64 MiB growth", "abs", 64.0,
                       [f"archive {size:.0f} MiB, random data (incompressible), chunked upload used: {chunked}",
                        f"{len(samples)} RSS samples at 50 ms, one run"])


# -- metrics snapshot ----------------------------------------------------------------------------
def metrics_snapshot(rounds: int, iterations: int, log: Callable[[str], None]) -> Measurement:
    import bench_metrics

    from hivemind.metrics import open_metrics

    native, py = open_metrics("native"), open_metrics("psutil")
    cg, made = bench_metrics.make_leaf_cgroup()
    res: dict[str, list[float]] = {"native": [], "psutil": []}
    try:
        for src in (native, py):
            bench_metrics.per_call_us(src, "/", cg, 50)
        for _ in range(rounds):
            for name, src in (("native", native), ("psutil", py)):
                res[name].append(bench_metrics.per_call_us(src, "/", cg, iterations))
    finally:
        native.close()
        py.close()
        for d in made:
            d.rmdir()
    log(f"metrics: native {statistics.median(res['native']):.0f} us, psutil {statistics.median(res['psutil']):.0f} us")
    return Measurement("metrics snapshot", "us/call", res["native"], res["psutil"], "psutil",
                       "native <= 1/3 of psutil", "ratio", 1 / 3, [f"cgroup {cg}"])
