"""What the kernel really applies to a running process: its cgroups' memory, CPU and pids limits.

Podman's `inspect` shows what Podman *asked* for, and rootless Podman on cgroup v1 asks for
nothing without an error. This module reads the truth from the process itself:
/proc/PID/cgroup names its cgroup in each hierarchy, and the limit files there say what holds.

A limit counts as applied only when the kernel value matches what the task was granted and the
cgroup is the task's own (its path names the container id): a rootless container on cgroup v1
sits in its API service's cgroup, whose limits, if any, are not the task's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"
_UNLIMITED = 1 << 62          # v1 writes "no limit" as a huge page-aligned number


@dataclass(frozen=True)
class CgroupPlace:
    """Where a process sits: cgroup version and its path per controller (relative to the root)."""

    version: int                       # 1 (v1 or hybrid) or 2 (unified only)
    paths: dict[str, str]              # controller ("memory", "cpu", "pids", "") -> path

    def path(self, controller: str) -> str | None:
        if self.version == 2:
            return self.paths.get("")
        return self.paths.get(controller)


@dataclass(frozen=True)
class KernelLimits:
    """Limits found in the cgroup files of one process; None where the file says unlimited."""

    place: CgroupPlace
    memory_bytes: int | None
    cpus: float | None                 # quota / period, in cores
    pids: int | None
    files: dict[str, str]              # limit -> the file it was read from (for the record)


@dataclass(frozen=True)
class AppliedLimit:
    requested: float | int | None
    applied: float | int | None        # None: not enforced by the kernel
    how: str                           # the cgroup file and value, or why it isn't applied

    def as_dict(self) -> dict[str, object]:
        return {"requested": self.requested, "applied": self.applied, "how": self.how}


def parse_proc_cgroup(text: str, unified: bool) -> CgroupPlace:
    """/proc/PID/cgroup lines are `id:controllers:path`; v2 has the single line `0::path`."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, controllers, path = parts
        if controllers == "":
            if unified:
                paths[""] = path
            continue
        for c in controllers.split(","):
            paths[c.removeprefix("name=")] = path
    return CgroupPlace(2 if unified else 1, paths)


def is_unified(cgroup_root: str = CGROUP_ROOT) -> bool:
    """A pure cgroup v2 host has cgroup.controllers at the root (a hybrid one under unified/)."""
    return os.path.exists(f"{cgroup_root}/cgroup.controllers")


def place_of(pid: int, proc_root: str = "/proc", cgroup_root: str = CGROUP_ROOT) -> CgroupPlace | None:
    try:
        text = Path(f"{proc_root}/{pid}/cgroup").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None              # the process already exited
    return parse_proc_cgroup(text, is_unified(cgroup_root))


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _v1_dir(cgroup_root: str, controller: str, rel: str) -> str:
    # Co-mounted controllers (cpu,cpuacct) get a per-controller symlink, so this name works.
    return f"{cgroup_root}/{controller}{rel}"


def read_limits(place: CgroupPlace, cgroup_root: str = CGROUP_ROOT) -> KernelLimits:
    files: dict[str, str] = {}
    mem: int | None = None
    cpus: float | None = None
    pids: int | None = None
    if place.version == 2:
        d = f"{cgroup_root}{(place.path('') or '/').rstrip('/')}"
        if (v := _read(f"{d}/memory.max")) is not None:
            files["memory"] = f"{d}/memory.max"
            mem = int(v) if v.isdigit() else None
        if (v := _read(f"{d}/cpu.max")) is not None:
            files["cpu"] = f"{d}/cpu.max"
            q, _, per = v.partition(" ")       # "max 100000" when unlimited
            if q.isdigit() and per.isdigit() and int(per) > 0:
                cpus = int(q) / int(per)
        if (v := _read(f"{d}/pids.max")) is not None:
            files["pids"] = f"{d}/pids.max"
            pids = int(v) if v.isdigit() else None
        return KernelLimits(place, mem, cpus, pids, files)
    if (mrel := place.path("memory")) is not None:
        f = _v1_dir(cgroup_root, "memory", mrel.rstrip("/")) + "/memory.limit_in_bytes"
        if (v := _read(f)) is not None:
            files["memory"] = f
            mem = int(v) if v.isdigit() and int(v) < _UNLIMITED else None
    if (crel := place.path("cpu")) is not None:
        cdir = _v1_dir(cgroup_root, "cpu", crel.rstrip("/"))
        quota, period = _read(f"{cdir}/cpu.cfs_quota_us"), _read(f"{cdir}/cpu.cfs_period_us")
        if quota is not None and period is not None:
            files["cpu"] = f"{cdir}/cpu.cfs_quota_us"
            if quota.lstrip("-").isdigit() and int(quota) > 0 and period.isdigit() and int(period) > 0:
                cpus = int(quota) / int(period)
    if (prel := place.path("pids")) is not None:
        f = _v1_dir(cgroup_root, "pids", prel.rstrip("/")) + "/pids.max"
        if (v := _read(f)) is not None:
            files["pids"] = f
            pids = int(v) if v.isdigit() else None
    return KernelLimits(place, mem, cpus, pids, files)


def own_cgroup(place: CgroupPlace, container_id: str, controller: str) -> bool:
    """The cgroup was made for this container (Podman names it libpod-ID[.scope])."""
    path = place.path(controller)
    return bool(path and container_id and f"libpod-{container_id}" in path)


def compare(memory_bytes: int | None, cpus: float | None, pids: int | None,
            kernel: KernelLimits, container_id: str) -> dict[str, AppliedLimit]:
    """Per limit: what the container was given (the spec's values), what the kernel enforces
    for this task, and how we know. None requested: the limit was not asked for."""
    page = 4096
    checks: list[tuple[str, str, float | int | None, float | int | None, bool]] = [
        ("memory_bytes", "memory", memory_bytes, kernel.memory_bytes,
         memory_bytes is not None and kernel.memory_bytes is not None
         and abs(kernel.memory_bytes - memory_bytes) < page),      # the kernel rounds to pages
        ("cpus", "cpu", cpus, kernel.cpus,
         cpus is not None and kernel.cpus is not None and abs(kernel.cpus - cpus) < 1e-6),
        ("pids", "pids", pids, kernel.pids, pids is not None and kernel.pids == pids),
    ]
    out: dict[str, AppliedLimit] = {}
    v = f"cgroup v{kernel.place.version}"
    for name, ctl, want, got, matches in checks:
        where = kernel.files.get(ctl)
        if want is None:
            out[name] = AppliedLimit(None, None, "not requested")
        elif where is None:
            out[name] = AppliedLimit(want, None, f"not applied: no {ctl} cgroup file for the task ({v})")
        elif not own_cgroup(kernel.place, container_id, ctl):
            out[name] = AppliedLimit(want, None, f"not applied: the task shares cgroup "
                                                 f"{kernel.place.path(ctl)} ({v}; {_fmt(got)} there)")
        elif not matches:
            out[name] = AppliedLimit(want, None, f"not applied: {where} holds {_fmt(got)}")
        else:
            out[name] = AppliedLimit(want, got, f"{v} {where} = {_fmt(got)}")
    return out


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "no limit"
    return f"{value:g}" if isinstance(value, float) else str(value)
