"""ctypes binding of libhivemindmetrics (native/), and `open_metrics`, which picks a backend.

The library reads and parses every figure of a snapshot in one foreign call, which is where it
beats psutil (see bench/bench_metrics.py). It is found at the configured path, else next to the
package: an installed `hivemind/_native/`, then a source checkout's `native/build/`. Its ABI
version is checked before anything else is called. With backend "auto", any failure to load
falls back to psutil with one log line saying why.

Loading the library starts a Go runtime in this process, and a Go runtime does not survive
fork() without exec(): a child that calls into it hangs once Go's GC runs (seen here after some
thousands of snapshots). A NativeSource therefore refuses to work in a forked child (MetricsError)
instead of hanging. Use subprocess, or multiprocessing's "spawn" or "forkserver" start methods,
never "fork", in a process that uses the native backend.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

from hivemind.metrics.model import (
    DEFAULT_CGROUP_ROOT,
    CgroupStats,
    MetricsError,
    MetricsSource,
    MetricsUnavailable,
    Snapshot,
    TreeUsage,
)

ABI_VERSION = 2
LIBRARY_NAME = "libhivemindmetrics.so"
_ERROR_BUF = 512


class _CSnapshot(ctypes.Structure):
    """hm_snapshot_t from native/hivemind_metrics.h, field for field."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("cpu_count", ctypes.c_int32),
        ("cpu_busy", ctypes.c_double),
        ("load1", ctypes.c_double),
        ("load5", ctypes.c_double),
        ("load15", ctypes.c_double),
        ("mem_total", ctypes.c_uint64),
        ("mem_available", ctypes.c_uint64),
        ("swap_total", ctypes.c_uint64),
        ("swap_free", ctypes.c_uint64),
        ("disk_total", ctypes.c_uint64),
        ("disk_free", ctypes.c_uint64),
        ("cgroup_version", ctypes.c_int32),
        ("cgroup_found", ctypes.c_int32),
        ("cg_cpu_usage_ns", ctypes.c_uint64),
        ("cg_mem_current", ctypes.c_uint64),
        ("cg_mem_peak", ctypes.c_uint64),
        ("cg_mem_limit", ctypes.c_uint64),
        ("cg_pids_current", ctypes.c_uint64),
        ("cg_pids_limit", ctypes.c_uint64),
    ]


