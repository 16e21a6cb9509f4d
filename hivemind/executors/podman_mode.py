"""`executor.podman.mode: auto`: which Podman runs tasks, decided from what each one enforces.

Rootless Podman is preferred (the API service and its containers run as an unprivileged user),
but only where the kernel applies its memory, CPU and pids limits (cgroup v2 with delegation to
the service user). Otherwise, when the worker is root, rootful Podman runs tasks (with a user
namespace, so a task's uids never map to a host account): it enforces the limits on cgroup v1
too. The decision is pure (`choose_mode`) over probe results, so every host shape is a unit test.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hivemind.executors.base import ExecutorStatus
from hivemind.executors.kernel_limits import CGROUP_ROOT, is_unified


@dataclass(frozen=True)
class HostCgroups:
    """The facts the reason is written from."""

    version: int                       # 1 (v1 or hybrid) or 2
    delegated: tuple[str, ...] | None  # controllers delegated to the service user (v2), None: unknown


@dataclass(frozen=True)
class ModeChoice:
    mode: str                          # "rootless" | "rootful"
    reason: str
    enforced: bool                     # the chosen mode applies memory, CPU and pids limits


def enforces_all(status: ExecutorStatus | None) -> bool:
    enf = status.enforcement if status is not None and status.usable else None
    return bool(enf and enf.memory and enf.cpu and enf.pids)


def _rootless_gap(host: HostCgroups, rootless: ExecutorStatus) -> str:
    if not rootless.usable:
        return f"rootless Podman can't run tasks here ({rootless.reason})"
    missing = ", ".join(n for n, on in (("memory", rootless.enforcement and rootless.enforcement.memory),
                                         ("cpu", rootless.enforcement and rootless.enforcement.cpu),
                                         ("pids", rootless.enforcement and rootless.enforcement.pids))
                        if not on)
    if host.version == 1:
        why = "cgroup v1 gives unprivileged users no cgroups"
    elif host.delegated is not None:
        why = ("the service user's delegated controllers are "
               f"{' '.join(host.delegated) or 'none'}; it needs cpu, memory and pids")
    else:
        why = "the service user has no delegated cgroup (no user manager or Delegate=yes)"
    return f"rootless Podman applies no {missing} limit here ({why})"


def choose_mode(host: HostCgroups, rootless: ExecutorStatus, rootful: ExecutorStatus | None,
                worker_is_root: bool) -> ModeChoice:
    """The mode for `auto`. `rootful` is the rootful probe's result, None when not probed (the
    worker isn't root, or rootless already enforces everything)."""
    if enforces_all(rootless):
        return ModeChoice("rootless", f"rootless Podman enforces memory, CPU and pids limits here "
                                      f"(cgroup v{host.version} with delegation)", True)
    gap = _rootless_gap(host, rootless)
    if not worker_is_root:
        hint = ("; run the worker as root, or give the service user a delegated cgroup v2 "
                "(scripts/setup-podman)")
        return ModeChoice("rootless", f"{gap}; rootful Podman needs a root worker{hint}", False)
    if rootful is not None and enforces_all(rootful):
        return ModeChoice("rootful", f"{gap}; the worker is root, so rootful Podman (tasks in a user "
                                     "namespace) enforces them", True)
    if rootful is not None and rootful.usable:
        return ModeChoice("rootful", f"{gap}; rootful Podman does not enforce them either", False)
    if rootless.usable:
        why = rootful.reason if rootful is not None else "not probed"
        return ModeChoice("rootless", f"{gap}; rootful Podman is unusable ({why})", False)
    why = rootful.reason if rootful is not None else "not probed"
    return ModeChoice("rootful", f"{gap}; rootful Podman is unusable too ({why})", False)


def host_cgroups(service_uid: int | None, cgroup_root: str = CGROUP_ROOT) -> HostCgroups:
    """Read the cgroup layout, and on v2 what systemd delegated to the service user's manager."""
    if not is_unified(cgroup_root):
        return HostCgroups(1, None)
    if service_uid is None:
        return HostCgroups(2, None)
    path = (f"{cgroup_root}/user.slice/user-{service_uid}.slice/user@{service_uid}.service/"
            "cgroup.controllers")
    try:
        with open(path, encoding="ascii") as f:
            return HostCgroups(2, tuple(f.read().split()))
    except OSError:
        return HostCgroups(2, None)


def worker_is_root() -> bool:
    return os.geteuid() == 0
