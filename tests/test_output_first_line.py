"""A task's first output line is streamed at once; the lines after it wait for the batch."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from hivemind.executors.base import OutputLine
from hivemind.output import OutputStreamer, TaskOutput

LOG = logging.getLogger("test-output-first-line")


def _line(text: str, stream: str = "stdout") -> OutputLine:
    return OutputLine(time.time(), stream, text)  # type: ignore[arg-type]


def test_first_line_is_sent_without_waiting_for_the_batch(tmp_path: Path) -> None:
    sent: list[tuple[str, str]] = []
    got = threading.Event()

    def send(task_id: str, text: str) -> None:
        sent.append((task_id, text))
        got.set()

    # An hour between batches: only the urgent path can deliver within the test.
    streamer = OutputStreamer(send, 3600, 1024, LOG)
    streamer.start()
    out = TaskOutput("t1", tmp_path / "o.log")
    try:
        streamer.add(out)
        out(_line("pip says hi", stream="prepare"))
        out(_line("first"))
        assert got.wait(30), "the first line was not streamed at once"
        out(_line("second"))
        assert sent[0][0] == "t1" and "first" in sent[0][1]
        assert all("second" not in text for _, text in sent)   # batched: waits for the round
        done = threading.Event()
        streamer.finish("t1", then=done.set)
        assert done.wait(30)
        assert "".join(text for _, text in sent).endswith("second\n")
    finally:
        streamer.stop()
        out.close()


def test_a_failed_first_send_keeps_the_line_for_the_next_round(tmp_path: Path) -> None:
    attempts: list[str] = []
    tried = threading.Event()

    def send(task_id: str, text: str) -> None:
        attempts.append(text)
        tried.set()
        raise OSError("pool down")

    streamer = OutputStreamer(send, 3600, 1024, LOG)
    streamer.start()
    out = TaskOutput("t1", tmp_path / "o.log")
    try:
        streamer.add(out)
        out(_line("first"))
        assert tried.wait(30)
        deadline = time.monotonic() + 30
        while streamer.failures == 0 and time.monotonic() < deadline:   # give_back follows the raise
            time.sleep(0.01)
        batch = out.next_batch(1024)
        assert out.has_pending() and batch is not None and batch.text == "first\n"
    finally:
        streamer.stop()
        out.close()
