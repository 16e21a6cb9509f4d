"""The portable backend: psutil for the machine, plain file reads for the cgroup.

Slower than the native library (several Python-level reads and parses per snapshot) but always
available. It fills exactly the same figures, computed the same way.
"""

from __future__ import annotations

import os
import threading

import psutil

from hivemind.metrics.model import (
    DEFAULT_CGROUP_ROOT,
    CgroupStats,
    MetricsError,
    Snapshot,
    TreeUsage,
)

# cgroup v1 writes "no limit" as a huge page-aligned number.
_UNLIMITED = 1 << 62


class PsutilSource:
    """Thread-safe; the cgroup figures are plain reads, the rest psutil."""

    backend = "psutil"

    def __init__(self, fallback_reason: str | None = None,
                 cgroup_root: str = DEFAULT_CGROUP_ROOT) -> None:
        self.fallback_reason = fallback_reason
        self._cgroup_root = cgroup_root
        self._prev: tuple[float, float] | None = None
        self._lock = threading.Lock()

    def snapshot(self, disk_path: str = "/", cgroup_path: str | None = None) -> Snapshot:
        try:
            disk = psutil.disk_usage(disk_path or "/")
        except OSError as exc:
            raise MetricsError(f"statfs {disk_path}: {exc.strerror or type(exc).__name__}") from None
        mem = psutil.virtual_memory()
        swap = psutil.swap_memory()
        load1, load5, load15 = psutil.getloadavg()
        return Snapshot(
            cpu_count=psutil.cpu_count(logical=True) or 1,
            cpu_busy=self._busy(),
            load1=load1, load5=load5, load15=load15,
            memory_total=mem.total, memory_available=mem.available,
            swap_total=swap.total, swap_free=swap.free,
            disk_total=disk.total, disk_free=disk.free,
            cgroup=read_cgroup(self._cgroup_root, cgroup_path) if cgroup_path else None,
        )

    def _busy(self) -> float:
        # The same sum as the native library: guest time is already inside user/nice.
        t = psutil.cpu_times()
        total = float(sum(t)) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        idle = float(t.idle) + getattr(t, "iowait", 0.0)
        with self._lock:
            prev, self._prev = self._prev, (total, idle)
        dt, di = total, idle
        if prev is not None and total >= prev[0] and idle >= prev[1]:
            dt, di = total - prev[0], idle - prev[1]
        if dt <= 0 or di > dt:
            return 0.0
        return (dt - di) / dt

    def tree(self, pid: int) -> TreeUsage | None:
        if pid <= 0:
            raise MetricsError("pid must be positive")
        try:
            root = psutil.Process(pid)
            members = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return None
        except psutil.Error as exc:
            raise MetricsError(f"process tree of {pid}: {exc}") from None
        procs, cpu, rss = 0, 0.0, 0
        for p in members:
            try:
                with p.oneshot():
                    if p.status() == psutil.STATUS_ZOMBIE:
                        continue
                    t = p.cpu_times()
                    cpu += t.user + t.system + t.children_user + t.children_system
                    rss += p.memory_info().rss
                    procs += 1
            except psutil.NoSuchProcess:
                continue    # exited while we looked: as if it had never been counted
            except psutil.Error as exc:
                raise MetricsError(f"process {p.pid}: {exc}") from None
        if procs == 0:
            return None
        return TreeUsage(procs=procs, cpu_seconds=cpu, rss_bytes=rss)

    def close(self) -> None:
        with self._lock:
            self._prev = None


def read_cgroup(root: str, cgroup_path: str) -> CgroupStats | None:
    """One cgroup's figures, v1 or v2; None when it doesn't exist. Mirrors native/collect.go."""
    if ".." in cgroup_path:
        raise MetricsError("cgroup path must not contain '..'")
    rel = "/" + cgroup_path.strip("/")
    rel = "" if rel == "/" else rel
    if os.path.exists(f"{root}/cgroup.controllers"):
        d = root + rel
        if not os.path.exists(f"{d}/cgroup.procs"):
            return None
        cpu_ns = 0
        for line in _read(f"{d}/cpu.stat").splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                cpu_ns = _int(value) * 1000
        return CgroupStats(
            version=2, cpu_usage_ns=cpu_ns,
            memory_current=_int(_read(f"{d}/memory.current")),
            memory_peak=_int(_read(f"{d}/memory.peak")) or None,
            memory_limit=_limit(_read(f"{d}/memory.max")),
            pids_current=_int(_read(f"{d}/pids.current")),
            pids_limit=_limit(_read(f"{d}/pids.max")),
        )
    mem = f"{root}/memory{rel}"
    if not os.path.exists(f"{mem}/cgroup.procs"):
        return None
    pids = f"{root}/pids{rel}"
    return CgroupStats(
        version=1,
        cpu_usage_ns=_int(_read(f"{root}/cpuacct{rel}/cpuacct.usage")),
        memory_current=_int(_read(f"{mem}/memory.usage_in_bytes")),
        memory_peak=_int(_read(f"{mem}/memory.max_usage_in_bytes")) or None,
        memory_limit=_limit(_read(f"{mem}/memory.limit_in_bytes")),
        pids_current=_int(_read(f"{pids}/pids.current")),
        pids_limit=_limit(_read(f"{pids}/pids.max")),
    )


def _read(path: str) -> str:
    # Missing files are normal: pids.current isn't in a v1 root cgroup, memory.peak is new.
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError:
        return ""


def _int(text: str) -> int:
    text = text.strip()
    return int(text) if text.isdigit() else 0


def _limit(text: str) -> int | None:
    value = _int(text)
    return value if 0 < value < _UNLIMITED else None
