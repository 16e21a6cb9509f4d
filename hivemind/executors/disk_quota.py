"""A disk quota per task: what a task may write into its workspace.

How it is enforced, best first:
- `loop-ext4` (the worker is root and has mkfs.ext4 and loop devices): the workspace is a
  filesystem of its own, a sparse ext4 image loop-mounted on the workspace directory before the
  archive is extracted into it. The kernel refuses writes past it (ENOSPC), for every executor
  (Podman bind-mounts the same directory), so a task can't pass its quota by a byte.
- `polling` (otherwise): the workspace's size is measured every `POLL_INTERVAL_S`; a task over
  its quota is stopped. A fast writer passes the quota by what it writes in one interval (the
  record and status say so).

Either way the runner stops a task that has filled its quota with reason `disk_quota`, and its
partial result is still packed. The host keeps `reserve_bytes` free: a task's quota is lowered
to what is free beyond the reserve and beyond what running tasks may still write (images are
sparse, so this is accounted here, not by the filesystem).

Life cycle, called by the runner: `apply` once the workspace directory exists (empty), `resume`
after a worker restart, `exceeded` while the task runs, `release` after the result is packed
(idempotent). `sweep` at start unmounts and removes what a crashed worker left for tasks it no
longer knows.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from hivemind.errors import HivemindError
from hivemind.executors.loop_mount import loop_mount, unmount
from hivemind.executors.ns_mount import NamespaceMounts

MiB = 1024 * 1024
POLL_INTERVAL_S = 2.0
# The loop filesystem's own metadata takes some space: the image is this much bigger, so the
# task gets about its quota to write.
_OVERHEAD_MIN = 4 * MiB
_OVERHEAD_RATIO = 0.03
# Full: less free than this (ext4 keeps no root reserve here: -m 0).
FULL_BELOW_BYTES = 1 * MiB            # a task writing 1 MiB blocks is refused with up to this left
_SPARE = "_spare"                      # a formatted image waiting for the next task
MIN_QUOTA_BYTES = 16 * MiB

_MOUNT_DATA = "noinit_itable"


class DiskQuotaError(HivemindError):
    """No room for the task's quota on the host (after the reserve), or the mount failed."""


@dataclass(frozen=True)
class QuotaInfo:
    quota_bytes: int                   # what the task may write (0: no quota)
    method: str                        # "loop-ext4" | "polling" | "none"
    detail: str                        # how it is enforced, in words (for the record and status)

    def record(self, used: int | None, exceeded: bool) -> dict[str, object]:
        return {"bytes": self.quota_bytes, "enforced_by": self.method, "detail": self.detail,
                "used_bytes": used, "exceeded": exceeded}


NO_QUOTA = QuotaInfo(0, "none", "no disk quota (executor.disk_quota_mb: 0)")


