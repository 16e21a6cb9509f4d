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
    batch = out.next_batch(100)
    assert batch is not None
    assert batch.text.startswith("line 000\n") and len(batch.text) <= 100 and batch.text.endswith("\n")
    assert out.next_batch(100) == batch, "nothing moves before the pool acknowledged"
    text = ""
    while (b := out.next_batch(100)) is not None:
        text += b.text
        out.ack(b)
    assert text == "".join(f"line {i:03d}\n" for i in range(100))
    out.close()
    assert (tmp_path / "out.log").read_text().count("\n") == 100


def test_failed_batch_is_resent_in_order_and_nothing_twice(tmp_path: Path) -> None:
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
    done = threading.Event()
    streamer.finish("t1", then=done.set)
    streamer.flush_all()
    assert done.is_set() and "".join(sent) == "a\nb\nc\n"
    streamer.flush_all()
    assert "".join(sent) == "a\nb\nc\n"
    out.close()


def test_an_outage_at_the_end_holds_the_result_until_every_line_is_out(tmp_path: Path) -> None:
    # The bug this guards: finish() gave up after the first failed flush, and the lines printed
    # during the outage never reached the pool.
    sent: list[str] = []
    down = threading.Event()
    down.set()

    def send(task_id: str, text: str) -> None:
        if down.is_set():
            raise PoolCallFailed("UNAVAILABLE")
        sent.append(text)

    streamer = OutputStreamer(send, 0.02, 64, LOG)
    streamer.start()
    out = TaskOutput("t1", tmp_path / "o.log")
    uploaded = threading.Event()
    try:
        streamer.add(out)
        for i in range(30):
            out(line(f"l{i}"))
        out.close()
        streamer.finish("t1", then=uploaded.set)
        wait_for(lambda: streamer.failures >= 3, 10, "a few failed rounds")
        assert not uploaded.is_set(), "the result must wait for the output"
        down.clear()
        assert uploaded.wait(10)
        assert "".join(sent) == "".join(f"l{i}\n" for i in range(30))
    finally:
        streamer.stop()


def test_acknowledged_offset_survives_a_new_taskoutput(tmp_path: Path) -> None:
    """What a restarted worker sees: a fresh TaskOutput on the same log resumes after what the
    pool acknowledged, and knows the executor positions of the last lines it holds."""
    out = TaskOutput("t1", tmp_path / "output.log")
    out(OutputLine(time.time(), "stdout", "one", pos=4))
    out(OutputLine(time.time(), "stderr", "two", pos=1))
    b = out.next_batch(1024)
    assert b is not None and b.text == "one\ntwo\n"
    out.ack(b)
    out(OutputLine(time.time(), "stdout", "three", pos=10))
    # no close(): the process died, here between the position record of a next line and its
    # log line (the record names a log end the log never reached)
    out._positions.record("stdout", 99, out.bytes_written + 13)
    again = TaskOutput("t1", tmp_path / "output.log")
    assert again.positions() == {"stdout": 10, "stderr": 1}
    rest = again.next_batch(1024)
    assert rest is not None and rest.text == "three\n"
    again(OutputLine(time.time(), "stdout", "four", pos=15))
    rest = again.next_batch(1024)
    assert rest is not None and rest.text == "three\nfour\n"
    for i in range(5):                     # the log grows past the end the stale record named
        again(OutputLine(time.time(), "stdout", f"more {i}", pos=20 + i))
    third = TaskOutput("t1", tmp_path / "output.log")
    assert third.positions() == {"stdout": 24, "stderr": 1}
    assert (tmp_path / "output.pos").stat().st_size == 512, "two slots, however long the task talks"
    again.close()
    third.close()


def test_refused_output_is_given_up_after_a_few_tries(tmp_path: Path) -> None:
    calls: list[str] = []

    def send(task_id: str, text: str) -> None:
        calls.append(text)
        raise PoolRefused("Task not found")

    streamer = OutputStreamer(send, 0.05, 1024, LOG)
    out = TaskOutput("t1", tmp_path / "o.log")
    streamer.add(out)
    out(line("x"))
    done = threading.Event()
    streamer.finish("t1", then=done.set)
    for _ in range(10):
        streamer.flush_all()
    assert done.is_set() and len(calls) == 5
    out.close()


def test_an_idle_streamer_wakes_for_each_new_task(tmp_path: Path) -> None:
    # With no task followed the streamer sleeps without a deadline; add() must wake it, and its
    # periodic rounds must resume for the task's later (non-urgent) lines, task after task.
    sent: list[str] = []
    streamer = OutputStreamer(lambda task_id, text: sent.append(text), 0.02, 1024, LOG)
    streamer.start()
    try:
        for n in range(2):
            out = TaskOutput(f"t{n}", tmp_path / f"o{n}.log")
            done = threading.Event()
            streamer.add(out)
            # Preparation lines are never urgent: only a periodic round sends them.
            out(line(f"t{n}-prep", stream="prepare"))
            wait_for(lambda n=n: f"t{n}-prep" in "".join(sent), 10, "the preparation line, sent by a round")
            out(line(f"first{n}"))
            for i in range(3):
                out(line(f"t{n}-l{i}"))
            wait_for(lambda n=n: f"t{n}-l2\n" in "".join(sent), 10, "the later lines, sent by a round")
            out.close()
            streamer.finish(f"t{n}", then=done.set)
            assert done.wait(10)
            wait_for(lambda: not streamer._followed, 10, "the streamer to go idle")
    finally:
        streamer.stop()
    assert "".join(sent).count("first1\n") == 1
