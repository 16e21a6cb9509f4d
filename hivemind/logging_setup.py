"""Where the worker's log records go: journald with structured fields, or stderr in one line each.

Every record carries, in the journal: PRIORITY, SYSLOG_IDENTIFIER=hivemind-worker, NODE_ID,
CODE_FILE/CODE_LINE/CODE_FUNC, LOGGER, and when given with `extra=`: TASK_ID (`task_id`) and
EVENT (`event`, e.g. "task.accepted"). Task output goes through `log_task_output`, which adds
HIVEMIND_OUTPUT=stdout|stderr so `journalctl TASK_ID=<id> HIVEMIND_OUTPUT=stdout` finds a task's
output and nothing else.

Secrets registered with `register_secret` are replaced in every record's message (and traceback)
before any handler formats it: defence in depth behind secrets.Secret's own repr.

Task output is the task's, so it is hostile text: control characters (terminal escape sequences,
carriage returns) are shown as `\x1b`-style escapes in both targets, and the stderr target
carries task output only at debug level (a task printing gigabytes must not make the worker's
own log as big; the journal keeps every line, with its HIVEMIND_OUTPUT field).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hivemind.secrets import Secret

SYSLOG_IDENTIFIER = "hivemind-worker"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
REDACTED = "***"
OUTPUT_STREAMS = ("stdout", "stderr")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
# syslog priorities, as journald stores them.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))

JournalSend = Callable[..., None]

# C0 controls but tab and newline (a traceback keeps its lines), DEL, and C1 controls.
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))
                    if c not in (0x09, 0x0A)}


def neutralise_controls(text: str) -> str:
    """`text` with every control character shown as an escape (so it can't drive a terminal)."""
    return text.translate(_CONTROL_ESCAPES)


class OutputAtDebugOnly(logging.Filter):
    """Drops task output records (those with `hivemind_output`) unless debug logging is on."""

    def __init__(self, debug: bool) -> None:
        super().__init__()
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        return self.debug or getattr(record, "hivemind_output", None) is None


class SecretRedactor(logging.Filter):
    """Replaces registered secret values in a record's message, arguments and traceback."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._values: tuple[str, ...] = ()

    def register(self, value: str | Secret) -> None:
        text = value.reveal() if isinstance(value, Secret) else value
        text = text.strip()
        if not text:
            return
        with self._lock:
            if text not in self._values:
                # Longest first, so a secret that contains another is replaced whole.
                self._values = tuple(sorted((*self._values, text), key=len, reverse=True))

    def redact(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._values:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep the raw template, not the arguments
            message = str(record.msg)
        record.msg = self.redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


# The process-wide redactor: secrets are registered where they are read (config loading), far
# from where logging is set up, and a record from any logger must be covered.
DEFAULT_REDACTOR = SecretRedactor()


def register_secret(value: str | Secret, redactor: SecretRedactor | None = None) -> None:
    """Never let `value` appear in a log record from now on."""
    (redactor or DEFAULT_REDACTOR).register(value)


def _priority(levelno: int) -> int:
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return 7


class JournalFieldsHandler(logging.Handler):
    """Sends each record to journald with the worker's structured fields."""

    def __init__(self, node_id: str, send: JournalSend | None = None,
                 identifier: str = SYSLOG_IDENTIFIER) -> None:
        super().__init__()
        if send is None:
            from systemd import journal  # imported here: only the journal target needs libsystemd

            send = journal.send
        self._send = send
        self._node_id = node_id
        self._identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                message = f"{message}\n{record.exc_text}"
            message = neutralise_controls(message)
            fields: dict[str, Any] = {
                "PRIORITY": str(_priority(record.levelno)),
                "SYSLOG_IDENTIFIER": self._identifier,
                "NODE_ID": self._node_id,
                "LOGGER": record.name,
                "CODE_FILE": record.pathname,
                "CODE_LINE": record.lineno,  # journal.send formats it as an integer
                "CODE_FUNC": record.funcName,
                "THREAD_NAME": record.threadName or "",
            }
            for attr, field in (("task_id", "TASK_ID"), ("event", "EVENT"),
                                ("hivemind_output", "HIVEMIND_OUTPUT")):
                value = getattr(record, attr, None)
                if value is not None:
                    fields[field] = str(value)
            self._send(message, **fields)
        except Exception:
            self.handleError(record)


class OneLineFormatter(logging.Formatter):
    """`2026-01-31 12:00:00,123 INFO hivemind.daemon [task=t1 event=task.accepted] message`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(context)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"{label}={getattr(record, attr)}" for attr, label in
                 (("task_id", "task"), ("event", "event"), ("hivemind_output", "output"))
                 if getattr(record, attr, None) is not None]
        record.context = f" [{' '.join(parts)}]" if parts else ""
        return neutralise_controls(super().format(record))


def running_under_systemd(environ: Mapping[str, str], journal_socket: str = JOURNAL_SOCKET,
                          stderr_fd: int | None = None) -> bool:
    """True when systemd started us (INVOCATION_ID, or JOURNAL_STREAM naming our stderr) and the
    journal's socket exists to take structured records."""
    if not Path(journal_socket).exists():
        return False
    if environ.get("INVOCATION_ID"):
        return True
    stream = environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno() if stderr_fd is None else stderr_fd)
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def setup_logging(level: str, target: str, node_id: str, *,
                  environ: Mapping[str, str] | None = None,
                  journal_socket: str = JOURNAL_SOCKET,
                  redactor: SecretRedactor | None = None,
                  stream: Any = None,
                  journal_send: JournalSend | None = None) -> None:
    """Configure the root logger. `level`: debug|info|warning|error; `target`: auto|journal|stderr
    (auto = journal when running under systemd with a journal, else stderr). Calling it again
    (on reload) replaces the handler it installed before."""
    env = os.environ if environ is None else environ
    if target == "auto":
        target = "journal" if running_under_systemd(env, journal_socket) else "stderr"
    if target not in ("journal", "stderr"):
        raise ValueError(f"logging target {target!r}: choose auto, journal or stderr")
    handler: logging.Handler
    if target == "journal":
        handler = JournalFieldsHandler(node_id, send=journal_send)
    else:
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
        handler.setFormatter(OneLineFormatter())
        handler.addFilter(OutputAtDebugOnly(level == "debug"))
    handler.addFilter(redactor or DEFAULT_REDACTOR)
    handler.set_name("hivemind")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "hivemind"]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))


def log_task_output(logger: logging.Logger, task_id: str, stream: str, text: str) -> None:
    """Journal a task's output, one record per line, tagged TASK_ID and HIVEMIND_OUTPUT."""
    if stream not in OUTPUT_STREAMS:
        raise ValueError(f"stream {stream!r}: expected stdout or stderr")
    # Both streams at INFO: tasks write progress to stderr routinely; the field tells them apart.
    # (The stderr target drops these unless debug logging is on: OutputAtDebugOnly.)
    if not logger.isEnabledFor(logging.INFO):
        return
    extra = {"task_id": task_id, "hivemind_output": stream}
    for line in text.splitlines():
        # "%s" keeps a task's own "%" characters from being read as a format string.
        logger.info("%s", line, extra=extra)
