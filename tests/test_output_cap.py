"""TaskOutput keeps one bounded copy of a task's output (issue 14)."""

from __future__ import annotations

from pathlib import Path

from hivemind.executors.base import OutputLine
from hivemind.output import TaskOutput

KiB = 1024


def test_the_log_stops_at_its_cap_with_a_marker(tmp_path: Path) -> None:
    journaled: list[str] = []
    out = TaskOutput("t-cap", tmp_path / "output.log", lambda tid, line: journaled.append(line.text),
                     max_bytes=64 * KiB)
    for i in range(10000):
        out(OutputLine(0.0, "stdout", f"line {i:05d} " + "x" * 100))
    out.close()
    size = (tmp_path / "output.log").stat().st_size
    assert size <= 64 * KiB
    text = (tmp_path / "output.log").read_text()
    assert text.splitlines()[-1].endswith("later output is not kept]")
    assert "line 00000" in text and "line 09999" not in text
    summary = out.summary()
    assert summary["truncated"] is True and summary["bytes"] == size
    assert summary["dropped_lines"] == 10000 - (len(text.splitlines()) - 1)
    # The journal and the stream get what the file got, no more.
    assert len(journaled) == len(text.splitlines()) - 1
    streamed = ""
    while (batch := out.next_batch(1024 * KiB)) is not None:   # the stream reads the log
        streamed += batch.text
        out.ack(batch)
    assert streamed.count("\n") == len(text.splitlines())
    assert "later output is not kept" in streamed
    # The status tail still follows the task.
    assert "line 09999" in out.tail(1)[0]


def test_a_restarted_worker_counts_what_is_already_there(tmp_path: Path) -> None:
    log = tmp_path / "output.log"
    log.write_bytes(b"x" * (60 * KiB) + b"\n")
    out = TaskOutput("t-cap2", log, max_bytes=64 * KiB)
    for _ in range(100):
        out(OutputLine(0.0, "stdout", "y" * 200))
    out.close()
    assert log.stat().st_size <= 64 * KiB
    assert out.summary()["truncated"] is True


def test_no_cap(tmp_path: Path) -> None:
    out = TaskOutput("t-nocap", tmp_path / "output.log")
    for _ in range(1000):
        out(OutputLine(0.0, "stderr", "z" * 100))
    out.close()
    assert out.summary()["truncated"] is False
    assert (tmp_path / "output.log").stat().st_size > 100 * KiB
