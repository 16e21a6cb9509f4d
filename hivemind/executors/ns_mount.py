"""Mounts in another process's mount namespace through one long-lived helper per namespace
(native/ns-mount, `hm-ns-mount`), started there once with nsenter.

Rootless Podman's pause process holds a mount namespace copied from the host's. Where the
host's mounts are shared (systemd makes / shared) a task's quota mount propagates into it by
itself; where they are private it has to be mounted there as well. Doing that with
`nsenter … mount` and `nsenter … umount` costs four processes per task (~9 ms of CPU each task
on our 2-core machine, 3 % of a busy batch); the helper does each in one line on a pipe.

A worker process cannot enter another mount namespace itself (setns(CLONE_NEWNS) refuses a
multithreaded process), hence a process that was started inside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import subprocess
import threading
from pathlib import Path

from hivemind.native_binary import native_binary

NS_MOUNT = "hm-ns-mount"
REPLY_TIMEOUT_S = 10.0


class NsMountError(OSError):
    """The helper refused or failed a request, or could not be started; the caller falls back."""


def ns_mount_binary() -> Path | None:
    """The compiled helper; None where it wasn't built (nsenter does it then)."""
    return native_binary(NS_MOUNT)


def namespace_of(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


class _Helper:
    def __init__(self, binary: Path, pid: int, under: Path) -> None:
        self.namespace = namespace_of(pid)
        self.under = under
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            ["nsenter", f"--target={pid}", "--mount", "--", str(binary), "--under", str(under)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        try:
            self.request("ping")
            # nsenter has exec'd the helper by now: it must sit in the namespace it was sent to.
            if namespace_of(self.proc.pid) != self.namespace:
                raise NsMountError(f"{NS_MOUNT} did not enter the mount namespace of process {pid}")
        except BaseException:
            self.close()
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    def request(self, *fields: str) -> None:
        if any("\t" in f or "\n" in f for f in fields):
            raise NsMountError(f"{NS_MOUNT}: a request field holds a tab or a newline")
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._lock:
            try:
                self.proc.stdin.write(("\t".join(fields) + "\n").encode())
                self.proc.stdin.flush()
                ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_TIMEOUT_S)
                reply = self.proc.stdout.readline().decode(errors="replace").strip() if ready else ""
            except (OSError, ValueError) as exc:
                raise NsMountError(f"{NS_MOUNT}: {exc}") from None
        if reply != "ok":
            if not reply:
                self.close()       # gone or stuck: the next request starts a fresh one
            raise NsMountError(f"{NS_MOUNT} {fields[0]}: {reply or 'no answer'}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()     # EOF: it exits
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class NamespaceMounts:
    """Thread-safe. One helper per (namespace, tasks root), started on first use and restarted
    when it died or its namespace's process was replaced (a restarted Podman service)."""

    def __init__(self, logger: logging.Logger, binary: Path | None = None, *,
                 use_helper: bool = True) -> None:
        self._log = logger
        self._binary = (binary or ns_mount_binary()) if use_helper else None
        self._lock = threading.Lock()
        self._helpers: dict[tuple[str, Path], _Helper] = {}

    @property
    def available(self) -> bool:
        return self._binary is not None

    def _helper(self, pid: int, under: Path) -> _Helper:
        if self._binary is None:
            raise NsMountError(f"{NS_MOUNT} is not built (native/Makefile)")
        key = (namespace_of(pid), under)
        with self._lock:
            helper = self._helpers.get(key)
            if helper is not None and helper.alive():
                return helper
            if helper is not None:
                helper.close()
            helper = self._helpers[key] = _Helper(self._binary, pid, under)
            self._log.debug("mount helper %d in the mount namespace of process %d (%s)",
                            helper.proc.pid, pid, key[0])
            return helper

    def mount(self, pid: int, device: str, target: Path) -> None:
        """Mount `device` (a loop device holding ext4) on `target` in `pid`'s namespace."""
        self._helper(pid, target.parent.parent).request("mount", device, str(target))

    def umount(self, pid: int, target: Path) -> None:
        """Detach `target` in `pid`'s namespace (lazily)."""
        self._helper(pid, target.parent.parent).request("umount", str(target))

    def close(self) -> None:
        with self._lock:
            helpers, self._helpers = list(self._helpers.values()), {}
        for helper in helpers:
            helper.close()
