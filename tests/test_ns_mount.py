"""The disk quota's mount helper (native/ns-mount) in a real private mount namespace, the kind
rootless Podman's pause process holds on a host whose / is private: a workspace's quota mount
made on the host shows up there only through the helper, and goes away with it. The helper
refuses what is not a loop device onto a workspace, and it ends with the worker, however the
worker ends.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivemind.executors.disk_quota import DiskQuota, _mount_source
from hivemind.executors.ns_mount import NamespaceMounts, NsMountError, _Helper, ns_mount_binary

LOG = logging.getLogger("test.ns_mount")
BINARY = ns_mount_binary()
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not DiskQuota._loop_usable(),
                       reason="needs root, mkfs.ext4 and loop devices"),
    pytest.mark.skipif(BINARY is None, reason="hm-ns-mount is not built (make -C native)"),
]


@pytest.fixture
def namespace() -> Iterator[int]:
    """A process in its own mount namespace, whose mounts are private (as the pause process's are
    on this machine)."""
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "300"])
    try:
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{proc.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            assert time.monotonic() < deadline, "unshare did not make a mount namespace"
            time.sleep(0.01)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def tasks(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "tasks"
    (root / "t1" / "workspace").mkdir(parents=True)
    yield root
    for ws in root.glob("*/workspace"):
        if os.path.ismount(ws):
            subprocess.run(["umount", "-l", str(ws)], capture_output=True)


def _helpers() -> list[int]:
    out = subprocess.run(["pgrep", "-x", "hm-ns-mount"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _seen_by(pid: int, target: Path) -> str | None:
    return _mount_source(Path(f"/proc/{pid}/mountinfo"), target)


def test_a_quota_mount_reaches_a_private_namespace_through_the_helper(namespace: int, tasks: Path) -> None:
    ws = tasks / "t1" / "workspace"
    quota = DiskQuota(64 * 1024 * 1024, 0, tasks.parent / "images", LOG)
    before = set(_helpers())
    try:
        quota.apply("t1", ws, [namespace])
        device = _mount_source(Path("/proc/self/mountinfo"), ws)
        assert device is not None and device.startswith("/dev/loop")
        assert _seen_by(namespace, ws) == device       # the same filesystem, in both views
        helpers = set(_helpers()) - before
        assert len(helpers) == 1, "one helper for the namespace"
        (helper,) = helpers
        assert os.readlink(f"/proc/{helper}/ns/mnt") == os.readlink(f"/proc/{namespace}/ns/mnt")
        # A second task reuses the helper: no new process.
        (tasks / "t2" / "workspace").mkdir(parents=True)
        quota.apply("t2", tasks / "t2" / "workspace", [namespace])
        assert _seen_by(namespace, tasks / "t2" / "workspace") is not None
        assert set(_helpers()) - before == {helper}
        quota.release("t1", ws, [namespace])
        quota.release("t2", tasks / "t2" / "workspace", [namespace])
        assert _seen_by(namespace, ws) is None
        assert not os.path.ismount(ws)
    finally:
        quota.close()
    assert set(_helpers()) - before == set(), "close() ends the helper"


def test_a_dead_helper_is_replaced(namespace: int, tasks: Path) -> None:
    ws = tasks / "t1" / "workspace"
    quota = DiskQuota(64 * 1024 * 1024, 0, tasks.parent / "images", LOG)
    try:
        quota.apply("t1", ws, [namespace])
        quota.release("t1", ws, [namespace])
        for pid in _helpers():
            if os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink(f"/proc/{namespace}/ns/mnt"):
                os.kill(pid, signal.SIGKILL)
        quota.apply("t1", ws, [namespace])
        assert _seen_by(namespace, ws) is not None
        quota.release("t1", ws, [namespace])
        assert _seen_by(namespace, ws) is None
    finally:
        quota.close()


def test_the_helper_refuses_what_is_not_a_loop_device_on_a_workspace(namespace: int, tasks: Path) -> None:
    assert BINARY is not None
    helper = _Helper(BINARY, namespace, tasks)
    try:
        refused = [
            ("mount", "/dev/sda", str(tasks / "t1" / "workspace")),      # not a loop device
            ("mount", "/dev/loop0", "/etc"),                             # not under the root
            ("mount", "/dev/loop0", f"{tasks}/t1/../../../etc"),         # climbs out
            ("mount", "/dev/loop0", str(tasks)),                         # the root itself
            ("umount", "/proc"),
            ("bind", "/", str(tasks / "t1" / "workspace")),
        ]
        for request in refused:
            with pytest.raises(NsMountError, match="error"):
                helper.request(*request)
        with pytest.raises(NsMountError, match="tab or a newline"):
            helper.request("umount", f"{tasks}/t1/workspace\nmount\t/dev/loop0\t/etc")
        assert helper.alive(), "a refused request leaves the helper serving"
        helper.request("ping")
    finally:
        helper.close()
    assert not helper.alive()


def test_the_helper_ends_with_a_killed_worker(namespace: int, tasks: Path) -> None:
    """kill -9 of the worker: the pipe's write end goes with it, and the helper exits."""
    code = (
        "import logging, sys, time\n"
        "from pathlib import Path\n"
        "from hivemind.executors.ns_mount import NamespaceMounts\n"
        "m = NamespaceMounts(logging.getLogger())\n"
        f"m._helper({namespace}, Path({str(tasks)!r}))\n"
        "print('ready', flush=True)\n"
        "time.sleep(300)\n")
    before = set(_helpers())
    worker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        spawned = set(_helpers()) - before
        assert len(spawned) == 1
    finally:
        worker.kill()
        worker.wait()
    deadline = time.monotonic() + 10
    while set(_helpers()) & spawned:
        assert time.monotonic() < deadline, "the helper outlived the worker"
        time.sleep(0.05)


def test_without_the_helper_nsenter_does_it(namespace: int, tasks: Path) -> None:
    ws = tasks / "t1" / "workspace"
    quota = DiskQuota(64 * 1024 * 1024, 0, tasks.parent / "images", LOG)
    quota._ns = NamespaceMounts(LOG, use_helper=False)
    before = set(_helpers())
    try:
        quota.apply("t1", ws, [namespace])
        assert _seen_by(namespace, ws) is not None
        assert set(_helpers()) == before
        quota.release("t1", ws, [namespace])
        assert _seen_by(namespace, ws) is None
    finally:
        quota.close()
