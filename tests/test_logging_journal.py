"""Logging setup: structured records read back from a REAL journald, stderr format, redaction.

The journal tests use the running journald, or start /lib/systemd/systemd-journald themselves
(root only) and stop exactly that PID afterwards.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hivemind.logging_setup import (
    JOURNAL_SOCKET,
    SecretRedactor,
    log_task_output,
    running_under_systemd,
    setup_logging,
)
from hivemind.secrets import Secret

JOURNALD = "/lib/systemd/systemd-journald"


def _journald_running() -> bool:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd-journal":
                return True
        except OSError:
            continue
    return False


@pytest.fixture(scope="module")
def journald() -> Iterator[None]:
    if _journald_running():
        yield
        return
    if os.geteuid() != 0 or not Path(JOURNALD).exists() or not shutil.which("journalctl"):
        pytest.skip("no journald running, and starting one needs root and systemd-journald")
    socket_dir = Path(JOURNAL_SOCKET).parent
    dir_existed = socket_dir.exists()
    proc = subprocess.Popen([JOURNALD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not Path(JOURNAL_SOCKET).exists():
            assert proc.poll() is None, "systemd-journald exited at start"
            assert time.monotonic() < deadline, "systemd-journald never created its socket"
            time.sleep(0.02)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # journald leaves its sockets behind; a stale socket would make later code think a
        # journal is listening.
        if not dir_existed:
            shutil.rmtree(socket_dir, ignore_errors=True)


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield root
    for h in [h for h in root.handlers if h.get_name() == "hivemind"]:
        root.removeHandler(h)
        h.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def journal_query(*matches: str, expect: int) -> list[dict[str, Any]]:
    """Poll journalctl until `expect` records match (journald writes asynchronously)."""
    deadline = time.monotonic() + 15
    while True:
        out = subprocess.run(["journalctl", "--no-pager", "-o", "json", *matches],
                             capture_output=True, text=True, check=False).stdout
        records = [json.loads(line) for line in out.splitlines() if line.strip()]
        if len(records) >= expect or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


@pytest.mark.usefixtures("journald")
def test_records_carry_structured_fields(root_logger: logging.Logger) -> None:
    node = f"node-{uuid.uuid4().hex[:8]}"
    task = f"t-{uuid.uuid4().hex}"
    redactor = SecretRedactor()
    redactor.register("hunter2-pool-password")
    setup_logging("debug", "journal", node, redactor=redactor)
    log = logging.getLogger("hivemind.test")
    log.info("accepted task %s with password %s", task, "hunter2-pool-password",
             extra={"task_id": task, "event": "task.accepted"})
    log.debug("a debug line")
    log.warning("plain warning")
    records = journal_query(f"NODE_ID={node}", expect=3)
    assert len(records) == 3, records
    by_msg = {r["MESSAGE"]: r for r in records}
    accepted = by_msg[f"accepted task {task} with password ***"]
    assert accepted["TASK_ID"] == task
    assert accepted["EVENT"] == "task.accepted"
    assert accepted["PRIORITY"] == "6"
    assert accepted["SYSLOG_IDENTIFIER"] == "hivemind-worker"
    assert accepted["LOGGER"] == "hivemind.test"
    assert accepted["CODE_FILE"] == __file__
    assert accepted["CODE_FUNC"] == "test_records_carry_structured_fields"
    assert int(accepted["CODE_LINE"]) > 0
    assert by_msg["a debug line"]["PRIORITY"] == "7"
    assert by_msg["plain warning"]["PRIORITY"] == "4"
    assert "TASK_ID" not in by_msg["plain warning"] and "EVENT" not in by_msg["plain warning"]
    assert not any("hunter2" in json.dumps(r) for r in records)


@pytest.mark.usefixtures("journald")
def test_task_output_is_queryable_by_task_id(root_logger: logging.Logger) -> None:
    node = f"node-{uuid.uuid4().hex[:8]}"
    task, other = f"t-{uuid.uuid4().hex}", f"t-{uuid.uuid4().hex}"
    setup_logging("info", "journal", node, redactor=SecretRedactor())
    log = logging.getLogger("hivemind.tasks")
    log_task_output(log, task, "stdout", "line one\n100% done\n")
    log_task_output(log, task, "stderr", "a warning from the task")
    log_task_output(log, other, "stdout", "someone else's line")
    log.info("worker's own message about the task", extra={"task_id": task})
    mine = journal_query(f"TASK_ID={task}", expect=4)
    assert sorted(r["MESSAGE"] for r in mine) == sorted(
        ["line one", "100% done", "a warning from the task", "worker's own message about the task"])
    outs = journal_query(f"TASK_ID={task}", "HIVEMIND_OUTPUT=stdout", expect=2)
    assert [r["MESSAGE"] for r in outs] == ["line one", "100% done"]
    errs = journal_query(f"TASK_ID={task}", "HIVEMIND_OUTPUT=stderr", expect=1)
    assert [r["MESSAGE"] for r in errs] == ["a warning from the task"]
    own = [r for r in mine if "HIVEMIND_OUTPUT" not in r]
    assert [r["MESSAGE"] for r in own] == ["worker's own message about the task"]


@pytest.mark.usefixtures("journald")
def test_exception_traceback_is_journaled_and_redacted(root_logger: logging.Logger) -> None:
    node = f"node-{uuid.uuid4().hex[:8]}"
    redactor = SecretRedactor()
    redactor.register(Secret("s3cr3t-token-value"))
    setup_logging("info", "journal", node, redactor=redactor)
    try:
        raise RuntimeError("login failed with s3cr3t-token-value")
    except RuntimeError:
        logging.getLogger("hivemind.pool").exception("pool call failed", extra={"event": "pool.error"})
    (rec,) = journal_query(f"NODE_ID={node}", expect=1)
    assert rec["MESSAGE"].startswith("pool call failed\nTraceback")
    assert "RuntimeError: login failed with ***" in rec["MESSAGE"]
    assert rec["PRIORITY"] == "3" and rec["EVENT"] == "pool.error"


def test_stderr_target_one_line_format(root_logger: logging.Logger) -> None:
    buf = io.StringIO()
    redactor = SecretRedactor()
    redactor.register("pw-123456")
    setup_logging("info", "stderr", "n1", redactor=redactor, stream=buf)
    log = logging.getLogger("hivemind.daemon")
    log.info("started with %s", "pw-123456", extra={"event": "worker.started"})
    log_task_output(log, "t1", "stderr", "oops 50%s")
    log.debug("hidden at info")
    lines = buf.getvalue().splitlines()
    # Task output reaches the stderr target only at debug level (issue 14).
    assert len(lines) == 1
    assert lines[0].endswith(" INFO hivemind.daemon [event=worker.started] started with ***")
    buf = io.StringIO()
    setup_logging("debug", "stderr", "n1", redactor=redactor, stream=buf)
    log_task_output(log, "t1", "stderr", "oops 50%s")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(" INFO hivemind.daemon [task=t1 output=stderr] oops 50%s")


def test_setup_twice_replaces_its_handler(root_logger: logging.Logger) -> None:
    before = len(root_logger.handlers)
    setup_logging("info", "stderr", "n1", stream=io.StringIO())
    setup_logging("warning", "stderr", "n1", stream=io.StringIO())
    assert len(root_logger.handlers) == before + 1
    assert root_logger.level == logging.WARNING


def test_auto_target_uses_journal_only_under_systemd(tmp_path: Path) -> None:
    sock = tmp_path / "socket"
    assert not running_under_systemd({"INVOCATION_ID": "abc"}, str(sock))
    sock.touch()
    assert running_under_systemd({"INVOCATION_ID": "abc"}, str(sock))
    assert not running_under_systemd({}, str(sock))
    with open(tmp_path / "stderr", "w") as f, open(tmp_path / "elsewhere", "w") as g:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert running_under_systemd(env, str(sock), stderr_fd=f.fileno())
        # Inherited by a process whose stderr was redirected elsewhere: not the journal.
        assert not running_under_systemd(env, str(sock), stderr_fd=g.fileno())


def test_auto_target_falls_back_to_stderr(root_logger: logging.Logger, tmp_path: Path) -> None:
    buf = io.StringIO()
    setup_logging("info", "auto", "n1", environ={"INVOCATION_ID": "x"},
                  journal_socket=str(tmp_path / "missing"), stream=buf)
    logging.getLogger("hivemind").info("to stderr")
    assert buf.getvalue().endswith("INFO hivemind to stderr\n")


def test_redactor_rules() -> None:
    r = SecretRedactor()
    r.register("abc")
    r.register("abcdef")
    r.register("  ")
    r.register(Secret(""))
    assert r.redact("x abcdef y abc") == "x *** y ***"
    rec = logging.LogRecord("n", logging.INFO, __file__, 1, "bad %d format", ("abc",), None)
    assert r.filter(rec)
    assert rec.getMessage() == "bad %d format"
    rec = logging.LogRecord("n", logging.INFO, __file__, 1, "%s-%s", ("abc", "abcdef"), None)
    r.filter(rec)
    assert rec.getMessage() == "***-***" and rec.args is None


def test_invalid_stream_and_target() -> None:
    with pytest.raises(ValueError):
        log_task_output(logging.getLogger("x"), "t", "stdin", "x")
    with pytest.raises(ValueError):
        setup_logging("info", "syslog", "n1")