class _CTree(ctypes.Structure):
    """hm_tree_t from native/hivemind_metrics.h, field for field."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("found", ctypes.c_int32),
        ("procs", ctypes.c_uint64),
        ("cpu_ns", ctypes.c_uint64),
        ("rss_bytes", ctypes.c_uint64),
    ]


def library_candidates(library_path: str = "") -> list[Path]:
    """Where the library is looked for, in order. A configured path is the only candidate."""
    if library_path:
        return [Path(library_path)]
    package = Path(__file__).resolve().parent.parent  # hivemind/
    return [package / "_native" / LIBRARY_NAME,
            package.parent / "native" / "build" / LIBRARY_NAME]


def load_library(library_path: str = "") -> ctypes.CDLL:
    """Loads and checks the library; raises MetricsUnavailable saying why it can't be used."""
    candidates = library_candidates(library_path)
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise MetricsUnavailable(
            f"{LIBRARY_NAME} not found (looked in {', '.join(str(p) for p in candidates)})")
    path = found[0]
    try:
        lib = ctypes.CDLL(str(path))
        abi = lib.hm_abi_version
    except (OSError, AttributeError) as exc:
        raise MetricsUnavailable(f"{path} can't be loaded: {exc}") from None
    abi.argtypes, abi.restype = [], ctypes.c_int
    version = abi()
    if version != ABI_VERSION:
        raise MetricsUnavailable(f"{path} has ABI version {version}; this worker needs {ABI_VERSION}")
    _declare(lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    c_int, c_char_p = ctypes.c_int, ctypes.c_char_p
    lib.hm_open.argtypes, lib.hm_open.restype = [], c_int
    lib.hm_close.argtypes, lib.hm_close.restype = [c_int], c_int
    lib.hm_set_cgroup_root.argtypes, lib.hm_set_cgroup_root.restype = [c_int, c_char_p], c_int
    lib.hm_snapshot.argtypes = [c_int, c_char_p, c_char_p, ctypes.POINTER(_CSnapshot)]
    lib.hm_snapshot.restype = c_int
    lib.hm_tree.argtypes = [c_int, c_int, ctypes.POINTER(_CTree)]
    lib.hm_tree.restype = c_int
    lib.hm_last_error.argtypes = [c_int, ctypes.c_char_p, ctypes.c_size_t]
    lib.hm_last_error.restype = c_int


class NativeSource:
    """One handle of the native library: its own previous CPU counters, kept-open files (up to
    128 descriptors) and last error. Thread-safe."""

    backend = "native"
    fallback_reason: str | None = None

    def __init__(self, lib: ctypes.CDLL, cgroup_root: str = DEFAULT_CGROUP_ROOT) -> None:
        self._lib = lib
        self._pid = os.getpid()
        self._handle = lib.hm_open()
        if self._handle <= 0:
            raise MetricsUnavailable("hm_open failed")
        # Reused for every call: the library fills caller-owned memory only.
        self._out = _CSnapshot()
        self._tree = _CTree()
        self._lock = threading.Lock()
        self._err = ctypes.create_string_buffer(_ERROR_BUF)
        if cgroup_root != DEFAULT_CGROUP_ROOT and lib.hm_set_cgroup_root(
                self._handle, cgroup_root.encode()) != 0:
            raise MetricsUnavailable(f"cgroup root {cgroup_root!r} rejected: {self._last_error()}")

    def snapshot(self, disk_path: str = "/", cgroup_path: str | None = None) -> Snapshot:
        with self._lock:
            return self._snapshot(disk_path, cgroup_path)

    def _snapshot(self, disk_path: str, cgroup_path: str | None) -> Snapshot:
        if self._handle <= 0:
            raise MetricsError("metrics source is closed")
        if os.getpid() != self._pid:
            raise MetricsError("native metrics can't be used in a forked child (the Go runtime "
                               "hangs there); open a source after exec, or use spawn")
        out = self._out
        out.size = ctypes.sizeof(_CSnapshot)
        cg = cgroup_path.encode() if cgroup_path else None
        if self._lib.hm_snapshot(self._handle, (disk_path or "/").encode(), cg,
                                 ctypes.byref(out)) != 0:
            raise MetricsError(self._last_error())
        cgroup = None
        if out.cgroup_found:
            cgroup = CgroupStats(
                version=out.cgroup_version, cpu_usage_ns=out.cg_cpu_usage_ns,
                memory_current=out.cg_mem_current, memory_peak=out.cg_mem_peak or None,
                memory_limit=out.cg_mem_limit or None, pids_current=out.cg_pids_current,
                pids_limit=out.cg_pids_limit or None)
        return Snapshot(
            cpu_count=out.cpu_count, cpu_busy=out.cpu_busy,
            load1=out.load1, load5=out.load5, load15=out.load15,
            memory_total=out.mem_total, memory_available=out.mem_available,
            swap_total=out.swap_total, swap_free=out.swap_free,
            disk_total=out.disk_total, disk_free=out.disk_free, cgroup=cgroup)

    def tree(self, pid: int) -> TreeUsage | None:
        with self._lock:
            if self._handle <= 0:
                raise MetricsError("metrics source is closed")
            if os.getpid() != self._pid:
                raise MetricsError("native metrics can't be used in a forked child")
            out = self._tree
            out.size = ctypes.sizeof(_CTree)
            if self._lib.hm_tree(self._handle, pid, ctypes.byref(out)) != 0:
                raise MetricsError(self._last_error())
            if not out.found:
                return None
            return TreeUsage(procs=out.procs, cpu_seconds=out.cpu_ns / 1e9, rss_bytes=out.rss_bytes)

    def _last_error(self) -> str:
        n = self._lib.hm_last_error(self._handle, self._err, _ERROR_BUF)
        if n < 0:
            return "unknown metrics handle"
        return self._err.value.decode("utf-8", "replace") or "native snapshot failed"

    def close(self) -> None:
        with self._lock:
            if self._handle > 0 and os.getpid() == self._pid:
                self._lib.hm_close(self._handle)
            self._handle = 0


def open_metrics(backend: str = "auto", library_path: str = "",
                 logger: logging.Logger | None = None,
                 cgroup_root: str = DEFAULT_CGROUP_ROOT) -> MetricsSource:
    """A metrics source for `metrics.backend` ("auto", "native" or "psutil").

    "auto" tries the native library and falls back to psutil, logging one line with the reason
    (also kept in `.fallback_reason`). "native" raises MetricsUnavailable instead of falling back.
    """
    # psutil is imported only where it is the backend: ~1 MiB of the daemon's idle RSS otherwise.
    if backend == "psutil":
        from hivemind.metrics.psutil_backend import PsutilSource

        return PsutilSource(cgroup_root=cgroup_root)
    if backend not in ("auto", "native"):
        raise ValueError(f"unknown metrics backend {backend!r}; choose auto, native or psutil")
    try:
        return NativeSource(load_library(library_path), cgroup_root=cgroup_root)
    except MetricsUnavailable as exc:
        if backend == "native":
            raise
        reason = str(exc)
    (logger or logging.getLogger(__name__)).warning(
        "native metrics library unavailable, using psutil: %s", reason)
    from hivemind.metrics.psutil_backend import PsutilSource

    return PsutilSource(fallback_reason=reason, cgroup_root=cgroup_root)
