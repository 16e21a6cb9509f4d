"""Durable task state: what a restarted worker needs to recover tasks and resend results.

One SQLite file in the state dir, WAL mode with synchronous=FULL, so every committed write survives
a power cut. One connection guarded by one lock: writes are a few per task transition, far below
what serialising them costs.

Crash-safety rule for results: the zip is written and fsynced (file and directory) by
`mark_result_pending` BEFORE its row is committed, and `result_acknowledged` deletes the file
BEFORE the row. So a pending row always names a complete file, and a crash in between leaves at
worst an orphan file (which `orphan_results` finds), never a row without its result.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from hivemind.executors.base import TaskHandle
from hivemind.tasks.state import Lifecycle, Outcome, Resources, TaskRecord, TaskState

_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id     TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    request     TEXT NOT NULL,
    granted     TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    updated_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    outcome     TEXT,
    exit_code   INTEGER,
    reason      TEXT NOT NULL DEFAULT '',
    message     TEXT NOT NULL DEFAULT '',
    executor    TEXT NOT NULL DEFAULT '',
    handle      TEXT
);
CREATE TABLE IF NOT EXISTS results (
    task_id   TEXT PRIMARY KEY,
    zip_path  TEXT NOT NULL,
    marked_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS seen (
    task_id TEXT PRIMARY KEY
);
"""

_UPDATABLE = frozenset({"outcome", "exit_code", "reason", "message", "executor",
                        "started_at", "finished_at", "updated_at"})


@dataclass(frozen=True)
class StoredTask:
    record: TaskRecord
    handle: TaskHandle | None


class PendingResult(NamedTuple):
    task_id: str
    zip_path: Path


def _res_json(r: Resources) -> str:
    return json.dumps({"cpus": r.cpus, "memory_bytes": r.memory_bytes,
                       "gpus": list(r.gpus), "slots": r.slots}, sort_keys=True)


def _res_load(text: str) -> Resources:
    d = json.loads(text)
    return Resources(cpus=float(d["cpus"]), memory_bytes=int(d["memory_bytes"]),
                     gpus=tuple(d["gpus"]), slots=int(d["slots"]))


def _handle_json(h: TaskHandle) -> str:
    return json.dumps({"version": h.version, "task_id": h.task_id, "executor": h.executor,
                       "state": dict(h.state)}, sort_keys=True)


def _handle_load(text: str | None) -> TaskHandle | None:
    if not text:
        return None
    d = json.loads(text)
    return TaskHandle(version=int(d["version"]), task_id=str(d["task_id"]),
                      executor=str(d["executor"]), state=d["state"])


