"""A disk quota per task (issue 14): a task writing past its quota is stopped with reason
`disk_quota`, its partial result still comes back, and the host's disk is untouched beyond it.

As root the quota is a loop-mounted ext4 filesystem on the workspace (the kernel refuses the
write past it); otherwise the workspace is polled. Both are tested; the executor tests run a
real task on each executor this machine has (venv, Podman rootful).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivemind.archive import ArchiveRules
from hivemind.config import PodmanConfig, VenvConfig
from hivemind.devpool.testing import task_zip
from hivemind.executors.base import Executor, ExitReason, Limits
from hivemind.executors.disk_quota import DiskQuota, DiskQuotaError
from hivemind.output import TaskOutput
from hivemind.runner import RunnerPaths, RunnerResult, TaskRunner

from statedir import state_root

MiB = 1024 * 1024
QUOTA = 64 * MiB
LOG = logging.getLogger("test.disk_quota")
IMAGE = "localhost/hivemind-task:latest"
LOOP = DiskQuota._loop_usable()
needs_loop = pytest.mark.skipif(not LOOP, reason="needs root, mkfs.ext4 and loop devices")

# Writes 4x its quota, in 1 MiB steps so a polled quota sees it too; then says how far it got.
WRITER = ('i=0\nwhile [ $i -lt 256 ]; do\n'
          '  head -c 1048576 /dev/zero >> big.bin || { echo "write failed at $i MiB" >&2; exit 1; }\n'
          '  i=$((i+1))\ndone\necho wrote-everything\n')


@pytest.fixture
def base() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hm-quota-"))
    d.chmod(0o755)
    yield d
    for ws in d.glob("**/workspace"):
        if os.path.ismount(ws):
            subprocess.run(["umount", "-l", str(ws)], capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(path))]


@needs_loop
def test_loop_quota_refuses_the_write_past_it(base: Path) -> None:
    quota = DiskQuota(QUOTA, 0, base / "images", LOG)
    ws = base / "tasks" / "t1" / "workspace"
    ws.mkdir(parents=True)
    info = quota.apply("t1", ws)
    assert info.method == "loop-ext4" and QUOTA * 0.9 <= info.quota_bytes <= QUOTA * 1.1
    assert not any(ws.iterdir()), "the workspace must start empty (no lost+found)"
    written = 0
    with pytest.raises(OSError) as err, open(ws / "big.bin", "wb") as f:
        while written < 4 * QUOTA:
            f.write(b"\0" * MiB)
            f.flush()
            os.fsync(f.fileno())
            written += MiB
    assert err.value.errno == 28          # ENOSPC: the kernel enforces it
    assert written <= QUOTA * 1.1
    assert quota.exceeded("t1")
    image = base / "images" / "t1.img"
    assert image.stat().st_blocks * 512 <= QUOTA * 1.2
    quota.release("t1", ws)
    assert _mounts_under(base) == [] and not image.exists()
    quota.release("t1", ws)               # idempotent


def test_polling_quota(base: Path) -> None:
    quota = DiskQuota(QUOTA, 0, base / "images", LOG, loop=False)
    ws = base / "ws"
    ws.mkdir()
    info = quota.apply("t2", ws)
    assert info.method == "polling" and "polled" in info.detail
    (ws / "a.bin").write_bytes(b"\1" * (QUOTA // 2))
    assert not quota.exceeded("t2")
    (ws / "sub").mkdir()
    (ws / "sub" / "b.bin").write_bytes(b"\1" * (QUOTA // 2 + MiB))
    assert quota.exceeded("t2")
    assert (quota.used("t2") or 0) >= QUOTA


def test_reserve_lowers_or_refuses_the_quota(base: Path) -> None:
    st = os.statvfs(base)
    free = st.f_bavail * st.f_frsize
    refusing = DiskQuota(QUOTA, free + 1024 * MiB, base / "images", LOG, loop=False)
    (base / "ws").mkdir()
    with pytest.raises(DiskQuotaError, match="disk_reserve_mb"):
        refusing.apply("t3", base / "ws")
    lowering = DiskQuota(free, 1024 * MiB, base / "images", LOG, loop=False)
    assert lowering.apply("t4", base / "ws").quota_bytes < free


@needs_loop
def test_sweep_unmounts_what_a_crashed_worker_left(base: Path) -> None:
    tasks = base / "tasks"
    for tid in ("gone", "alive"):
        (tasks / tid / "workspace").mkdir(parents=True)
        DiskQuota(QUOTA, 0, base / "images", LOG).apply(tid, tasks / tid / "workspace")
    fresh = DiskQuota(QUOTA, 0, base / "images", LOG)     # a restarted worker
    assert fresh.sweep(tasks, keep={"alive"}) == ["gone"]
    assert not os.path.ismount(tasks / "gone" / "workspace")
    assert os.path.ismount(tasks / "alive" / "workspace")
    assert not (base / "images" / "gone.img").exists()
    fresh.sweep(tasks, keep=set())
    assert _mounts_under(base) == []


# -- a real task on each executor ---------------------------------------------------------

def _podman_usable() -> bool:
    if shutil.which("podman") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["podman", "image", "exists", IMAGE]).returncode == 0


def _hivemind_user() -> bool:
    import pwd

    try:
        pwd.getpwnam("hivemind")
        return True
    except KeyError:
        return False


@pytest.fixture(scope="module", params=["venv", "podman", "podman-rootless"])
def executor(request: pytest.FixtureRequest) -> Iterator[Executor]:
    # A state root others can traverse, 0755: the rootless service runs as `hivemind`, which must reach the state.
    state = Path(tempfile.mkdtemp(prefix="hm-quota-ex-", dir=state_root()))
    state.chmod(0o755)
    node = f"quota-{uuid.uuid4().hex[:8]}"
    try:
        if request.param == "venv":
            from hivemind.executors.venv import VenvExecutor

            (state / "venvs").mkdir(mode=0o755)
            yield VenvExecutor(VenvConfig(cache_dir=str(state / "venvs")), state / "venv", LOG, node)
            return
        if not _podman_usable():
            pytest.skip("needs root, podman and the task image (images/build)")
        from hivemind.executors.podman import PodmanExecutor
        from hivemind.executors.podman_service import PodmanService

        if request.param == "podman-rootless":
            if not _hivemind_user():
                pytest.skip("scripts/setup-podman has not created the hivemind user")
            rootless = PodmanExecutor(PodmanConfig(mode="rootless"), node, state / "podman", LOG, 60)
            try:
                yield rootless
            finally:
                rootless.close()
            return

        svc = PodmanService(PodmanConfig(mode="rootful"), LOG, rootful_socket=str(state / "p.sock"))
        svc.ensure()
        ex = PodmanExecutor(PodmanConfig(mode="rootful"), node, state / "podman", LOG,
                            prepare_timeout_s=120, service=svc)
        try:
            yield ex
        finally:
            ex.close()
            svc.close()
    finally:
        shutil.rmtree(state, ignore_errors=True)


def run_task(executor: Executor, base: Path, quota: DiskQuota) -> RunnerResult:
    task_id = f"quota-{uuid.uuid4().hex[:8]}"
    task_dir = base / "tasks" / task_id
    task_dir.mkdir(parents=True)
    for p in (base, base / "tasks", task_dir):
        p.chmod(0o755)
    paths = RunnerPaths(task_dir / "workspace", task_dir / "output.log", task_dir / "result.zip")
    results: list[RunnerResult] = []
    runner = TaskRunner(
        task_id, executor=executor, paths=paths,
        archive=task_zip({"run.sh": WRITER, "input.txt": "kept\n"}),
        limits=Limits(cpus=1.0, memory_bytes=512 * MiB, timeout_s=300), labels={},
        node_id="quota", rules=ArchiveRules(64 * MiB, 100, 64 * MiB, 200),
        max_result_bytes=512 * MiB, stop_grace_s=1, task_timeout_s=300,
        output=TaskOutput(task_id, paths.output_log), advance=lambda tid, st: None,
        started=lambda h: None, finished=results.append, logger=LOG, accepted_at=time.time(),
        quota=quota)
    runner.start()
    assert runner.join(300), "the task did not finish"
    (result,) = results
    return result


@needs_loop
def test_a_task_past_its_quota_is_stopped_with_reason_disk_quota(executor: Executor) -> None:
    base = Path(tempfile.mkdtemp(prefix="hm-quota-run-", dir=state_root()))
    base.chmod(0o755)
    try:
        _quota_run(executor, base)
    finally:
        for ws in base.glob("**/workspace"):
            if os.path.ismount(ws):
                subprocess.run(["umount", "-l", str(ws)], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _quota_run(executor: Executor, base: Path) -> None:
    quota = DiskQuota(QUOTA, 0, base / "images", LOG)
    result = run_task(executor, base, quota)
    record = result.record
    assert result.exit.reason is ExitReason.DISK_QUOTA, record
    assert record["reason"] == "disk_quota" and record["status"] == "failed"
    assert record["disk_quota"]["enforced_by"] == "loop-ext4"
    assert record["disk_quota"]["exceeded"] is True
    assert record["disk_quota"]["used_bytes"] <= QUOTA * 1.1
    # The partial result: the archive's file and what was written before the quota.
    with zipfile.ZipFile(result.result_zip) as zf:
        names = zf.namelist()
        assert "input.txt" in names and "_hivemind/execution.json" in names
        assert "wrote-everything" not in zf.read("_hivemind/output.log").decode()
    # Nothing left: no mount, no image of the task (a formatted spare waits for the next).
    assert _mounts_under(base) == []
    assert [p.name for p in (base / "images").glob("*.img")] in ([], ["_spare.img"])
    quota.close()
    assert list((base / "images").glob("*.img")) == []


def test_polling_sees_through_an_unreadable_directory(base: Path) -> None:
    """A task hiding its files behind chmod 000 is still caught (by the filesystem's growth)."""
    if os.geteuid() == 0:
        # Root reads any directory; run the probe as nobody where we can.
        pytest.skip("root bypasses directory permissions: the hiding can't happen")
    quota = DiskQuota(QUOTA, 0, base / "images", LOG, loop=False)
    ws = base / "ws2"
    ws.mkdir()
    quota.apply("t5", ws)
    hidden = ws / "hidden"
    hidden.mkdir()
    with open(hidden / "big.bin", "wb") as f:
        for _ in range(QUOTA // MiB + 2):
            f.write(b"\1" * MiB)
        os.fsync(f.fileno())
    hidden.chmod(0)
    try:
        assert quota.exceeded("t5")
    finally:
        hidden.chmod(0o700)


@needs_loop
def test_direct_loop_mount_enforces_the_size_and_detaches_its_device(tmp_path: Path) -> None:
    from hivemind.executors.loop_mount import loop_mount, unmount

    image, target = tmp_path / "fs.img", tmp_path / "mnt"
    target.mkdir()
    with open(image, "wb") as f:
        f.truncate(8 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", str(image)], check=True)
    dev = loop_mount(image, target)
    backing = Path("/sys/block", Path(dev).name, "loop", "backing_file")
    try:
        assert os.path.ismount(target)
        assert backing.read_text().strip() == str(image)
        with pytest.raises(OSError) as err, open(target / "big", "wb") as f:
            for _ in range(16):
                f.write(b"\0" * 1024 * 1024)
                f.flush()
                os.fsync(f.fileno())
        assert err.value.errno == 28      # ENOSPC: the filesystem's own size is the quota
    finally:
        unmount(target)
    assert not os.path.ismount(target)
    # Autoclear: the device let go of the image once the filesystem was unmounted.
    assert not backing.exists() or backing.read_text().strip() != str(image)
