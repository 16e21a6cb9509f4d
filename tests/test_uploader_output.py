"""Result uploads (retry, give up on refusals, never early) and output batching, with fake pools."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from hivemind.executors.base import OutputLine
from hivemind.output import OutputStreamer, TaskOutput
from hivemind.pool.client import PoolCallFailed, PoolRefused
from hivemind.uploader import PendingResult, ResultUploader

from e2e import wait_for

LOG = logging.getLogger("test")


class FlakyPool:
    def __init__(self, fail_times: int, exc: Exception) -> None:
        self.fail_times = fail_times
        self.exc = exc
        self.calls: list[tuple[str, float]] = []
        self.lock = threading.Lock()

    def upload(self, task_id: str, path: Path) -> None:
        with self.lock:
            self.calls.append((task_id, time.time()))
            if len(self.calls) <= self.fail_times:
                raise self.exc


def test_unreachable_pool_is_retried_until_delivered(tmp_path: Path) -> None:
    pool = FlakyPool(3, PoolCallFailed("down"))
    delivered: list[str] = []
    up = ResultUploader(pool.upload, delivered.append, LOG)
    up.start()
    try:
        up.submit(PendingResult("t1", tmp_path / "r.zip", time.time()))
        wait_for(lambda: delivered == ["t1"], 20, "delivery after retries")
        assert len(pool.calls) == 4 and up.pending() == 0 and up.failures == 3
    finally:
        up.stop()


def test_never_uploads_before_not_before(tmp_path: Path) -> None:
    pool = FlakyPool(0, PoolCallFailed("x"))
    delivered: list[str] = []
    up = ResultUploader(pool.upload, delivered.append, LOG)
    up.start()
    try:
        not_before = time.time() + 1.0
        up.submit(PendingResult("t1", tmp_path / "r.zip", not_before))
        wait_for(lambda: delivered, 10, "delivery")
        assert pool.calls[0][1] >= not_before
    finally:
        up.stop()


def test_refused_result_is_given_up_after_max_refusals(tmp_path: Path) -> None:
    pool = FlakyPool(100, PoolRefused("unknown task"))
    given_up: list[tuple[str, str]] = []
    up = ResultUploader(pool.upload, lambda t: None, LOG, max_refusals=2,
                        on_given_up=lambda t, why: given_up.append((t, why)))
    up.start()
    try:
        up.submit(PendingResult("t9", tmp_path / "r.zip", time.time()))
        wait_for(lambda: given_up, 20, "give up")
        assert given_up == [("t9", "unknown task")] and len(pool.calls) == 2 and up.pending() == 0
    finally:
        up.stop()


def line(text: str, stream: str = "stdout") -> OutputLine:
    return OutputLine(time.time(), stream, text)


def test_output_batches_are_bounded_and_whole_lines(tmp_path: Path) -> None:
    out = TaskOutput("t1", tmp_path / "out.log")
    for i in range(100):
        out(line(f"line {i:03d}"))
    batch = out.take_batch(100)
    assert batch.startswith("line 000\n") and len(batch) <= 100 and batch.endswith("\n")
    rest = ""
    while out.has_pending():
        rest += out.take_batch(100)
    assert (batch + rest).count("\n") == 100
    out.close()
    assert (tmp_path / "out.log").read_text().count("\n") == 100


def test_failed_batch_goes_back_in_front(tmp_path: Path) -> None:
    sent: list[str] = []
    fail = {"on": True}

    def send(task_id: str, text: str) -> None:
        if fail["on"]:
            raise PoolCallFailed("down")
        sent.append(text)

    out = TaskOutput("t1", tmp_path / "o.log")
    streamer = OutputStreamer(send, 0.05, 1024, LOG)
    streamer.add(out)
    out(line("a"))
    out(line("b"))
    streamer.flush_all()
    assert sent == [] and out.has_pending()
    fail["on"] = False
    out(line("c"))
    streamer.finish("t1")
    assert "".join(sent) == "a\nb\nc\n"
    out.close()


def test_stream_drops_oldest_beyond_limit_but_log_keeps_all(tmp_path: Path) -> None:
    out = TaskOutput("t1", tmp_path / "o.log")
    big = "x" * 1000
    for _ in range(3000):  # ~3 MB against a 1 MiB stream buffer
        out(line(big))
    first = out.take_batch(10_000)
    assert first.startswith("[hivemind:") and "not streamed" in first
    out.close()
    assert (tmp_path / "o.log").read_text().count("\n") == 3000