def _tree_bytes(root: Path) -> tuple[int, bool]:
    """Allocated bytes under `root`, never following symlinks, and whether every directory
    could be read (a task can chmod one of its directories to 000)."""
    total = 0
    complete = True
    stack = [str(root)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        complete = False
                        continue
                    total += st.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except FileNotFoundError:
            continue
        except OSError:
            complete = False
    return total, complete


def _fs_used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class DiskQuota:
    def __init__(self, quota_bytes: int, reserve_bytes: int, images_dir: Path,
                 logger: logging.Logger, *, loop: bool | None = None) -> None:
        self.quota_bytes = quota_bytes
        self.reserve_bytes = reserve_bytes
        self._images = images_dir
        self._log = logger
        self._lock = threading.Lock()
        self._active: dict[str, tuple[QuotaInfo, Path]] = {}
        self._ns_pids: dict[str, list[int]] = {}
        self._fs_baseline: dict[str, int] = {}
        self._loop = self._loop_usable() if loop is None else loop
        self._ns = NamespaceMounts(logger)

    @staticmethod
    def _loop_usable() -> bool:
        return (os.geteuid() == 0 and shutil.which("mkfs.ext4") is not None
                and shutil.which("mount") is not None and os.path.exists("/dev/loop-control"))

    @property
    def method(self) -> str:
        if not self.quota_bytes:
            return "none"
        return "loop-ext4" if self._loop else "polling"

    def describe(self) -> str:
        """One line for status: how quotas are enforced on this machine."""
        if not self.quota_bytes:
            return NO_QUOTA.detail
        if self._loop:
            return (f"{self.quota_bytes // MiB} MiB per task, a loop-mounted ext4 filesystem per "
                    "workspace (the kernel refuses writes past it)")
        return (f"{self.quota_bytes // MiB} MiB per task, polled every {POLL_INTERVAL_S:g} s "
                "(a fast writer passes it by what it writes in that time)")

    def _image(self, task_id: str) -> Path:
        return self._images / f"{task_id}.img"

    def _room(self) -> int:
        """What may still be promised: free space beyond the reserve and beyond what running
        tasks' sparse images may still grow into."""
        self._images.mkdir(parents=True, exist_ok=True)
        st = os.statvfs(self._images)
        free = st.f_bavail * st.f_frsize
        promised = 0
        for task_id, (info, _ws) in self._active.items():
            if info.method == "loop-ext4":
                with contextlib.suppress(OSError):
                    img = self._image(task_id).stat()
                    promised += max(0, img.st_size - img.st_blocks * 512)
        return free - self.reserve_bytes - promised

    def apply(self, task_id: str, workspace: Path, namespaces: Sequence[int] = ()) -> QuotaInfo:
        """Put the quota on `workspace` (an existing, empty directory), also in the mount
        namespaces of the processes `namespaces` (rootless Podman's). Raises DiskQuotaError
        when the host has no room for even a small quota beyond its reserve."""
        if not self.quota_bytes:
            return NO_QUOTA
        with self._lock:
            room = self._room()
            quota = min(self.quota_bytes, room)
            if quota < MIN_QUOTA_BYTES:
                raise DiskQuotaError(
                    f"not enough free disk for a task: {max(room, 0) // MiB} MiB free beyond "
                    f"the reserve of {self.reserve_bytes // MiB} MiB (executor.disk_reserve_mb)")
            if self._loop:
                info = self._mount(task_id, workspace, quota)
                self._ns_pids[task_id] = self._mount_in_namespaces(workspace, namespaces)
            else:
                info = QuotaInfo(quota, "polling",
                                 f"workspace size polled every {POLL_INTERVAL_S:g} s; a fast "
                                 "writer passes the quota by what it writes in that time")
                self._fs_baseline[task_id] = _fs_used(workspace)
            self._active[task_id] = (info, workspace)
        if quota < self.quota_bytes:
            self._log.info("task %s: disk quota lowered to %d MiB (free space beyond the reserve)",
                           task_id, quota // MiB, extra={"task_id": task_id})
        return info

    @staticmethod
    def _format(image: Path, quota: int) -> None:
        size = quota + max(_OVERHEAD_MIN, int(quota * _OVERHEAD_RATIO))
        with open(image, "wb") as f:
            f.truncate(size)
        os.chmod(image, 0o600)
        # No journal and no resize inode (nobody grows or replays it); one inode per 64 KiB:
        # mkfs of 10 GiB then takes ~15 ms instead of ~60.
        inodes = max(16384, min(4 * 1024 * 1024, quota // (64 * 1024)))
        _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal,^resize_inode",
              "-N", str(inodes), str(image)])

    def _make_spare(self) -> None:
        """Format the next task's image ahead of time, off the dispatch path."""
        spare = self._images / f"{_SPARE}.img"
        tmp = self._images / f"{_SPARE}-{os.getpid()}-{threading.get_ident()}.tmp"
        if spare.exists():
            return
        try:
            self._images.mkdir(parents=True, exist_ok=True)
            self._format(tmp, self.quota_bytes)
            os.replace(tmp, spare)
        except (OSError, DiskQuotaError) as exc:
            self._log.debug("no spare quota image: %s", exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _take_spare(self, image: Path, quota: int) -> bool:
        spare = self._images / f"{_SPARE}.img"
        if quota != self.quota_bytes:
            return False
        try:
            os.rename(spare, image)
        except OSError:
            return False
        return True

    def _mount(self, task_id: str, workspace: Path, quota: int) -> QuotaInfo:
        image = self._image(task_id)
        try:
            if not self._take_spare(image, quota):
                self._format(image, quota)
            threading.Thread(target=self._make_spare, name="quota-spare", daemon=True).start()
            # noinit_itable: the kernel would otherwise zero the inode tables (~40 MiB at 10 GiB)
            # in the background of every task, for a filesystem nobody will fsck.
            try:
                loop_mount(image, workspace, data=_MOUNT_DATA)
            except OSError as exc:   # an old kernel or no free device: mount(8) finds one
                self._log.debug("direct loop mount failed (%s); using mount(8)", exc)
                _run(["mount", "-o", f"loop,nosuid,nodev,{_MOUNT_DATA}", str(image), str(workspace)])
        except (OSError, DiskQuotaError) as exc:
            with contextlib.suppress(OSError):
                image.unlink()
            raise DiskQuotaError(f"could not set up the disk quota of task {task_id}: {exc}") from None
        with contextlib.suppress(OSError):
            (workspace / "lost+found").rmdir()
        os.chmod(workspace, 0o755)
        # Usable space, as the filesystem reports it: what the task can really write.
        st = os.statvfs(workspace)
        usable = st.f_bavail * st.f_frsize
        return QuotaInfo(usable, "loop-ext4",
                         f"a {usable // MiB} MiB ext4 filesystem loop-mounted on the workspace; "
                         "the kernel refuses writes past it")

    def resume(self, task_id: str, workspace: Path) -> QuotaInfo:
        """After a restart: the quota a running task already has (its mount survived us)."""
        if not self.quota_bytes:
            return NO_QUOTA
        if os.path.ismount(workspace):
            st = os.statvfs(workspace)
            used = (st.f_blocks - st.f_bfree) * st.f_frsize
            info = QuotaInfo(st.f_bavail * st.f_frsize + used, "loop-ext4",
                             "a loop-mounted ext4 filesystem on the workspace (resumed)")
        else:
            info = QuotaInfo(self.quota_bytes, "polling",
                             f"workspace size polled every {POLL_INTERVAL_S:g} s (resumed)")
        with self._lock:
            self._active[task_id] = (info, workspace)
        return info

    def used(self, task_id: str) -> int | None:
        with self._lock:
            entry = self._active.get(task_id)
        if entry is None:
            return None
        info, workspace = entry
        try:
            if info.method == "loop-ext4":
                st = os.statvfs(workspace)
                return (st.f_blocks - st.f_bfree) * st.f_frsize
            return _tree_bytes(workspace)[0]
        except OSError:
            return None

    def exceeded(self, task_id: str) -> bool:
        """True once the task has filled its quota (loop: the filesystem is full; polling: the
        workspace is at or past the quota)."""
        with self._lock:
            entry = self._active.get(task_id)
        if entry is None or entry[0].method == "none":
            return False
        info, workspace = entry
        try:
            if info.method == "loop-ext4":
                st = os.statvfs(workspace)
                return st.f_bavail * st.f_frsize < FULL_BELOW_BYTES
            used, complete = _tree_bytes(workspace)
            if used >= info.quota_bytes:
                return True
            # A directory we can't read hides what is in it: then the filesystem's growth since
            # the task started counts instead (which also counts what others wrote meanwhile).
            baseline = self._fs_baseline.get(task_id)
            return not complete and baseline is not None and \
                _fs_used(workspace) - baseline >= info.quota_bytes
        except OSError:
            return False

    def _mount_in_namespaces(self, workspace: Path, pids: Sequence[int]) -> list[int]:
        """Mount the workspace's loop device again in other mount namespaces where the host
        mount is not visible (the same filesystem: both views are one)."""
        source = _mount_source(Path("/proc/self/mountinfo"), workspace)
        if source is None or not pids:
            return []
        ours = os.readlink("/proc/self/ns/mnt")
        done: list[int] = []
        for pid in pids:
            try:
                if os.readlink(f"/proc/{pid}/ns/mnt") == ours:
                    continue
                if _mount_source(Path(f"/proc/{pid}/mountinfo"), workspace) is None:
                    self._ns_mount(pid, source, workspace)
                done.append(pid)
            except (OSError, DiskQuotaError) as exc:
                self._log.warning("disk quota mount not visible to process %d: %s", pid, exc)
        return done

    def _ns_mount(self, pid: int, source: str, workspace: Path) -> None:
        self._in_namespace(lambda: self._ns.mount(pid, source, workspace),
                           ["nsenter", f"--target={pid}", "--mount", "--", "mount", "-o",
                            "nosuid,nodev", source, str(workspace)])

    def _ns_umount(self, pid: int, workspace: Path) -> None:
        self._in_namespace(lambda: self._ns.umount(pid, workspace),
                           ["nsenter", f"--target={pid}", "--mount", "--", "umount", "-l",
                            str(workspace)])

    def _in_namespace(self, by_helper: Callable[[], None], fallback: list[str]) -> None:
        """The mount helper does it; where it isn't built or failed, nsenter and mount(8) do."""
        try:
            by_helper()
            return
        except OSError as exc:
            if self._ns.available:
                self._log.debug("mount helper: %s; using nsenter", exc)
        _run(fallback)

    def release(self, task_id: str, workspace: Path, namespaces: Sequence[int] = ()) -> None:
        """Unmount and delete the task's filesystem (its files go with it), here and in the
        mount namespaces it was mounted in (and `namespaces`). Idempotent."""
        with self._lock:
            self._active.pop(task_id, None)
            self._fs_baseline.pop(task_id, None)
            pids = set(self._ns_pids.pop(task_id, [])) | set(namespaces)
        for pid in pids:
            with contextlib.suppress(OSError, DiskQuotaError):
                if _mount_source(Path(f"/proc/{pid}/mountinfo"), workspace) is not None \
                        and os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"):
                    self._ns_umount(pid, workspace)
        self._unmount(workspace)
        with contextlib.suppress(FileNotFoundError):
            self._image(task_id).unlink()

    def _unmount(self, workspace: Path) -> None:
        if not os.path.ismount(workspace):
            return
        try:
            try:
                unmount(workspace)
                return
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise DiskQuotaError(str(exc)) from None
            _run(["umount", str(workspace)])
        except DiskQuotaError:
            # Still busy (a process of the task holds a file): detach it now, the kernel frees
            # it when the last user goes.
            try:
                unmount(workspace, lazy=True)
            except OSError:
                with contextlib.suppress(DiskQuotaError):
                    _run(["umount", "-l", str(workspace)])

    def close(self) -> None:
        """Stop the mount helpers and remove the spare image (and half-made ones); running
        tasks keep theirs."""
        self._ns.close()
        if not self._images.is_dir():
            return
        for p in [*self._images.glob(f"{_SPARE}*.tmp"), self._images / f"{_SPARE}.img"]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def sweep(self, tasks_root: Path, keep: Collection[str],
              namespaces: Sequence[int] = ()) -> list[str]:
        """Unmount workspaces under `tasks_root` (also in `namespaces`) and remove images of
        tasks not in `keep` (what a crashed worker left); returns the task ids cleaned."""
        cleaned: list[str] = []
        self.close()
        for image in sorted(self._images.glob("*.img")) if self._images.is_dir() else []:
            task_id = image.stem
            if task_id in keep:
                continue
            self.release(task_id, tasks_root / task_id / "workspace", namespaces)
            with contextlib.suppress(FileNotFoundError):
                image.unlink()
            cleaned.append(task_id)
        if tasks_root.is_dir():
            for ws in tasks_root.glob("*/workspace"):
                if ws.parent.name not in keep and os.path.ismount(ws):
                    self._unmount(ws)
                    cleaned.append(ws.parent.name)
        if cleaned:
            self._log.info("removed disk quota filesystems left by an earlier worker: %s",
                           ", ".join(sorted(set(cleaned))))
        return sorted(set(cleaned))


def _mount_source(mountinfo: Path, target: Path) -> str | None:
    """The device mounted on `target` according to a mountinfo file, or None."""
    want = str(target)
    with open(mountinfo, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4].replace("\\040", " ") == want and " - " in line:
                return line.split(" - ", 1)[1].split()[1]
    return None


def _run(argv: list[str]) -> None:
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=60, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DiskQuotaError(f"{argv[0]}: {exc}") from None
    if proc.returncode != 0:
        raise DiskQuotaError(f"{argv[0]} failed: {proc.stderr.strip()[:300]}")
