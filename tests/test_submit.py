"""The submit client against a real DevPool and a fake worker over loopback gRPC."""

from __future__ import annotations

import importlib
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivemind.devpool import COMPLETED, FAILED, RUNNING, DevPool
from hivemind.devpool.submit import (
    SubmitError,
    default_out_path,
    main,
    new_output,
    submit_task,
    zip_task,
)
from hivemind.secrets import Secret

try:
    from tests.test_devpool import TIMINGS, USERS, FakeClock, FakeWorker, make_worker
except ImportError:  # tests/ is not a package: pytest imports it by its directory
    _helpers = importlib.import_module("test_devpool")
    TIMINGS, USERS, FakeClock, FakeWorker, make_worker = (  # type: ignore[misc]
        _helpers.TIMINGS, _helpers.USERS, _helpers.FakeClock, _helpers.FakeWorker, _helpers.make_worker)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pool(clock: FakeClock) -> Iterator[DevPool]:
    p = DevPool(users=USERS, dispatch_interval_s=0.05, clock=clock, timings=TIMINGS)
    p.start()
    yield p
    p.stop()


@pytest.fixture
def worker(pool: DevPool) -> Iterator[FakeWorker]:
    w = make_worker(pool, output="step 1\nstep 2\n", result=b"the result archive")
    w.register()
    yield w
    w.stop()


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    d = tmp_path / "mytask"
    (d / "pkg").mkdir(parents=True)
    (d / "run.py").write_text("print('hi')\n")
    (d / "pkg" / "data.txt").write_text("data\n")
    (d / "link.py").symlink_to(d / "run.py")
    return d


def test_zip_task_zips_a_directory_and_skips_symlinks(task_dir: Path, tmp_path: Path) -> None:
    data = zip_task(task_dir)
    archive = tmp_path / "t.zip"
    archive.write_bytes(data)
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == ["pkg/data.txt", "run.py"]
        assert zf.read("run.py") == b"print('hi')\n"
    assert zip_task(archive) == data
    not_zip = tmp_path / "notes.txt"
    not_zip.write_text("hello")
    with pytest.raises(SubmitError, match="not a zip"):
        zip_task(not_zip)
    with pytest.raises(SubmitError, match="does not exist"):
        zip_task(tmp_path / "missing")


def test_default_out_path(task_dir: Path, tmp_path: Path) -> None:
    assert default_out_path(task_dir) == tmp_path / "mytask.result.zip"
    archive = tmp_path / "job.zip"
    archive.write_bytes(zip_task(task_dir))
    assert default_out_path(archive) == tmp_path / "job.result.zip"


def test_new_output_examples() -> None:
    assert new_output("", "abc") == "abc"
    assert new_output("abc", "abcdef") == "def"
    assert new_output("abcdef", "defghi") == "ghi"  # the 6-char window slid by 3
    assert new_output("abc", "xyz") == "xyz"  # more was written than the window holds


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=40),
       st.lists(st.text(alphabet="abc ", max_size=8), min_size=40, max_size=40))
def test_new_output_rebuilds_the_stream_from_tail_windows(growth: list[int], words: list[str]) -> None:
    # Numbered lines never repeat, which is what lets a window's overlap be found unambiguously.
    lines = [f"{i}:{w}\n" for i, w in enumerate(words)]
    window, produced, shown, written = 120, "", "", 0
    for g in growth:
        written = min(written + g, len(lines))
        current = "".join(lines[:written])[-window:]
        produced += new_output(shown, current)
        shown = current
    assert produced == "".join(lines[:written])


def test_submit_follows_output_and_saves_the_result(pool: DevPool, worker: FakeWorker, task_dir: Path) -> None:
    seen: list[str] = []
    result = submit_task(pool.address, task_dir, "alice", Secret("alice-pw"), memory_gb=1,
                         cpu_score=10, on_output=seen.append, poll_interval_s=0.02, timeout_s=60)
    assert result.status == COMPLETED and worker.errors == []
    assert result.result_path == task_dir.parent / "mytask.result.zip"
    assert result.result_path.read_bytes() == b"the result archive"
    assert "".join(seen) == "step 1\nstep 2\n"
    (call,) = worker.calls
    assert call.request.task_id == result.task_id
    sent = task_dir.parent / "sent.zip"
    sent.write_bytes(call.request.task_zip)
    with zipfile.ZipFile(sent) as zf:
        assert sorted(zf.namelist()) == ["pkg/data.txt", "run.py"]


