"""Task output: each line goes to the task's log file (for the result archive), to a bounded
in-memory tail (for the status API), and into a batch that is streamed to the pool about once a
second. A task's first output line is streamed at once instead (dispatch latency is measured to
it); batching starts after it. A slow or absent pool never blocks a task: batches are bounded and
the oldest text is dropped from the stream (never from the log file, which the result carries
whole).

The log file is the one copy of a task's output on disk, and it is capped (`max_bytes`,
executor.max_output_mb): past the cap a marker line says so, later lines are counted but kept
nowhere (not in the file, not in the stream, not in the journal), and `summary()` reports it for
the task record. Only the in-memory tail goes on following the task."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from hivemind.executors.base import OutputLine

TAIL_LINES = 200
PENDING_LIMIT_BYTES = 1024 * 1024
# Room kept under the cap for the marker line, so the file never passes the cap.
MARKER_RESERVE_BYTES = 256


class TaskOutput:
    """The output of one task. Thread-safe: executors' reader threads call `__call__`.
    `max_bytes` caps the log file (0: no cap)."""

    def __init__(self, task_id: str, log_path: Path, on_line: Callable[[str, OutputLine], None] | None = None,
                 max_bytes: int = 0) -> None:
        self.task_id = task_id
        self.log_path = log_path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fh: IO[bytes] | None = log_path.open("ab")
        # A restarted worker appends to what an earlier one wrote: that counts toward the cap.
        self.bytes_written = self._fh.tell()
        self.truncated = False
        self.dropped_lines = 0
        self.dropped_bytes = 0
        self._tail: collections.deque[OutputLine] = collections.deque(maxlen=TAIL_LINES)
        self._stamp_second = -1
        self._stamp_text = ""
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._dropped = 0
        self._on_line = on_line
        # Set by the streamer: asks it to flush now (the task's first line must not wait a batch).
        self.on_urgent: Callable[[TaskOutput], None] | None = None
        self.first_line_at: float | None = None
        self.lines = 0

    def _stamp(self, ts: float) -> str:
        second = int(ts)
        if second != self._stamp_second:   # one strftime per second, not per line
            self._stamp_second = second
            self._stamp_text = time.strftime("%H:%M:%S", time.localtime(ts))
        return self._stamp_text

    def _record(self, line: OutputLine) -> str:
        stamp = self._stamp(line.ts)
        return f"[{stamp}] {line.text}" if line.stream != "prepare" else f"[{stamp}] (prepare) {line.text}"

    def __call__(self, line: OutputLine) -> None:
        text = line.text
        if self.truncated:
            # Past the cap (a flood): count the line and keep it for the tail, nothing else.
            with self._lock:
                self.lines += 1
                self.dropped_lines += 1
                self.dropped_bytes += len(text) + 12
                self._tail.append(line)
            return
        urgent = False
        keep = True
        with self._lock:
            record = self._record(line)
            data = (record + "\n").encode("utf-8", errors="replace")
            if self.first_line_at is None and line.stream != "prepare":
                self.first_line_at = line.ts
                urgent = True
            self.lines += 1
            self._tail.append(line)
            if self.truncated or not self._fits(len(data)):
                self.dropped_lines += 1
                self.dropped_bytes += len(data)
                if self.truncated:
                    return
                self.truncated, keep = True, False
                text = (f"[hivemind: output truncated: the log reached its cap of "
                        f"{self.max_bytes} bytes; later output is not kept]")
                data = (f"[{self._stamp(line.ts)}] {text}\n").encode()
            if self._fh is not None:
                self._fh.write(data)
                self._fh.flush()
                self.bytes_written += len(data)
            self._pending.append(text + "\n")
            self._pending_bytes += len(text) + 1
            while self._pending_bytes > PENDING_LIMIT_BYTES and len(self._pending) > 1:
                dropped = self._pending.pop(0)
                self._pending_bytes -= len(dropped)
                self._dropped += 1
        if urgent and self.on_urgent is not None:
            self.on_urgent(self)
        if keep and self._on_line is not None:
            self._on_line(self.task_id, line)

    def _fits(self, size: int) -> bool:
        return not self.max_bytes or self.bytes_written + size <= self.max_bytes - MARKER_RESERVE_BYTES

    def summary(self) -> dict[str, int | bool]:
        """For the task record: how much output was kept, and whether the cap cut it."""
        with self._lock:
            return {"bytes": self.bytes_written, "cap_bytes": self.max_bytes,
                    "truncated": self.truncated, "dropped_lines": self.dropped_lines,
                    "dropped_bytes": self.dropped_bytes}

    def take_batch(self, max_bytes: int) -> str:
        """Up to max_bytes of text not yet streamed (whole lines unless one line is longer)."""
        with self._lock:
            out: list[str] = []
            size = 0
            if self._dropped:
                out.append(f"[hivemind: {self._dropped} lines not streamed; they are in the result]\n")
                size += len(out[0])
                self._dropped = 0
            while self._pending and (size + len(self._pending[0]) <= max_bytes or not out):
                item = self._pending.pop(0)
                if len(item) > max_bytes:
                    item, rest = item[:max_bytes], item[max_bytes:]
                    self._pending.insert(0, rest)
                self._pending_bytes -= len(item)
                size += len(item)
                out.append(item)
            return "".join(out)

    def give_back(self, text: str) -> None:
        """Put an unsent batch back at the front (the pool call failed)."""
        with self._lock:
            self._pending.insert(0, text)
            self._pending_bytes += len(text)

    def has_pending(self) -> bool:
        with self._lock:
            return bool(self._pending) or self._dropped > 0

    def tail(self, n: int = 50) -> list[str]:
        with self._lock:
            return [self._record(line) for line in list(self._tail)[-n:]]

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


class OutputStreamer:
    """One thread that flushes every task's pending output to the pool at a fixed interval, and a
    task's output at once when it asks (its first line)."""

    def __init__(self, send: Callable[[str, str], None], interval_s: float, batch_max_bytes: int,
                 logger: logging.Logger) -> None:
        self._send = send
        self._interval = interval_s
        self._batch = batch_max_bytes
        self._log = logger
        self._outputs: dict[str, TaskOutput] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._urgent: list[TaskOutput] = []
        self._thread = threading.Thread(target=self._loop, name="output-streamer", daemon=True)
        self.failures = 0

    def start(self) -> None:
        self._thread.start()

    def add(self, out: TaskOutput) -> None:
        with self._lock:
            self._outputs[out.task_id] = out
        out.on_urgent = self._flush_soon

    def _flush_soon(self, out: TaskOutput) -> None:
        # Called from an executor's reader thread: hand over to the streamer thread, never send here.
        with self._lock:
            self._urgent.append(out)
        self._wake.set()

    def finish(self, task_id: str, timeout: float = 5.0) -> None:
        """Flush what's left of a task's output, then stop following it."""
        with self._lock:
            out = self._outputs.get(task_id)
        deadline = time.monotonic() + timeout
        while out is not None and out.has_pending() and time.monotonic() < deadline:
            if not self._flush_one(out):
                break
        with self._lock:
            self._outputs.pop(task_id, None)

    def flush_all(self) -> None:
        with self._lock:
            outputs = list(self._outputs.values())
        for out in outputs:
            self._flush_one(out)

    def _flush_one(self, out: TaskOutput) -> bool:
        text = out.take_batch(self._batch)
        if not text:
            return True
        try:
            self._send(out.task_id, text)
            return True
        except Exception as exc:  # the pool may be down; the text goes back and is retried
            out.give_back(text)
            self.failures += 1
            self._log.debug("output upload for %s failed: %s", out.task_id, exc,
                            extra={"task_id": out.task_id, "event": "output.upload_failed"})
            return False

    def _loop(self) -> None:
        next_round = time.monotonic() + self._interval
        while not self._stop.is_set():
            self._wake.wait(max(0.0, next_round - time.monotonic()))
            # Cleared before the swap below: a request made after the swap sets it again.
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                urgent, self._urgent = self._urgent, []
            for out in urgent:
                self._flush_one(out)
            if time.monotonic() >= next_round:
                self.flush_all()
                next_round = time.monotonic() + self._interval

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
