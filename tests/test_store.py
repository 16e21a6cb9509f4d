"""The durable task store, on real SQLite files (and a real crashed process)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from hivemind.executors.base import TaskHandle
from hivemind.tasks.state import Lifecycle, Outcome, Resources, TaskState
from hivemind.tasks.store import PendingResult, TaskStore, follow, restore_lifecycle

GiB = 1 << 30
CAP = Resources(cpus=4.0, memory_bytes=8 * GiB, gpus=("g0", "g1"), slots=4)
S = TaskState


def running_task(lc: Lifecycle, task_id: str = "t1") -> None:
    assert lc.admit(task_id, Resources(1.5, GiB, (), 1), gpu_count=1).ok
    lc.advance(task_id, S.PREPARING)
    lc.advance(task_id, S.RUNNING, executor="podman")


def result_file(tmp_path: Path, name: str = "t1.zip") -> Path:
    d = tmp_path / "results"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_bytes(b"PK fake result")
    return p


def test_round_trip_of_a_record_and_handle(tmp_path: Path) -> None:
    lc = Lifecycle(CAP)
    running_task(lc)
    store = TaskStore(tmp_path / "state.db")
    rec = lc.get("t1")
    assert rec is not None
    store.put_task(rec)
    handle = TaskHandle(version=1, task_id="t1", executor="podman",
                        state={"container": "hm-n1-t1", "ports": [1, 2]})
    store.save_handle("t1", handle)
    (got,) = store.tasks()
    assert got.record == rec and got.handle == handle
    assert got.record.granted.gpus == ("g0",)
    store.close()


def test_reopen_sees_the_same_tasks_and_pending_results(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    lc = Lifecycle(CAP)
    with TaskStore(db) as store:
        follow(lc, store)
        running_task(lc, "t1")
        running_task(lc, "t2")
        lc.advance("t2", S.UPLOADING, outcome=Outcome.SUCCEEDED, exit_code=0, reason="exited")
        zip_path = result_file(tmp_path, "t2.zip")
        store.mark_result_pending("t2", zip_path)
        store.save_handle("t1", TaskHandle(1, "t1", "venv", {"pid": 42}))
        before = {s.record.task_id: s for s in store.tasks()}
    with TaskStore(db) as again:
        after = {s.record.task_id: s for s in again.tasks()}
        assert after == before
        assert after["t2"].record.state is S.UPLOADING and after["t2"].record.exit_code == 0
        assert after["t1"].handle == TaskHandle(1, "t1", "venv", {"pid": 42})
        assert again.pending_results() == [PendingResult("t2", zip_path.absolute())]
        assert [s.record.task_id for s in again.tasks([S.RUNNING])] == ["t1"]


def test_a_restored_lifecycle_never_runs_a_task_twice(tmp_path: Path) -> None:
    # Nomad's test: runner A accepts and starts, dies; runner B restores from the same store.
    db = tmp_path / "state.db"
    a = Lifecycle(CAP)
    with TaskStore(db) as store:
        follow(a, store)
        running_task(a, "t1")
        assert a.admit("gone", Resources(0.5, GiB, (), 1)).ok
        a.advance("gone", S.FAILED)
        store.forget("gone")
    b = Lifecycle(CAP)
    with TaskStore(db) as store:
        stored = restore_lifecycle(b, store)
    assert [s.record.task_id for s in stored] == ["t1"]
    assert b.reserved() == Resources(1.5, GiB, ("g0",), 1)
    assert b.admit("t1", Resources(0.5, GiB, (), 1)).duplicate
    assert b.admit("gone", Resources(0.5, GiB, (), 1)).duplicate


def test_update_state_and_unknown_tasks(tmp_path: Path) -> None:
    lc = Lifecycle(CAP)
    running_task(lc)
    with TaskStore(tmp_path / "s.db", clock=lambda: 77.0) as store:
        rec = lc.get("t1")
        assert rec is not None
        store.put_task(rec)
        store.update_state("t1", S.UPLOADING, outcome="failed", exit_code=3, reason="exited",
                           message="boom", finished_at=12.0)
        got = store.get("t1")
        assert got is not None
        r = got.record
        assert (r.state, r.outcome, r.exit_code, r.message, r.finished_at, r.updated_at) == (
            S.UPLOADING, Outcome.FAILED, 3, "boom", 12.0, 77.0)
        with pytest.raises(KeyError):
            store.update_state("nope", S.FAILED)
        with pytest.raises(KeyError):
            store.save_handle("nope", TaskHandle(1, "nope", "venv", {}))
        with pytest.raises(TypeError, match="colour"):
            store.update_state("t1", S.FAILED, colour="red")
        with pytest.raises(ValueError):
            store.update_state("t1", "exploded")  # type: ignore[arg-type]


def test_acknowledged_results_lose_file_then_row(tmp_path: Path) -> None:
    with TaskStore(tmp_path / "s.db") as store:
        zip_path = result_file(tmp_path)
        store.mark_result_pending("t1", zip_path)
        stray = result_file(tmp_path, "stray.zip")
        assert store.orphan_results(tmp_path / "results") == [stray.absolute()]
        store.result_acknowledged("t1")
        assert not zip_path.exists() and store.pending_results() == []
        store.result_acknowledged("t1")          # idempotent: the pool may ack twice


def test_a_result_must_exist_before_it_is_pending(tmp_path: Path) -> None:
    with TaskStore(tmp_path / "s.db") as store:
        with pytest.raises(FileNotFoundError):
            store.mark_result_pending("t1", tmp_path / "missing.zip")
        assert store.pending_results() == []


def test_forget_drops_task_and_result(tmp_path: Path) -> None:
    lc = Lifecycle(CAP)
    with TaskStore(tmp_path / "s.db") as store:
        follow(lc, store)
        running_task(lc)
        zip_path = result_file(tmp_path)
        store.mark_result_pending("t1", zip_path)
        store.forget("t1")
        assert store.tasks() == [] and store.pending_results() == [] and not zip_path.exists()
        assert store.known_ids() == {"t1"}


def test_discard_forgets_an_unacknowledged_task_entirely(tmp_path: Path) -> None:
    """A task whose ExecuteTask never answered yes (killed before its archive was persisted):
    after discard, a restored lifecycle admits the pool's retry of the same id."""
    lc = Lifecycle(CAP)
    with TaskStore(tmp_path / "s.db") as store:
        follow(lc, store)
        assert lc.admit("t1", Resources(1.0, GiB, (), 1)).ok
        assert lc.admit("t2", Resources(1.0, GiB, (), 1)).ok
        store.discard("t1")
        assert [s.record.task_id for s in store.tasks()] == ["t2"]
        assert store.known_ids() == {"t2"}
        again = Lifecycle(CAP)
        restore_lifecycle(again, store)
        assert again.admit("t1", Resources(1.0, GiB, (), 1)).ok
        assert not again.admit("t2", Resources(1.0, GiB, (), 1)).ok