def test_submit_reports_a_failed_task(pool: DevPool, clock: FakeClock, task_dir: Path) -> None:
    silent = make_worker(pool, complete=False)
    silent.register()
    out = task_dir.parent / "never.zip"

    def sleep(_s: float) -> None:
        # Once the task runs, let the node fall silent past the pool's 60 s limit.
        if any(t.status == RUNNING for t in pool.tasks()):
            clock.advance(TIMINGS.fail_after_s + 1)
        time.sleep(0.02)

    try:
        result = submit_task(pool.address, task_dir, "alice", "alice-pw", out_path=out,
                             on_output=lambda _t: None, sleep=sleep, timeout_s=60)
    finally:
        silent.stop()
    assert result.status == FAILED and result.result_path is None
    assert "stopped responding" in result.message
    assert not out.exists()


def test_submit_times_out_on_a_fake_clock(pool: DevPool, task_dir: Path) -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s
        time.sleep(0.005)

    with pytest.raises(SubmitError, match="still QUEUED after 30 s"):
        submit_task(pool.address, task_dir, "alice", "alice-pw", timeout_s=30, poll_interval_s=5,
                    on_output=lambda _t: None, clock=lambda: now[0], sleep=sleep)
    assert [t.status for t in pool.tasks()] == ["QUEUED"]


def test_submit_rejects_a_wrong_password_without_echoing_it(pool: DevPool, task_dir: Path) -> None:
    with pytest.raises(SubmitError) as err:
        submit_task(pool.address, task_dir, "alice", "hunter2-wrong", on_output=lambda _t: None)
    assert "hunter2-wrong" not in str(err.value) and "login" in str(err.value)
    assert pool.tasks() == []


def test_submit_without_follow_returns_after_upload(pool: DevPool, task_dir: Path) -> None:
    result = submit_task(pool.address, task_dir, "alice", "alice-pw", follow=False)
    assert result.status == "QUEUED" and result.result_path is None
    assert pool.task(result.task_id) is not None


def test_submit_renews_a_token_close_to_expiry(clock: FakeClock, task_dir: Path) -> None:
    # A token lifetime below the client's renewal margin makes every call renew first; a pool on
    # the real clock is needed because the client compares expiry with the wall clock.
    with DevPool(users=USERS, dispatch_interval_s=0.05, token_ttl_s=120, timings=TIMINGS) as p:
        w = make_worker(p, result=b"r")
        w.register()
        try:
            result = submit_task(p.address, task_dir, "alice", "alice-pw", poll_interval_s=0.02,
                                 on_output=lambda _t: None, timeout_s=60)
        finally:
            w.stop()
    assert result.status == COMPLETED


def test_main_reads_the_password_file(pool: DevPool, worker: FakeWorker, task_dir: Path,
                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pw = tmp_path / "pw"
    pw.write_text("alice-pw\n")
    out = tmp_path / "res.zip"
    args = SimpleNamespace(path=task_dir, pool=pool.address, user="alice", password_file=str(pw),
                           memory_gb=1, cpu_score=0, out=out, timeout=60.0)
    assert main(args) == 0
    assert out.read_bytes() == b"the result archive"
    captured = capsys.readouterr()
    assert "step 1" in captured.out and "COMPLETED" in captured.err and "alice-pw" not in captured.err


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory nobody may create files in: a 0555 one for a normal user; as root (which
    ignores modes) /proc/self, where even root can't create a file."""
    import os

    if os.geteuid() == 0:
        return Path("/proc/self")
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o555)
    return d


def test_an_unwritable_result_path_is_one_clear_error(pool: DevPool, worker: FakeWorker, task_dir: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`submit` without --out writes next to its input, which may be read-only (the sample in the
    Nix store): the OSError becomes one line naming the path and the fix, through the CLI too."""
    from hivemind.cli import main as cli_main

    target = _unwritable_dir(tmp_path) / "mytask.result.zip"
    with pytest.raises(SubmitError) as err:
        submit_task(pool.address, task_dir, "alice", "alice-pw", out_path=target, poll_interval_s=0.02,
                    on_output=lambda _t: None, timeout_s=60)
    message = str(err.value)
    assert "\n" not in message and str(target) in message and "--out" in message
    assert not target.with_name(target.name + ".part").exists()
    pw = tmp_path / "pw"
    pw.write_text("alice-pw\n")
    capsys.readouterr()
    rc = cli_main(["submit", str(task_dir), "--pool", pool.address, "--user", "alice", "--password-file", str(pw),
                   "--out", str(target), "--timeout", "60"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, lines
    assert lines[0].startswith("hivemind-worker: task ") and "can't be saved" in lines[0]
