"""The worker's own log doesn't repeat task output on stderr (except at debug) and never passes
a task's control characters through (issue 14)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from hivemind.logging_setup import log_task_output, setup_logging

ESCAPE = "\x1b]0;owned\x07\x1b[2J\rfake line"


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)
    root.setLevel(level)


def test_stderr_target_drops_task_output_below_debug(restore_root: None) -> None:
    buf = io.StringIO()
    setup_logging("info", "stderr", "node-1", stream=buf)
    task = logging.getLogger("hivemind.task")
    for i in range(1000):
        log_task_output(task, "t-1", "stdout", f"output line {i}")
    logging.getLogger("hivemind.daemon").info("task %s ended", "t-1")
    assert "output line" not in buf.getvalue()
    assert buf.getvalue().count("\n") == 1


def test_stderr_target_at_debug_shows_output_escaped(restore_root: None) -> None:
    buf = io.StringIO()
    setup_logging("debug", "stderr", "node-1", stream=buf)
    log_task_output(logging.getLogger("hivemind.task"), "t-2", "stderr", ESCAPE)
    logging.getLogger("hivemind.daemon").warning("peer said %r", "\x1b[31m")
    text = buf.getvalue()
    assert "fake line" in text and "[task=t-2" in text
    assert not any(ord(c) < 0x20 and c != "\n" for c in text), repr(text)
    assert "\\x1b]0;owned\\x07" in text


def test_journal_keeps_every_output_line_without_control_characters(restore_root: None) -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    setup_logging("info", "journal", "node-1",
                  journal_send=lambda message, **fields: sent.append((message, fields)))
    task = logging.getLogger("hivemind.task")
    for i in range(5):
        log_task_output(task, "t-3", "stdout", f"{ESCAPE} {i}")
    out = [(m, f) for m, f in sent if f.get("HIVEMIND_OUTPUT") == "stdout"]
    assert len(out) == 10        # splitlines() splits at the \r too
    assert all("\x1b" not in m and "\r" not in m for m, _ in out)
    assert out[0][1]["TASK_ID"] == "t-3"
