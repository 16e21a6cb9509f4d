"""Task output: each line goes to the task's log file on disk, to a bounded in-memory tail (for the
status API), and from the log file to the pool, about once a second. A task's first output line is
streamed at once instead (dispatch latency is measured to it); batching starts after it.

The log file is the stream's buffer: the streamer sends what lies between the offset the pool has
acknowledged (persisted next to the log, in `output.acked`) and the end of the file, in order, and
moves the offset only after the pool said yes. So an outage or a restart loses nothing and sends
nothing twice (a crash between the pool's answer and the offset's write resends one batch at
most); a slow pool never blocks a task, it only lets the unsent part grow on disk.

Executors may stamp each line with its position in their own source (`OutputLine.pos`: a byte
offset or a line count per stream). The last position of each stream is written to `output.pos`
with the line, so after a restart an executor resumes right after the last line the log holds
(`TaskOutput.positions()`), neither skipping nor repeating any.

The log file is the one copy of a task's output on disk, and it is capped (`max_bytes`,
executor.max_output_mb): past the cap a marker line says so, later lines are counted but kept
nowhere (not in the file, not in the stream, not in the journal), and `summary()` reports it for
the task record. Only the in-memory tail goes on following the task.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from hivemind import faults
from hivemind.executors.base import OutputLine
from hivemind.pool.client import PoolRefused

TAIL_LINES = 200
STAMP_LEN = len("[00:00:00] ")
# Room kept under the cap for the marker line, so the file never passes the cap.
MARKER_RESERVE_BYTES = 256
# Refusals (the pool answers, but says no: e.g. it forgot the task) before the rest is given up.
MAX_REFUSALS = 5


@dataclass(frozen=True)
class Batch:
    text: str          # what the pool gets: the lines without their time stamps
    end: int           # log offset just past the batch


class TaskOutput:
    """The output of one task. Thread-safe: executors' reader threads call `__call__`, the
    streamer reads batches from the file. `max_bytes` caps the log file (0: no cap)."""

    def __init__(self, task_id: str, log_path: Path, on_line: Callable[[str, OutputLine], None] | None = None,
                 max_bytes: int = 0) -> None:
        self.task_id = task_id
        self.log_path = log_path
        self.max_bytes = max_bytes
        self._acked_path = log_path.with_name(log_path.stem + ".acked")
        self._lock = threading.Lock()
        self._fh: IO[bytes] | None = log_path.open("ab")
        # A restarted worker appends to what an earlier one wrote: that counts toward the cap.
        self.bytes_written = self._fh.tell()
        self._positions = _Positions(log_path.with_name(log_path.stem + ".pos"), self.bytes_written)
        self._acked = min(_read_int(self._acked_path), self.bytes_written)
        self.truncated = False
        self.dropped_lines = 0
        self.dropped_bytes = 0
        self._tail: collections.deque[OutputLine] = collections.deque(maxlen=TAIL_LINES)
        self._stamp_second = -1
        self._stamp_text = ""
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
                if line.pos >= 0 and self._fh is not None:
                    # Consumed all the same: an executor resumes after it (the venv tailer
                    # has already freed what it read).
                    self._positions.record(line.stream, line.pos, self.bytes_written)
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
                if line.pos >= 0:
                    # The position first, naming where the log will end with this line: a crash
                    # between the two writes leaves a record past the log's end, which reopening
                    # ignores, so the executor sends that line again and the log gets it once.
                    self._positions.record(line.stream, line.pos, self.bytes_written + len(data))
                self._fh.write(data)
                self._fh.flush()
                self.bytes_written += len(data)
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

    def positions(self) -> dict[str, int]:
        """Per stream, the executor position of the last line this log holds (see OutputLine.pos)."""
        with self._lock:
            return self._positions.current()

    # -- the streaming side ----------------------------------------------------------------

    def next_batch(self, max_bytes: int) -> Batch | None:
        """Whole lines after the acknowledged offset, up to max_bytes (at least one line)."""
        with self._lock:
            start, end = self._acked, self.bytes_written
        if end <= start:
            return None
        with self.log_path.open("rb") as f:
            f.seek(start)
            raw = f.read(min(end - start, max_bytes))
            if b"\n" not in raw:          # one line longer than max_bytes: send it whole
                raw += f.readline()
        cut = raw.rfind(b"\n")
        if cut < 0:
            return None                   # a line still being written
        raw = raw[:cut + 1]
        text = "".join(_unstamped(ln) for ln in raw.decode("utf-8", errors="replace").splitlines(True))
        return Batch(text, start + len(raw))

    def ack(self, batch: Batch) -> None:
        """The pool has everything up to batch.end: persist that (atomic replace, no fsync: it
        protects against a process crash; a power cut costs at most a resent batch)."""
        with self._lock:
            self._acked = max(self._acked, batch.end)
            acked = self._acked
        tmp = self._acked_path.with_name(self._acked_path.name + ".tmp")
        try:
            tmp.write_text(str(acked))
            os.replace(tmp, self._acked_path)
        except OSError:
            pass   # the task's directory is gone (result delivered meanwhile): nothing to resume

    def skip_rest(self) -> None:
        """Give up streaming what is left (the pool keeps refusing it); the result still has it."""
        with self._lock:
            end = self.bytes_written
        self.ack(Batch("", end))

    def has_pending(self) -> bool:
        with self._lock:
            return self._acked < self.bytes_written

    @property
    def acked(self) -> int:
        with self._lock:
            return self._acked

    def tail(self, n: int = 50) -> list[str]:
        with self._lock:
            return [self._record(line) for line in list(self._tail)[-n:]]

    def close(self) -> None:
        """No more lines; the log is flushed to disk (the result is packed from it)."""
        with self._lock:
            fh, self._fh = self._fh, None
            self._positions.close()
        if fh is not None:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()


def _unstamped(line: str) -> str:
    if len(line) >= STAMP_LEN and line[0] == "[" and line[9:11] == "] ":
        return line[STAMP_LEN:]
    return line


def _read_int(path: Path) -> int:
    try:
        return max(0, int(path.read_text().strip() or 0))
    except (OSError, ValueError):
        return 0


class _Positions:
    """The executor positions of the last line the log holds, in two fixed-size slots written in
    turn (`output.pos`, 2 x SLOT bytes, however long the task talks): each write names the log
    size it stands for, so after a crash the newest slot the log has reached is the truth, and
    the other slot (one line older) is intact when the newest is not."""

    SLOT = 256

    def __init__(self, path: Path, log_size: int) -> None:
        self._path = path
        self._fd = -1
        self._seq, self._pos = _read_slots(path, log_size)
        if path.exists():
            # Both slots to the truth found: a slot left ahead of the log must not come back
            # once the log grows past the size it named.
            self._seq += 1
            self._write(log_size, 0)
            self._write(log_size, 1)

    def _write(self, log_end: int, slot: int) -> None:
        body = " ".join([str(self._seq), str(log_end)] + [f"{k}={v}" for k, v in sorted(self._pos.items())])
        row = body.encode()[:self.SLOT - 1].ljust(self.SLOT - 1) + b"\n"
        if self._fd < 0:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        os.pwrite(self._fd, row, slot * self.SLOT)

    def current(self) -> dict[str, int]:
        return dict(self._pos)

    def record(self, stream: str, pos: int, log_end: int) -> None:
        self._pos[stream] = pos
        self._seq += 1
        self._write(log_end, self._seq % 2)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _read_slots(path: Path, log_size: int) -> tuple[int, dict[str, int]]:
    try:
        raw = path.read_bytes()
    except OSError:
        return 0, {}
    best: tuple[int, dict[str, int]] = (0, {})
    for i in range(0, len(raw), _Positions.SLOT):
        parts = raw[i:i + _Positions.SLOT].decode("ascii", errors="replace").split()
        try:
            seq, log_end = int(parts[0]), int(parts[1])
            pos = {k: int(v) for k, _, v in (p.partition("=") for p in parts[2:])}
        except (IndexError, ValueError):
            continue                   # a torn or empty slot
        if log_end <= log_size and seq > best[0]:
            best = (seq, pos)
    return best


@dataclass
class _Followed:
    out: TaskOutput
    then: Callable[[], None] | None = None   # set by finish(): called once everything is sent
    refusals: int = 0


class OutputStreamer:
    """One thread that sends every task's unacknowledged output to the pool at a fixed interval,
    and a task's output at once when it asks (its first line). A finished task is followed until
    the pool has all of its output; then its `then` callback (the result upload) runs."""

    def __init__(self, send: Callable[[str, str], None], interval_s: float, batch_max_bytes: int,
                 logger: logging.Logger) -> None:
        self._send = send
        self._interval = interval_s
        self._batch = batch_max_bytes
        self._log = logger
        self._followed: dict[str, _Followed] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._urgent: list[TaskOutput] = []
        # One sender at a time (the loop, and flush_all from the daemon's shutdown): two would
        # read the same batch from the same acknowledged offset and send it twice.
        self._send_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="output-streamer", daemon=True)
        self.failures = 0

    def start(self) -> None:
        self._thread.start()

    def add(self, out: TaskOutput) -> None:
        with self._lock:
            self._followed[out.task_id] = _Followed(out)
        out.on_urgent = self._flush_soon
        self._wake.set()   # the loop may be sleeping without a deadline (nothing was followed)

    def _flush_soon(self, out: TaskOutput) -> None:
        # Called from an executor's reader thread: hand over to the streamer thread, never send here.
        with self._lock:
            self._urgent.append(out)
        self._wake.set()

    def finish(self, task_id: str, then: Callable[[], None] | None = None) -> None:
        """The task has ended: send the rest of its output, then call `then` (from the streamer
        thread), however long the pool takes to come back. Never blocks."""
        with self._lock:
            f = self._followed.get(task_id)
            if f is not None:
                f.then = then or (lambda: None)
        if f is None and then is not None:
            then()
            return
        self._wake.set()

    def following(self) -> list[str]:
        with self._lock:
            return list(self._followed)

    def flush_all(self) -> None:
        with self._send_lock:
            self._flush_all()

    def _flush_all(self) -> None:
        with self._lock:
            followed = list(self._followed.values())
        for f in followed:
            while self._flush_one(f) and f.then is not None and f.out.has_pending():
                pass   # a finished task's backlog goes out whole, batch after batch
            if f.then is not None and not f.out.has_pending():
                with self._lock:
                    self._followed.pop(f.out.task_id, None)
                f.then()

    def _flush_one(self, f: _Followed) -> bool:
        out = f.out
        try:
            batch = out.next_batch(self._batch)
        except OSError as exc:   # the log is gone (a reaped task's dir): nothing left to send
            self._log.warning("output log of %s unreadable: %s", out.task_id, exc,
                              extra={"task_id": out.task_id, "event": "output.unreadable"})
            out.skip_rest()
            return True
        if batch is None:
            return True
        try:
            self._send(out.task_id, batch.text)
        except Exception as exc:  # the pool may be down; the offset stays, the batch is resent
            self.failures += 1
            self._log.debug("output upload for %s failed: %s", out.task_id, exc,
                            extra={"task_id": out.task_id, "event": "output.upload_failed"})
            if isinstance(exc, PoolRefused):
                f.refusals += 1
                if f.refusals >= MAX_REFUSALS:
                    self._log.warning("the pool refused the output of %s %d times; the rest is "
                                      "only in the result", out.task_id, f.refusals,
                                      extra={"task_id": out.task_id, "event": "output.given_up"})
                    out.skip_rest()
            return False
        out.ack(batch)
        faults.hit("output_streamed", out.task_id)
        return True

    def _loop(self) -> None:
        next_round = time.monotonic() + self._interval
        while not self._stop.is_set():
            with self._lock:
                idle = not self._followed and not self._urgent
            # With no task to follow there is nothing to send: sleep until add() or stop().
            self._wake.wait(None if idle else max(0.0, next_round - time.monotonic()))
            if idle:
                next_round = time.monotonic() + self._interval   # a new task: its first round
            # Cleared before the swap below: a request made after the swap sets it again.
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                urgent, self._urgent = self._urgent, []
                ending = any(f.then is not None for f in self._followed.values())
                by_id = {t: self._followed.get(t.task_id) for t in urgent}
            with self._send_lock:
                for f in by_id.values():
                    if f is not None:
                        self._flush_one(f)
                if ending or time.monotonic() >= next_round:
                    self._flush_all()
                    next_round = time.monotonic() + self._interval

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
