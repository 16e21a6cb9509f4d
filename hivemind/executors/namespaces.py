"""Namespaces of a venv task: its own PID and mount namespace, private /tmp, /var/tmp, /dev/shm.

    unshare --pid --fork --mount-proc [--net] -- sh -c SANDBOX_INIT hivemind-sandbox KEEP... --
        setpriv (task uid) ... prlimit ... sh -c WRAPPER hivemind-task ENTRY...

- PID namespace: the task's first process is PID 1 of a namespace of its own. When it exits the
  kernel kills every other process in the namespace, so nothing a task starts (setsid, double
  forks, a cleared environment) outlives it, and a task sees no process but its own (/proc is
  mounted for the namespace).
- Mount namespace (private propagation, unshare's default): fresh tmpfs over /tmp, /var/tmp and
  /dev/shm, so what a task leaves there vanishes with the namespace and no task sees another's.
  The paths the task needs (workspace, venv) may themselves lie under one of those dirs (tests
  keep state under /var/tmp): they are opened before the tmpfs goes on and bind-mounted back from
  the open descriptor, so the task sees exactly them and nothing else of the old dir.
- Everything else is read-only for the task: the root mount is remounted read-only in its
  namespace (the workspace, bind-mounted onto itself first, stays writable), so no world-writable
  directory anywhere on the host's root filesystem can carry a file past the task's end.
- The namespace starts as a copy of the host's mounts: other tasks' workspaces (their quota
  loop mounts) and Podman's container mounts are lazily unmounted in it, so a running task
  neither sees them nor keeps them busy for the host.
- The mounts are made as root inside the namespaces, before setpriv drops to the task's uid;
  nothing of the task runs before that.

Only root can create these namespaces here; `probe_namespaces` says what works, and the
executor reports what it could not apply.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hivemind.native_binary import native_binary

PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")   # noqa: S108 - the dirs made private
# Mounts a task has no business with, which its namespace would otherwise keep alive: Podman's
# container root filesystems and shm (the host could not remove those containers: EBUSY) and
# network namespaces. Lazily unmounted inside the task's namespace only.
FOREIGN_MOUNTS = ("*/containers/storage/*", "/var/lib/containers/*", "/run/containers/*",
                  "/run/netns/*", "/run/user/*")
_FIRST_FD = 4          # 0-2: exit file, stdout, stderr; 3 is the wrapper's exit-code fd


@dataclass(frozen=True)
class NamespaceSupport:
    pid_mount: bool                    # unshare --pid --fork --mount-proc and tmpfs mounts work
    net: bool                          # unshare --net works
    why_not: str = ""


def probe_namespaces(is_root: bool) -> NamespaceSupport:
    if not is_root:
        return NamespaceSupport(False, False, "the worker is not root: no PID/mount/network namespaces")
    if shutil.which("unshare") is None:
        return NamespaceSupport(False, False, "unshare not found (util-linux)")
    pid_mount = net = False
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        argv = [*unshare_argv(net=False), *sandbox_init_argv([], 1024 * 1024), "true"]
        pid_mount = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                   timeout=10, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
                                   ).returncode == 0
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        net = subprocess.run(["unshare", "--net", "--", "true"], stdin=subprocess.DEVNULL,
                             capture_output=True, timeout=10, env={}).returncode == 0
    why = "" if pid_mount else "unshare --pid --mount or tmpfs mounts failed on this host"
    return NamespaceSupport(pid_mount, net, why)


def unshare_argv(*, net: bool) -> list[str]:
    return ["unshare", "--pid", "--fork", "--mount-proc", *(["--net"] if net else []), "--"]


SANDBOX_INIT = "hm-sandbox-init"


def sandbox_init_binary() -> Path | None:
    """The compiled init (native/sandbox-init); None where it wasn't built (the shell init is
    used)."""
    return native_binary(SANDBOX_INIT)


def sandbox_init_argv(keep: list[str], tmpfs_bytes: int, writable: str | None = None,
                      hide_under: str | None = None, *, compiled: bool = True) -> list[str]:
    """What mounts the private dirs, restores `keep` paths, unmounts foreign mounts (and any
    under `hide_under` but `keep`), makes the root mount read-only except `writable` (one of
    `keep`), then execs the rest of argv: the compiled init where it was built (one process,
    ~1 ms), else the same steps in `sh -c` (~25 ms of mount, umount, awk and sort processes)."""
    binary = sandbox_init_binary() if compiled else None
    if binary is not None:
        return [str(binary), "--tmpfs-kib", str(max(1, tmpfs_bytes // 1024)),
                *(["--writable", writable] if writable is not None else []),
                *(["--hide-under", hide_under] if hide_under else []), *keep, "--"]
    return _shell_init_argv(keep, tmpfs_bytes, writable, hide_under)


def _shell_init_argv(keep: list[str], tmpfs_bytes: int, writable: str | None,
                     hide_under: str | None) -> list[str]:
    fds = [_FIRST_FD + i for i in range(len(keep))]
    lines = ["set -e"]
    if keep:
        lines.append("exec " + " ".join(f'{fd}<"${i + 1}"' for i, fd in enumerate(fds)))
    opts = f"nosuid,nodev,mode=1777,size={max(1, tmpfs_bytes // 1024)}k"
    lines += [f"[ ! -d {d} ] || mount -t tmpfs -o {opts} hivemind-private {d}" for d in PRIVATE_DIRS]
    for i, fd in enumerate(fds):
        # Hidden by a tmpfs: recreate the path inside it and bind the original back.
        lines.append(f'[ -d "${i + 1}" ] || {{ mkdir -p "${i + 1}"; '
                     f'mount --no-canonicalize --bind /proc/self/fd/{fd} "${i + 1}"; }}')
    patterns = "|".join([*FOREIGN_MOUNTS, *([f"{hide_under}/*"] if hide_under else [])])
    own = " ".join(f'"${i + 1}"' for i in range(len(keep))) or '""'
    lines.append("awk '{print $5}' /proc/self/mountinfo | sort -r | while read -r m; do "
                 'case "$m" in ' + patterns + ") "
                 'for k in ' + own + '; do [ "$m" = "$k" ] && continue 2; done; '
                 'umount -l "$m" 2>/dev/null || :;; esac; done')
    if writable is not None:
        i = keep.index(writable) + 1
        # Its own mount, so the read-only remount of / below leaves it writable.
        # cd again after: the cwd inherited from the worker is still on the old (now read-only) mount.
        lines += [f'mount --bind "${i}" "${i}"', "mount -o remount,bind,ro /", f'cd "${i}"']
    if keep:
        lines.append("exec " + " ".join(f"{fd}<&-" for fd in fds))
    lines += [f"shift {len(keep)}" if keep else ":", 'exec "$@"']
    return ["sh", "-c", "\n".join(lines), "hivemind-sandbox", *keep]