def test_the_database_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "s.db"
    TaskStore(db).close()
    assert db.stat().st_mode & 0o077 == 0
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    with sqlite3.connect(db) as raw:
        raw.execute("PRAGMA user_version=99")
    with pytest.raises(RuntimeError, match="newer than this worker"):
        TaskStore(db)


def test_concurrent_writers_from_threads(tmp_path: Path) -> None:
    lc = Lifecycle(Resources(cpus=100.0, memory_bytes=100 * GiB, gpus=(), slots=100))
    with TaskStore(tmp_path / "s.db") as store:
        follow(lc, store)

        def work(n: int) -> None:
            for i in range(10):
                tid = f"w{n}-{i}"
                assert lc.admit(tid, Resources(0.1, 1, (), 1)).ok
                lc.advance(tid, S.PREPARING)
                lc.advance(tid, S.RUNNING)
                lc.advance(tid, S.UPLOADING, outcome=Outcome.SUCCEEDED)
                lc.advance(tid, S.DONE)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stored = store.tasks()
        assert len(stored) == 40 and all(s.record.state is S.DONE for s in stored)


def test_survives_a_process_that_dies_without_closing(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    zip_path = result_file(tmp_path)
    child = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from hivemind.tasks.state import Lifecycle, Outcome, Resources, TaskState as S
        from hivemind.tasks.store import TaskStore, follow
        lc = Lifecycle(Resources(4.0, 1 << 33, (), 4))
        store = TaskStore(Path({str(db)!r}))
        follow(lc, store)
        lc.admit("t1", Resources(1.0, 1 << 30, (), 1))
        lc.advance("t1", S.PREPARING)
        lc.advance("t1", S.RUNNING)
        lc.advance("t1", S.UPLOADING, outcome=Outcome.FAILED, exit_code=9)
        store.mark_result_pending("t1", Path({str(zip_path)!r}))
        os._exit(0)   # no close, no WAL checkpoint
    """)
    subprocess.run([sys.executable, "-c", child], check=True, timeout=60)
    with TaskStore(db) as store:
        (t,) = store.tasks()
        assert t.record.state is S.UPLOADING and t.record.exit_code == 9
        assert store.pending_results() == [PendingResult("t1", zip_path.absolute())]
