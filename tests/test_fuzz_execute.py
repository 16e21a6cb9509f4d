"""Hypothesis-generated ExecuteTask requests against a running server over a real socket.

Every call must be answered with success or a clear refusal (never an RPC error, never
"internal error"), and the server must stay up and leak nothing.

The target is injectable: by default a worker server in legacy mode with an acceptor that really
extracts the archive; set HIVEMIND_FUZZ_TARGET=package.module:factory to aim the same test at
something else (the real daemon). `factory` is a context manager yielding a FuzzTarget.
HIVEMIND_FUZZ_EXAMPLES=N sets the number of cases (default 200).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import math
import os
import re
import shutil
import threading
import uuid
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hivemind._proto import nodepool_pb2, nodepool_pb2_grpc
from hivemind.config import ServerAuthConfig, ServerConfig
from hivemind.errors import HivemindError
from hivemind.server import Decision, ExecuteRequest, start_worker_server
from hivemind.server.service import MAX_GB, MAX_SCORE, check_task_id

LOG = logging.getLogger("test.fuzz_execute")
VALID_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
EXAMPLES = int(os.environ.get("HIVEMIND_FUZZ_EXAMPLES", "200"))


@dataclass
class FuzzTarget:
    channel: grpc.Channel
    leak_check: Callable[[], None]            # raises AssertionError on a leak
    metadata: tuple[tuple[str, str], ...] = ()


class ExtractingAcceptor:
    """Does the real work of admission: validate the id, extract the archive, clean up."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.accepted = 0

    def execute(self, request: ExecuteRequest) -> Decision:
        check_task_id(request.task_id)
        dest = self.scratch / uuid.uuid4().hex
        try:
            _extract(request.task_zip, dest)
        except HivemindError as exc:
            return Decision(False, str(exc))
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        self.accepted += 1
        return Decision(True, "accepted")

    def stop(self, task_id: str, peer: str) -> Decision:
        return Decision(False, "no such task")


def _extract(data: bytes, dest: Path) -> None:
    try:
        archive = importlib.import_module("hivemind.archive")
    except ImportError:
        _zipfile_check(data)
        return
    rules = archive.ArchiveRules(max_archive_bytes=4 << 20, max_members=200,
                                 max_uncompressed_bytes=16 << 20, max_ratio=200.0)
    archive.extract_task_archive(data, dest, rules)


def _zipfile_check(data: bytes) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                if info.filename.startswith("/") or ".." in info.filename.split("/"):
                    raise HivemindError(f"unsafe member name {info.filename[:40]!r}")
            if zf.testzip() is not None:
                raise HivemindError("corrupt member")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError,
            NotImplementedError) as exc:
        raise HivemindError(f"not a zip archive: {type(exc).__name__}") from None


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def default_target(scratch: Path) -> Iterator[FuzzTarget]:
    acceptor = ExtractingAcceptor(scratch)
    cfg = ServerConfig(listen_host="127.0.0.1", port=0, max_message_mb=8,
                       auth=ServerAuthConfig(mode="legacy", legacy_allowed_peers=["127.0.0.1"]))
    server = start_worker_server(cfg, acceptor, logger=LOG, max_workers=4)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    grpc.channel_ready_future(channel).result(timeout=10)
    fds, threads = _open_fds(), threading.active_count()

    def leak_check() -> None:
        assert server.healthy(), "server stopped answering"
        assert list(scratch.iterdir()) == [], "extraction left files behind"
        # Slack for grpc's lazily started pollers and connections; a per-call leak exceeds it.
        assert _open_fds() <= fds + 16, f"fds grew from {fds} to {_open_fds()}"
        assert threading.active_count() <= threads + 8

    try:
        yield FuzzTarget(channel, leak_check)
    finally:
        channel.close()
        server.stop(None)


@pytest.fixture
def execute_target(tmp_path: Path) -> Iterator[FuzzTarget]:
    spec = os.environ.get("HIVEMIND_FUZZ_TARGET")
    if spec:
        module, _, name = spec.partition(":")
        factory = getattr(importlib.import_module(module), name)
        with factory() as target:
            yield target
        return
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with default_target(scratch) as target:
        yield target


# --- strategies ---------------------------------------------------------------------------

task_ids = st.one_of(
    st.from_regex(VALID_ID, fullmatch=True),
    st.text(max_size=300),
    st.text(alphabet="/\\.\x00-_a\u00e9\u4e2d\U0001f600 \n", max_size=40),
    st.sampled_from(["", ".", "..", "-rf", "a/../b", "/etc/passwd", "a\x00b", "x" * 129,
                     "x" * 10_000, "\u202e", "task\r\nINFO forged"]),
)
scores = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1e5))
gigabytes = st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(0, 64))

member_names = st.one_of(
    st.text(alphabet="abc./\\_-\u00e9", min_size=1, max_size=30),
    st.sampled_from(["run.py", "../evil", "/abs", "a/../../b", "dir/", "a\x00b", "CON", "."]),
)


