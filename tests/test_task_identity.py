"""Per-task uids: the range must be nobody's, and a uid a process still runs as is never handed
out; what the venv executor reports when it can't give a task its own identity."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivemind.config import VenvConfig
from hivemind.executors.task_identity import NoFreeUid, UidPool, range_conflicts
from hivemind.executors.venv import VenvExecutor

IS_ROOT = os.geteuid() == 0


@pytest.fixture
def d() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hm-ident-"))
    path.chmod(0o755)                                # task uids must reach the venv cache
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_range_conflicts_name_accounts_groups_and_subordinate_ranges(tmp_path: Path) -> None:
    sub = tmp_path / "subuid"
    sub.write_text("someone:500000:65536\n")
    assert any("user root" in c for c in range_conflicts(0, 1, (str(sub),)))
    assert any("group root" in c for c in range_conflicts(0, 1, (str(sub),)))
    assert range_conflicts(560000, 10, (str(sub),)) == [f"{sub} range of someone (500000-565535)"]
    assert range_conflicts(565536, 10, (str(sub),)) == []


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run a process as another uid")
def test_a_uid_that_still_runs_a_process_is_skipped() -> None:
    pool = UidPool(VenvConfig().uid_range_start + 500, 2)
    squatter = subprocess.Popen(["setpriv", f"--reuid={pool.first}", f"--regid={pool.first}",
                                 "--clear-groups", "--", "sleep", "60"])
    try:
        for _ in range(200):                       # until setpriv has switched uid
            status = Path(f"/proc/{squatter.pid}/status").read_text()
            if f"\t{pool.first}\t" in status:
                break
        user = pool.allocate("t1")
        assert user.uid == pool.first + 1 and user.gid == user.uid
        with pytest.raises(NoFreeUid):
            pool.allocate("t2")                    # first is busy, second is t1's
        pool.release(user.uid)
        assert pool.allocate("t3").uid == pool.first + 1
    finally:
        squatter.kill()
        squatter.wait()


def test_a_worker_that_is_not_root_says_what_tasks_lack(d: Path) -> None:
    ex = VenvExecutor(VenvConfig(cache_dir=str(d / "venvs")), d / "state",
                      logging.getLogger("test"), "n", is_root=False)
    st = ex.probe()
    assert st.usable and st.enforcement is not None
    notes = " | ".join(st.enforcement.notes)
    assert "no PID/mount namespace" in notes and "not root" in notes
    facts = ex.isolation_facts(None, False)
    assert facts["not_applied"] == ["uid_per_task", "pid_namespace", "private_tmp"]
    assert facts["why"] == "the worker is not root"


@pytest.mark.skipif(not IS_ROOT, reason="per-task uids and namespaces need a root worker")
def test_a_root_worker_gives_each_task_its_own_identity(d: Path) -> None:
    ex = VenvExecutor(VenvConfig(cache_dir=str(d / "venvs")), d / "state",
                      logging.getLogger("test"), "n")
    st = ex.probe()
    assert st.usable and st.enforcement is not None
    assert any("a uid of its own per task" in n for n in st.enforcement.notes)
    facts = ex.isolation_facts(2147000000, True)
    assert facts["pid_namespace"] and facts["private_tmp"] and "not_applied" not in facts


def test_a_range_that_overlaps_an_account_makes_the_executor_unusable(d: Path) -> None:
    ex = VenvExecutor(VenvConfig(cache_dir=str(d / "venvs"), uid_range_start=65530, uid_range_size=10),
                      d / "state", logging.getLogger("test"), "n", is_root=True)
    st = ex.probe()
    assert not st.usable and "nobody" in st.reason and "uid_range" in st.reason