def fsync_file(path: Path) -> None:
    """Flush a file's data and its directory entry to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class TaskStore:
    """Thread-safe; every method commits before returning."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self._path = Path(path)
        self._clock = clock
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        os.chmod(self._path, 0o600)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            if version > _SCHEMA_VERSION:
                raise RuntimeError(f"{self._path} has schema {version}, newer than this worker's "
                                   f"{_SCHEMA_VERSION}; upgrade the worker")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> TaskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tx(self, statements: Iterable[tuple[str, tuple[Any, ...]]]) -> int:
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                changed = 0
                for sql, args in statements:
                    changed += cur.execute(sql, args).rowcount
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            return changed

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cur = self._db.cursor()
            cur.row_factory = sqlite3.Row
            return list(cur.execute(sql, args).fetchall())

    # -- tasks -----------------------------------------------------------------------------

    def put_task(self, record: TaskRecord) -> None:
        """Insert or replace everything but the handle (which `save_handle` owns)."""
        r = record
        self._tx([
            ("""INSERT INTO tasks (task_id, state, request, granted, accepted_at, updated_at,
                   started_at, finished_at, outcome, exit_code, reason, message, executor)
                VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)
                ON CONFLICT(task_id) DO UPDATE SET state=excluded.state,
                   request=excluded.request, granted=excluded.granted,
                   accepted_at=excluded.accepted_at, updated_at=excluded.updated_at,
                   started_at=excluded.started_at, finished_at=excluded.finished_at,
                   outcome=excluded.outcome, exit_code=excluded.exit_code,
                   reason=excluded.reason, message=excluded.message, executor=excluded.executor""",
             (r.task_id, str(r.state), _res_json(r.request), _res_json(r.granted),
              r.accepted_at, r.updated_at, r.started_at, r.finished_at,
              str(r.outcome) if r.outcome else None, r.exit_code, r.reason, r.message,
              r.executor)),
            ("INSERT OR IGNORE INTO seen (task_id) VALUES (?)", (r.task_id,)),
        ])

    def update_state(self, task_id: str, state: TaskState, **fields: Any) -> None:
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise TypeError(f"update_state() got unknown fields: {', '.join(sorted(unknown))}")
        fields.setdefault("updated_at", self._clock())
        if fields.get("outcome") is not None:
            fields["outcome"] = str(Outcome(fields["outcome"]))
        cols = ", ".join(f"{k}=?" for k in sorted(fields))
        args = tuple(fields[k] for k in sorted(fields))
        n = self._tx([(f"UPDATE tasks SET state=?, {cols} WHERE task_id=?",
                       (str(TaskState(state)), *args, task_id))])
        if n != 1:
            raise KeyError(task_id)

    def save_handle(self, task_id: str, handle: TaskHandle) -> None:
        n = self._tx([("UPDATE tasks SET handle=?, executor=? WHERE task_id=?",
                       (_handle_json(handle), handle.executor, task_id))])
        if n != 1:
            raise KeyError(task_id)

    def tasks(self, states: Iterable[TaskState] | None = None) -> list[StoredTask]:
        rows = self._query("SELECT * FROM tasks ORDER BY accepted_at, task_id")
        wanted = None if states is None else {str(TaskState(s)) for s in states}
        return [self._row(row) for row in rows if wanted is None or row["state"] in wanted]

    def get(self, task_id: str) -> StoredTask | None:
        rows = self._query("SELECT * FROM tasks WHERE task_id=?", (task_id,))
        return self._row(rows[0]) if rows else None

    def known_ids(self) -> set[str]:
        """Every id ever stored, forgotten ones included: none of them may run again."""
        return {row["task_id"] for row in self._query("SELECT task_id FROM seen")}

    @staticmethod
    def _row(row: sqlite3.Row) -> StoredTask:
        rec = TaskRecord(
            task_id=row["task_id"], state=TaskState(row["state"]),
            request=_res_load(row["request"]), granted=_res_load(row["granted"]),
            accepted_at=row["accepted_at"], updated_at=row["updated_at"],
            started_at=row["started_at"], finished_at=row["finished_at"],
            outcome=Outcome(row["outcome"]) if row["outcome"] else None,
            exit_code=row["exit_code"], reason=row["reason"], message=row["message"],
            executor=row["executor"])
        return StoredTask(record=rec, handle=_handle_load(row["handle"]))

    def forget(self, task_id: str) -> None:
        """Drop the task and its pending result (file included); the id stays in `known_ids`."""
        for pending in self._query("SELECT zip_path FROM results WHERE task_id=?", (task_id,)):
            Path(pending["zip_path"]).unlink(missing_ok=True)
        self._tx([("DELETE FROM results WHERE task_id=?", (task_id,)),
                  ("DELETE FROM tasks WHERE task_id=?", (task_id,))])

    def discard(self, task_id: str) -> None:
        """Drop a task as if it had never come: only for one whose acceptance the pool never
        heard (its archive was not persisted before the crash), so the pool's retry is admitted."""
        self._tx([("DELETE FROM results WHERE task_id=?", (task_id,)),
                  ("DELETE FROM tasks WHERE task_id=?", (task_id,)),
                  ("DELETE FROM seen WHERE task_id=?", (task_id,))])

    # -- results ---------------------------------------------------------------------------

    def mark_result_pending(self, task_id: str, zip_path: Path) -> None:
        """Record that `zip_path` holds the task's result, to be uploaded (again after a restart)."""
        zip_path = Path(zip_path).absolute()
        fsync_file(zip_path)
        self._tx([("""INSERT INTO results (task_id, zip_path, marked_at) VALUES (?,?,?)
                      ON CONFLICT(task_id) DO UPDATE SET zip_path=excluded.zip_path,
                      marked_at=excluded.marked_at""",
                   (task_id, str(zip_path), self._clock()))])

    def pending_results(self) -> list[PendingResult]:
        return [PendingResult(row["task_id"], Path(row["zip_path"]))
                for row in self._query("SELECT * FROM results ORDER BY marked_at, task_id")]

    def pending_result_count(self) -> int:
        return int(self._query("SELECT COUNT(*) AS n FROM results")[0]["n"])

    def result_acknowledged(self, task_id: str) -> None:
        """The pool has the result: delete the file, then the row."""
        for pending in self._query("SELECT zip_path FROM results WHERE task_id=?", (task_id,)):
            Path(pending["zip_path"]).unlink(missing_ok=True)
        self._tx([("DELETE FROM results WHERE task_id=?", (task_id,))])

    def orphan_results(self, results_dir: Path) -> list[Path]:
        """Files in `results_dir` that no pending row names (left by a crash); safe to delete."""
        named = {r.zip_path for r in self.pending_results()}
        if not results_dir.is_dir():
            return []
        return sorted(p.absolute() for p in results_dir.iterdir()
                      if p.is_file() and p.absolute() not in named)


def follow(lifecycle: Lifecycle, store: TaskStore) -> Callable[[], None]:
    """Persist every transition of `lifecycle` into `store`; returns the unsubscribe."""

    def on_change(task_id: str, old: TaskState | None, new: TaskState) -> None:
        record = lifecycle.get(task_id)
        if record is not None:
            # The record may already be past `new` (listeners run after the lock); storing the
            # latest is what a restart needs.
            store.put_task(record)

    return lifecycle.subscribe(on_change)


def restore_lifecycle(lifecycle: Lifecycle, store: TaskStore) -> list[StoredTask]:
    """Load every stored task into `lifecycle`; returns them (with handles) for recovery."""
    stored = store.tasks()
    lifecycle.restore((s.record for s in stored), known_ids=store.known_ids())
    return stored