@st.composite
def zips(draw: st.DrawFn) -> bytes:
    buf = io.BytesIO()
    method = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name in draw(st.lists(member_names, max_size=6)):
            info = zipfile.ZipInfo(name)
            mode = draw(st.sampled_from([0o644, 0o755, 0o120777, 0o040755, 0o010644]))
            info.external_attr = mode << 16
            info.compress_type = method
            # Big zero runs trip the ratio rule when deflated; stored ones stay small enough
            # that six of them fit the target's 8 MiB message limit.
            big = 3 << 20 if method == zipfile.ZIP_DEFLATED else 1 << 20
            data = draw(st.one_of(st.binary(max_size=200),
                                  st.integers(1, big).map(lambda n: bytes(n))))
            with warnings.catch_warnings(), contextlib.suppress(ValueError):
                warnings.simplefilter("ignore")   # duplicate names are part of the point
                zf.writestr(info, data)
    raw = buf.getvalue()
    mangle = draw(st.sampled_from(["none", "truncate", "flip", "prefix"]))
    if mangle == "truncate" and raw:
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif mangle == "flip" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1:]
    elif mangle == "prefix":
        raw = draw(st.binary(max_size=64)) + raw
    return raw


archives = st.one_of(
    zips(),
    st.binary(max_size=2048),
    st.sampled_from([b"", b"PK", b"PK\x03\x04", b"PK\x05\x06" + bytes(18)]),
)


@st.composite
def clean_zips(draw: st.DrawFn) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("run.py", "print('hi')\n")
        for name in draw(st.lists(st.from_regex(r"[a-z]{1,8}(/[a-z]{1,8})?\.txt", fullmatch=True),
                                  max_size=3, unique=True)):
            zf.writestr(name, draw(st.binary(max_size=100)))
    return buf.getvalue()


@st.composite
def requests(draw: st.DrawFn) -> nodepool_pb2.ExecuteTaskRequest:
    # A plausible request with at most one wild field (or all of them): a missing check on any
    # single field then shows up as an acceptance of a request that breaks a rule.
    wild = draw(st.sampled_from(["none", "id", "zip", "cpu", "gpu", "mem", "gmem", "all"]))

    def pick(field: str, plausible: st.SearchStrategy[Any],
             anything: st.SearchStrategy[Any]) -> Any:
        return draw(anything if wild in (field, "all") else plausible)

    return nodepool_pb2.ExecuteTaskRequest(
        task_id=pick("id", st.from_regex(VALID_ID, fullmatch=True), task_ids),
        task_zip=pick("zip", clean_zips(), archives),
        cpu_usage=pick("cpu", st.floats(0, 1e5), scores),
        gpu_usage=pick("gpu", st.floats(0, 1e5), scores),
        memory_gb=pick("mem", st.integers(0, 64), gigabytes),
        gpu_memory_gb=pick("gmem", st.integers(0, 64), gigabytes),
    )


def _expect_refused(task_id: str, cpu: float, gpu: float, mem: int, gmem: int,
                    archive: bytes) -> bool:
    def bad_score(x: float) -> bool:
        return not math.isfinite(x) or x < 0 or x > MAX_SCORE
    return (VALID_ID.fullmatch(task_id) is None or not archive or bad_score(cpu)
            or bad_score(gpu) or not 0 <= mem <= MAX_GB or not 0 <= gmem <= MAX_GB)


def check_execute_fuzz(target: FuzzTarget, examples: int) -> Counter[str]:
    """The property, reusable against any target; returns how many were accepted/refused."""
    outcomes: Counter[str] = Counter()
    stub = nodepool_pb2_grpc.WorkerNodeServiceStub(target.channel)  # type: ignore[no-untyped-call]

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(request=requests())
    def one(request: nodepool_pb2.ExecuteTaskRequest) -> None:
        # Values as the server sees them (float fields are 32-bit on the wire).
        sent = nodepool_pb2.ExecuteTaskRequest.FromString(request.SerializeToString())
        response = stub.ExecuteTask(request, metadata=target.metadata, timeout=30)
        assert response.message, "an answer without a message"
        assert response.message != "internal error", "the acceptor crashed"
        assert len(response.message) <= 1000
        outcomes["accepted" if response.success else "refused"] += 1
        if _expect_refused(sent.task_id, sent.cpu_usage, sent.gpu_usage, sent.memory_gb,
                           sent.gpu_memory_gb, sent.task_zip):
            assert not response.success, f"accepted a request that breaks a rule: {response}"

    one()
    target.leak_check()
    LOG.info("fuzz outcomes: %s", dict(outcomes))
    return outcomes


def test_execute_fuzz(execute_target: FuzzTarget) -> None:
    outcomes = check_execute_fuzz(execute_target, EXAMPLES)
    if not os.environ.get("HIVEMIND_FUZZ_TARGET") and EXAMPLES >= 100:
        # The generators must reach the acceptor's success path, not only cheap refusals.
        assert outcomes["accepted"] > 0 and outcomes["refused"] > 0, outcomes


def test_leak_check_can_fail(tmp_path: Path) -> None:
    """The default target's leak check notices a leftover, so a pass means something."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with default_target(scratch) as target:
        target.leak_check()
        (scratch / "left-behind").mkdir()
        with pytest.raises(AssertionError, match="left files behind"):
            target.leak_check()
