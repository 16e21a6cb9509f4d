"""Bounded-abuse benchmarks (issue 14), each against a baseline measured in the same run:

- unauth-rss: the worker's gRPC server (its own process, tests/abuse_server.py) receives N
  concurrent large ExecuteTask calls from callers without valid credentials (wrong token; no
  client certificate; an unlisted peer in legacy mode). Figure: growth of the server's peak RSS.
  Baseline: the growth for ONE authenticated upload of the same size (one archive budget).
- zip-bomb: refusal of a zip whose central directory lists 2 million members: time and traced
  memory of `inspect_task_archive`. Baseline: zipfile listing a 1 % slice of it (20,000 members).
- long-line: a task printing one long line without a newline through a real executor, wall time
  from start to result. Baseline: `cat` of the same bytes in the same shell pipeline.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
import zipfile
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

from bench_e2e import IMAGE, MIB, Measurement, podman_usable

from hivemind.devpool.testing import directory_zip

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "tests" / "abuse_server.py"
TOKEN = "bench-abuse-token-1d2c3b4a"


# -- unauthenticated callers -------------------------------------------------------------------

def _peak(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _server(conf: dict[str, Any], tmp: Path) -> tuple[subprocess.Popen[str], int]:
    path = tmp / f"server-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(conf))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(SERVER), str(path)], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def _stop(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _flood(port: int, creds: Any, payload: bytes, calls: int,
           metadata: tuple[tuple[str, str], ...] = ()) -> list[str]:
    import grpc

    method = "/nodepool.WorkerNodeService/ExecuteTask"

    def one(_: int) -> str:
        opts = [("grpc.max_send_message_length", 2047 * MIB)]
        target = f"127.0.0.1:{port}"
        ch = (grpc.secure_channel(target, creds, options=opts) if creds is not None
              else grpc.insecure_channel(target, options=opts))
        with ch:
            # Pre-serialized: every call sends the same bytes object (the client's memory is
            # not what is measured).
            call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
            try:
                call(payload, metadata=metadata, timeout=300)
                return "OK"
            except grpc.RpcError as err:
                return str(err.code().name)

    with futures.ThreadPoolExecutor(calls) as pool:
        return list(pool.map(one, range(calls)))


def unauthenticated_rss(calls: int, mib: int, log: Callable[[str], None]) -> list[Measurement]:
    sys.path.insert(0, str(ROOT / "tests"))
    from hivemind._proto import nodepool_pb2
    from hivemind.server import pool_channel_credentials

    from certs import make_pki

    payload = nodepool_pb2.ExecuteTaskRequest(task_id="bench-abuse",
                                              task_zip=b"\0" * (mib * MIB)).SerializeToString()
    out: list[Measurement] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pki = make_pki(tmp / "pki")
        (tmp / "token").write_text(TOKEN)
        big = {"max_message_mb": 2047, "max_inflight_uploads": 2}
        tls = {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key)}
        # Baseline: one authenticated upload of the same size (what one archive costs).
        proc, port = _server({"auth": {"legacy_allowed_peers": ["127.0.0.1"]}, "server": big,
                              "max_archive_mb": mib + 1}, tmp)
        try:
            before = _peak(proc.pid)
            codes = _flood(port, None, payload, 1)
            one_archive = _peak(proc.pid) - before
        finally:
            _stop(proc)
        log(f"unauth-rss: one authenticated {mib} MiB upload grows the server by "
            f"{one_archive / MIB:.0f} MiB ({codes[0]})")
        cases = [
            ("token", {**tls, "token_file": str(tmp / "token")},
             pool_channel_credentials(str(pki.ca)), (("authorization", "Bearer wrong"),)),
            ("mtls", {**tls, "client_ca_file": str(pki.ca)}, pool_channel_credentials(str(pki.ca)), ()),
            ("legacy", {"legacy_allowed_peers": ["127.0.0.9"]}, None, ()),
        ]
        for mode, auth, creds, metadata in cases:
            proc, port = _server({"auth": auth, "server": big, "max_archive_mb": mib + 1}, tmp)
            try:
                before = _peak(proc.pid)
                codes = _flood(port, creds, payload, calls, metadata)
                growth = _peak(proc.pid) - before
            finally:
                _stop(proc)
            log(f"unauth-rss {mode}: {calls} x {mib} MiB -> +{growth / MIB:.1f} MiB "
                f"({', '.join(sorted(set(codes)))})")
            if mode == "legacy":
                out.append(Measurement(
                    f"unauthenticated {calls}x{mib} MiB, legacy: server RSS growth", "MiB",
                    [growth / MIB], [one_archive / MIB], "one authenticated upload",
                    "<= one archive budget", "ratio", 1.0, [f"codes {sorted(set(codes))}"]))
            else:
                out.append(Measurement(
                    f"unauthenticated {calls}x{mib} MiB, {mode}: server RSS growth", "MiB",
                    [growth / MIB], [one_archive / MIB], "one authenticated upload",
                    "<= 64 MiB", "abs", 64.0, [f"codes {sorted(set(codes))}"]))
    return out


# -- the directory bomb ------------------------------------------------------------------------



def zip_bomb(rounds: int, members: int, log: Callable[[str], None]) -> list[Measurement]:
    from hivemind.archive import ArchiveRules, inspect_task_archive
    from hivemind.config import ArchiveConfig
    from hivemind.errors import ArchiveRejected

    rules = ArchiveRules.from_config(ArchiveConfig())
    with tempfile.TemporaryDirectory() as d:
        bomb = directory_zip(Path(d) / "bomb.zip", members, zip64=True)
        slice_ = directory_zip(Path(d) / "slice.zip", max(1, members // 100), zip64=True)
        data = bomb.read_bytes()        # as it arrives over gRPC: bytes in memory
        times, peaks, base_t, base_peaks = [], [], [], []
        for _ in range(rounds):
            tracemalloc.start()
            t0 = time.perf_counter()
            try:
                inspect_task_archive(data, rules)
                raise AssertionError("the bomb was accepted")
            except ArchiveRejected:
                pass
            times.append((time.perf_counter() - t0) * 1000)
            peaks.append(tracemalloc.get_traced_memory()[1] / MIB)
            tracemalloc.stop()
            tracemalloc.start()
            t0 = time.perf_counter()
            with zipfile.ZipFile(slice_) as zf:
                zf.infolist()
            base_t.append((time.perf_counter() - t0) * 1000)
            base_peaks.append(tracemalloc.get_traced_memory()[1] / MIB)
            tracemalloc.stop()
    log(f"zip-bomb: refused in {statistics.median(times):.2f} ms with {max(peaks):.2f} MiB traced; "
        f"zipfile on 1 % of it: {statistics.median(base_t):.0f} ms, {max(base_peaks):.0f} MiB")
    size = f"{members} members, {len(data) // MIB} MB"
    return [
        Measurement("zip directory bomb: refusal time", "ms", times, base_t,
                    "zipfile listing 1 % of it", "<= 50 ms", "abs", 50.0, [size]),
        Measurement("zip directory bomb: refusal memory", "MiB", peaks, base_peaks,
                    "zipfile listing 1 % of it", "<= 16 MiB", "abs", 16.0, [size]),
    ]


# -- one long line -----------------------------------------------------------------------------

def long_line(mib: int, rounds: int, log: Callable[[str], None]) -> Measurement:
    from hivemind.archive import ArchiveRules
    from hivemind.config import PodmanConfig, VenvConfig
    from hivemind.devpool.testing import task_zip
    from hivemind.executors.base import Executor, Limits
    from hivemind.output import TaskOutput
    from hivemind.runner import RunnerPaths, RunnerResult, TaskRunner

    script = f'head -c {mib * MIB} /dev/zero | tr "\\0" y\necho\n'
    logger = logging.getLogger("bench.abuse")
    state = Path(tempfile.mkdtemp(prefix="hm-bench-line-"))
    state.chmod(0o755)
    ex: Executor
    svc: Any = None
    if not podman_usable():
        from hivemind.executors.podman import PodmanExecutor
        from hivemind.executors.podman_service import PodmanService

        svc = PodmanService(PodmanConfig(mode="rootful", image=IMAGE), logger,
                            rootful_socket=str(state / "p.sock"))
        svc.ensure()
        ex = PodmanExecutor(PodmanConfig(mode="rootful", image=IMAGE), "bench-line",
                            state / "podman", logger, prepare_timeout_s=120, service=svc)
    else:
        from hivemind.executors.venv import VenvExecutor

        (state / "venvs").mkdir(mode=0o755)
        ex = VenvExecutor(VenvConfig(cache_dir=str(state / "venvs")), state / "venv", logger,
                          "bench-line")
    worker, base = [], []
    try:
        for _ in range(rounds):
            task_id = f"line-{uuid.uuid4().hex[:8]}"
            task_dir = state / "tasks" / task_id
            task_dir.mkdir(parents=True)
            for p in (state / "tasks", task_dir):
                p.chmod(0o755)
            paths = RunnerPaths(task_dir / "workspace", task_dir / "output.log", task_dir / "r.zip")
            done: list[RunnerResult] = []
            runner = TaskRunner(
                task_id, executor=ex, paths=paths, archive=task_zip({"run.sh": script}),
                limits=Limits(cpus=1.0, memory_bytes=512 * MIB, timeout_s=900,
                              output_bytes=64 * MIB),
                labels={}, node_id="bench", rules=ArchiveRules(64 * MIB, 100, 64 * MIB, 200),
                max_result_bytes=256 * MIB, stop_grace_s=1, task_timeout_s=900,
                output=TaskOutput(task_id, paths.output_log, max_bytes=64 * MIB),
                advance=lambda tid, st: None, started=lambda h: None, finished=done.append,
                logger=logger, accepted_at=time.time())
            t0 = time.monotonic()
            runner.start()
            runner.join()
            worker.append(time.monotonic() - t0)
            t0 = time.monotonic()
            subprocess.run(["sh", "-c", f"( {script} ) | cat > /dev/null"], check=True,
                           stdout=subprocess.DEVNULL)
            base.append(time.monotonic() - t0)
    finally:
        close = getattr(ex, "close", None)
        if close is not None:
            close()
        if svc is not None:
            svc.close()
        subprocess.run(["rm", "-rf", str(state)])
    rate = mib / statistics.median(worker)
    log(f"long-line ({ex.name}): {mib} MiB line in {statistics.median(worker):.1f} s "
        f"({rate:.0f} MiB/s); cat {statistics.median(base):.2f} s")
    return Measurement(f"one {mib} MiB line through {ex.name}: wall time", "s", worker, base,
                       "cat of the same bytes", "reported (no target)", "ratio", 1e9,
                       [f"{rate:.0f} MiB/s through the worker"])
