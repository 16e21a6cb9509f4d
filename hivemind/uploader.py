"""Delivers result archives to the pool. A result is on disk (and recorded as pending in the store)
before this sees it, and its file is deleted only after the pool accepted it, so a crash or an
absent pool loses nothing: pending results are retried with backoff, also after a restart.

Two kinds of failure are told apart: a pool that can't be reached (retried for as long as it
takes) and a pool that answers and refuses this result (success=false, e.g. a task it doesn't
know): after `max_refusals` refusals the result is given up, so it doesn't sit on disk forever."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hivemind.pool.backoff import Backoff
from hivemind.pool.client import PoolCallFailed, PoolRefused


@dataclass(frozen=True)
class PendingResult:
    task_id: str
    path: Path
    not_before: float      # wall-clock time before which the pool must not see it


class ResultUploader:
    def __init__(self, upload: Callable[[str, Path], None], on_delivered: Callable[[str], None],
                 logger: logging.Logger, *, on_failure: Callable[[], None] = lambda: None,
                 on_given_up: Callable[[str, str], None] = lambda task_id, why: None,
                 max_refusals: int = 5, clock: Callable[[], float] = time.time) -> None:
        self._upload = upload
        self._on_delivered = on_delivered
        self._on_failure = on_failure
        self._on_given_up = on_given_up
        self._max_refusals = max_refusals
        self._refusals: dict[str, int] = {}
        self._log = logger
        self._clock = clock
        self._queue: dict[str, PendingResult] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="result-uploader", daemon=True)
        self.failures = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, item: PendingResult) -> None:
        with self._lock:
            self._queue[item.task_id] = item
        self._wake.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def pending_ids(self) -> list[str]:
        with self._lock:
            return list(self._queue)

    def _loop(self) -> None:
        backoff = Backoff(initial=0.5, maximum=30.0)
        while not self._stop.is_set():
            delay = self._deliver_due(backoff)
            self._wake.wait(delay)
            self._wake.clear()

    def _deliver_due(self, backoff: Backoff) -> float:
        now = self._clock()
        with self._lock:
            items = sorted(self._queue.values(), key=lambda i: i.not_before)
        if not items:
            return 3600.0
        next_due = min(i.not_before for i in items)
        for item in items:
            if self._stop.is_set():
                return 0.0
            if item.not_before > now:
                continue
            try:
                self._upload(item.task_id, item.path)
            except PoolRefused as exc:
                self.failures += 1
                self._on_failure()
                n = self._refusals.get(item.task_id, 0) + 1
                self._refusals[item.task_id] = n
                if n >= self._max_refusals:
                    with self._lock:
                        self._queue.pop(item.task_id, None)
                    self._refusals.pop(item.task_id, None)
                    self._log.error("the pool refused the result of %s %d times (%s); giving it up",
                                    item.task_id, n, exc,
                                    extra={"task_id": item.task_id, "event": "result.given_up"})
                    self._on_given_up(item.task_id, str(exc))
                    continue
                delay = backoff.next_delay()
                self._log.warning("the pool refused the result of %s (%s); retrying in %.1f s",
                                  item.task_id, exc, delay,
                                  extra={"task_id": item.task_id, "event": "result.refused"})
                return delay
            except (PoolCallFailed, OSError) as exc:
                self.failures += 1
                self._on_failure()
                delay = backoff.next_delay()
                self._log.warning("result upload of %s failed (%s); retrying in %.1f s", item.task_id, exc,
                                  delay, extra={"task_id": item.task_id, "event": "result.upload_failed"})
                return delay
            backoff.reset()
            with self._lock:
                self._queue.pop(item.task_id, None)
            self._refusals.pop(item.task_id, None)
            self._log.info("result of %s delivered", item.task_id,
                           extra={"task_id": item.task_id, "event": "result.delivered"})
            self._on_delivered(item.task_id)
        return max(0.05, next_due - self._clock()) if self.pending() else 3600.0

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
