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

from hivemind import faults
from hivemind.pool.backoff import Backoff
from hivemind.pool.client import PoolCallFailed, PoolRefused


@dataclass(frozen=True)
class PendingResult:
    task_id: str
    path: Path
    not_before: float      # wall-clock time before which the pool must not see it


@dataclass
class _Entry:
    item: PendingResult
    next_try: float
    backoff: Backoff
    refusals: int = 0


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
        self._log = logger
        self._clock = clock
        self._queue: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="result-uploader", daemon=True)
        # An unreachable pool holds back every result; a refusal only the one refused.
        self._pool_down = Backoff(initial=0.5, maximum=30.0)
        self.failures = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, item: PendingResult) -> None:
        with self._lock:
            self._queue[item.task_id] = _Entry(item, item.not_before, Backoff(initial=0.5, maximum=30.0))
        self._wake.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def pending_ids(self) -> list[str]:
        with self._lock:
            return list(self._queue)

    def _loop(self) -> None:
        while not self._stop.is_set():
            delay = self._deliver_due()
            self._wake.wait(delay)
            self._wake.clear()

    def _deliver_due(self) -> float:
        now = self._clock()
        with self._lock:
            entries = sorted(self._queue.values(), key=lambda e: e.next_try)
        for e in entries:
            if self._stop.is_set():
                return 0.0
            if e.next_try > now:
                continue
            task_id = e.item.task_id
            extra = {"task_id": task_id}
            try:
                faults.hit("upload_in_flight", task_id)
                self._upload(task_id, e.item.path)
            except PoolRefused as exc:
                self.failures += 1
                self._on_failure()
                e.refusals += 1
                if e.refusals >= self._max_refusals:
                    self._drop(task_id)
                    self._log.error("the pool refused the result of %s %d times (%s); giving it up",
                                    task_id, e.refusals, exc, extra={**extra, "event": "result.given_up"})
                    self._on_given_up(task_id, str(exc))
                    continue
                delay = e.backoff.next_delay()
                e.next_try = self._clock() + delay
                self._log.warning("the pool refused the result of %s (%s); retrying in %.1f s", task_id, exc,
                                  delay, extra={**extra, "event": "result.refused"})
                continue
            except (PoolCallFailed, OSError) as exc:
                self.failures += 1
                self._on_failure()
                delay = self._pool_down.next_delay()
                self._log.warning("result upload of %s failed (%s); retrying in %.1f s", task_id, exc,
                                  delay, extra={**extra, "event": "result.upload_failed"})
                return delay
            self._pool_down.reset()
            # A crash here resends the same archive after the restart: the pool stores it again
            # (same bytes), which is the only repeat the protocol leaves room for.
            faults.hit("upload_acknowledged", task_id)
            self._drop(task_id)
            self._log.info("result of %s delivered", task_id, extra={**extra, "event": "result.delivered"})
            self._on_delivered(task_id)
        with self._lock:
            next_try = min((e.next_try for e in self._queue.values()), default=None)
        return 3600.0 if next_try is None else max(0.05, next_try - self._clock())

    def _drop(self, task_id: str) -> None:
        with self._lock:
            self._queue.pop(task_id, None)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
