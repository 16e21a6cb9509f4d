"""One uid per running venv task, from a configured range no account uses.

Why: tasks that share a uid can read and rewrite each other's files, signal and ptrace each
other, and a process one task leaves behind can tamper with the next. With a uid of its own per
task, the kernel's ordinary permission checks keep tasks apart, and RLIMIT_NPROC (per uid)
becomes per task.

A uid is handed out only when no account or group uses it (checked once, at probe) and no
process runs as it (checked at every allocation: a process a crashed worker left behind keeps
its uid out of use until it is gone). The gid is the same number: a group of its own.
"""

from __future__ import annotations

import grp
import os
import pwd
import threading
from collections.abc import Iterable
from pathlib import Path

from hivemind.executors.proc import TaskUser


class NoFreeUid(Exception):
    """Every uid of the range is taken by a running task or a leftover process."""


def range_conflicts(first: int, count: int, sub_files: tuple[str, ...] = ("/etc/subuid", "/etc/subgid")
                    ) -> list[str]:
    """Accounts, groups and subordinate id ranges (rootless containers map their users there)
    that overlap [first, first + count): the range must be nobody's."""
    last = first + count
    users = [f"user {p.pw_name} ({p.pw_uid})" for p in pwd.getpwall() if first <= p.pw_uid < last]
    groups = [f"group {g.gr_name} ({g.gr_gid})" for g in grp.getgrall() if first <= g.gr_gid < last]
    subs: list[str] = []
    for path in sub_files:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                lo, n = int(parts[1]), int(parts[2])
                if lo < last and first < lo + n:
                    subs.append(f"{path} range of {parts[0]} ({lo}-{lo + n - 1})")
    return users + groups + subs


def uids_with_processes(candidates: Iterable[int] | None = None) -> set[int]:
    """Real, effective, saved or filesystem uids of every running process (from /proc)."""
    want = set(candidates) if candidates is not None else None
    found: set[int] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        ids = {int(x) for x in line.split()[1:]}
                        found |= ids if want is None else ids & want
                        break
        except OSError:
            continue
    return found


class UidPool:
    """Thread-safe allocator over [first, first + count)."""

    def __init__(self, first: int, count: int) -> None:
        self.first = first
        self.count = count
        self._used: dict[int, str] = {}
        self._lock = threading.Lock()

    def allocate(self, task_id: str) -> TaskUser:
        with self._lock:
            free = [u for u in range(self.first, self.first + self.count) if u not in self._used]
            busy = uids_with_processes(free)
            for uid in free:
                if uid not in busy:
                    self._used[uid] = task_id
                    return TaskUser(name=f"hivemind-task-{uid}", uid=uid, gid=uid)
        raise NoFreeUid(f"no free task uid in {self.first}..{self.first + self.count - 1}")

    def claim(self, uid: int, task_id: str) -> None:
        """A recovered task keeps the uid it was started with."""
        with self._lock:
            self._used[uid] = task_id

    def release(self, uid: int) -> None:
        with self._lock:
            self._used.pop(uid, None)

    def in_use(self) -> dict[int, str]:
        with self._lock:
            return dict(self._used)
