"""A cache of task venvs, keyed by requirements.txt content and the interpreter.

Layout under the cache root:
    <key>/                 a finished venv; it exists only once complete (renamed into place)
    .build-<key>-XXXX/     a build in progress: venv/, home/, requirements.txt
    .locks/<key>.lock      flock(2) held by the one process building <key>

A build runs under an exclusive flock, into a temp dir, then is renamed into place: a crashed
build leaves no half venv (the next builder removes its temp dir) and no held lock (the kernel
drops a flock with its holder). When the worker is root, the build runs as the build user,
never as root; the finished venv is then chowned to root and made read-only for others, so one
task can't poison a venv another task uses.

requirements.txt is validated first (requirements.py: specifiers only), then installed in two
steps (wheel_fetch.py): `pip download --only-binary=:all:` with network, which runs nothing from
the archive or any sdist, and an offline `pip install --no-index` from those wheels in an empty
network namespace.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from hivemind.config import RequirementsConfig
from hivemind.errors import HivemindError
from hivemind.executors.base import OutputLine, OutputSink, PrepareCancelled
from hivemind.executors.fetch_proxy import FetchProxy, netns_available, sandboxed_fetch_argv
from hivemind.executors.proc import (
    LineSplitter,
    TaskUser,
    chown_tree,
    emit,
    kill_by_cwd,
    signal_group,
    strip_group_other_write,
)
from hivemind.executors.requirements import parse_requirements
from hivemind.executors.wheel_fetch import download_argv, fetch_env, install_argv

_POLL_S = 0.05


class PrepareFailed(HivemindError):
    """Installing a task's requirements failed (pip error or prepare timeout); not retryable as is."""


class VenvCache:
    """Builds and finds venvs. Thread-safe and safe across processes (flock per key)."""

    def __init__(self, root: Path, python: str, logger: logging.Logger, *,
                 build_user: TaskUser | None = None,
                 requirements: RequirementsConfig | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.python = python
        self._log = logger
        self._build_user = build_user
        self._req_cfg = requirements or RequirementsConfig()
        self._clock = clock
        self._wall = wall_clock
        self._interp_id: str | None = None
        self._id_lock = threading.Lock()
        self.builds = 0                # venvs this object built; the tests count pip runs with it

    # -- keys --------------------------------------------------------------------------------

    def interpreter_id(self) -> str:
        """Real path and full version of the interpreter: a venv is only valid for that pair."""
        with self._id_lock:
            if self._interp_id is None:
                real = os.path.realpath(self.python)
                out = subprocess.run([real, "-c", "import sys; print(sys.version)"],
                                     capture_output=True, text=True, timeout=30,
                                     stdin=subprocess.DEVNULL, env=_base_env(None), check=True)
                self._interp_id = f"{real}\n{out.stdout.strip()}"
            return self._interp_id

    def key(self, requirements: bytes | None) -> str:
        h = hashlib.sha256(self.interpreter_id().encode())
        h.update(b"\0")
        h.update(requirements or b"")
        return h.hexdigest()[:32]

    def lookup(self, requirements: Path | None) -> Path | None:
        """The finished venv for these requirements, or None. Never builds."""
        path = self.root / self.key(_read(requirements))
        return path if (path / "bin" / "python").exists() else None

    # -- building ----------------------------------------------------------------------------

    def ensure(self, requirements: Path | None, sink: OutputSink, cancel: threading.Event,
               timeout_s: float) -> Path:
        """The venv for these requirements, building it (with pip, network allowed) if needed.

        Raises PrepareCancelled when `cancel` is set, PrepareFailed on a pip error or when
        `timeout_s` passes (waiting for another builder counts); in both cases nothing of the
        build is left running or on disk.
        """
        content = _read(requirements)
        if content:
            parse_requirements(content)   # refuse before anything runs, even on a cache hit
        key = self.key(content)
        final = self.root / key
        if (final / "bin" / "python").exists():
            return final
        deadline = self._clock() + timeout_s
        self._make_dirs()
        fd = os.open(self.root / ".locks" / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._lock(fd, key, sink, cancel, deadline)
            if (final / "bin" / "python").exists():   # built by whoever held the lock
                return final
            self._remove_stale_builds(key)
            self._build(key, content, final, sink, cancel, deadline)
            return final
        finally:
            os.close(fd)  # releases the flock

    def _make_dirs(self) -> None:
        # The task user must traverse the cache to run a venv's python, never write to it.
        self.root.mkdir(parents=True, exist_ok=True, mode=0o755)
        (self.root / ".locks").mkdir(exist_ok=True, mode=0o700)

    def _lock(self, fd: int, key: str, sink: OutputSink, cancel: threading.Event,
              deadline: float) -> None:
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if not told:
                self._say(sink, f"waiting for another build of venv {key[:12]}")
                told = True
            if cancel.wait(_POLL_S):
                raise PrepareCancelled()
            if self._clock() > deadline:
                raise PrepareFailed("prepare timed out waiting for another build of the same requirements")

    def _remove_stale_builds(self, key: str) -> None:
        for stale in self.root.glob(f".build-{key}-*"):
            # We hold the lock, so its builder is dead; its pip may still run (own session).
            killed = kill_by_cwd(stale)
            if killed:
                self._log.warning("killed %d process(es) left by a crashed venv build", len(killed))
            shutil.rmtree(stale, ignore_errors=True)

    def _build(self, key: str, content: bytes | None, final: Path, sink: OutputSink,
               cancel: threading.Event, deadline: float) -> None:
        build = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=self.root))
        try:
            venv, home, wheels = build / "venv", build / "home", build / "wheels"
            home.mkdir()
            wheels.mkdir()
            req = build / "requirements.txt"
            if content:
                # pip reads what the worker wrote from the validated lines, not the task's file.
                req.write_text(parse_requirements(content).normalized())
            if self._build_user is not None:
                chown_tree(build, self._build_user.uid, self._build_user.gid)
            self._say(sink, f"creating venv {key[:12]} ({self.python})")
            cmd = [self.python, "-m", "venv"] + ([] if content else ["--without-pip"]) + [str(venv)]
            self._run(cmd, build, home, sink, cancel, deadline, "creating the venv", isolate=True)
            if content:
                pip = [str(venv / "bin" / "python"), "-m", "pip"]
                self._say(sink, "fetching wheels for requirements.txt (no sdists: nothing is built)")
                fetch_wheels(download_argv(pip, req, wheels, self._req_cfg), pip[0],
                             cfg=self._req_cfg, cwd=build, env=fetch_env(self._req_cfg, home),
                             user=self._build_user, sink=sink, cancel=cancel, deadline=deadline,
                             clock=self._clock, wall=self._wall, log=self._log)
                self._say(sink, "installing the wheels offline")
                self._run(install_argv(pip, req, str(wheels)), build, home, sink, cancel,
                          deadline, "pip install", isolate=True)
            _relocate(venv, final)
            if self._build_user is not None:
                chown_tree(venv, 0, 0)
                strip_group_other_write(venv)
            os.rename(venv, final)
            self.builds += 1
            self._say(sink, f"venv {key[:12]} ready")
        finally:
            shutil.rmtree(build, ignore_errors=True)

    def _run(self, argv: list[str], cwd: Path, home: Path, sink: OutputSink,
             cancel: threading.Event, deadline: float, what: str, *, isolate: bool = False,
             env: dict[str, str] | None = None) -> None:
        """One build step as the build user. `isolate`: in an empty network namespace (nothing
        it runs can reach any address)."""
        run_step(argv, cwd=cwd, env=env or _base_env(home), user=self._build_user,
                 isolate=isolate, sink=sink, cancel=cancel, deadline=deadline, what=what,
                 clock=self._clock, wall=self._wall, log=self._log)

    def _say(self, sink: OutputSink, text: str) -> None:
        with contextlib.suppress(Exception):
            sink(OutputLine(ts=self._wall(), stream="prepare", text=f"[hivemind] {text}"))


def fetch_wheels(pip_argv: list[str], python: str, *, cfg: RequirementsConfig, cwd: Path,
                 env: dict[str, str], user: TaskUser | None, sink: OutputSink,
                 cancel: threading.Event, deadline: float, clock: Callable[[], float],
                 wall: Callable[[], float], log: logging.Logger) -> None:
    """The fetch step: `pip_argv` (pip download) in an empty network namespace whose only way
    out is the worker's filtering proxy (fetch_proxy.py), as `user`."""
    sock_dir = Path(tempfile.mkdtemp(prefix="hm-fetch-"))
    in_netns = netns_available()
    proxy = FetchProxy.for_config(sock_dir / "s" if in_netns else None, cfg.index_url,
                                  cfg.proxy, log)
    try:
        drop: list[str] = []
        step_user = None
        if user is not None:
            os.chown(sock_dir, user.uid, user.gid)
            proxy.chown(user.uid, user.gid)
            if os.geteuid() == 0:
                drop = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
                        "--clear-groups", "--no-new-privs", "--bounding-set=-all", "--"]
        if in_netns:
            argv = sandboxed_fetch_argv(python, proxy.path or sock_dir / "s", pip_argv, drop)
        else:
            emit(sink, "prepare", ["[hivemind] no network namespace for the fetch step here: "
                                   "pip reaches the network only through the worker's filtering proxy"],
                 wall, log)
            argv = [a.replace("{proxy}", proxy.url) for a in pip_argv]
            step_user = user if os.geteuid() == 0 else None
        try:
            run_step(argv, cwd=cwd, env=env, user=step_user, isolate=False, sink=sink,
                     cancel=cancel, deadline=deadline, what="pip download", clock=clock,
                     wall=wall, log=log)
        except PrepareFailed as exc:
            if proxy.refused:
                raise PrepareFailed(f"{exc}; the fetch step may reach only the package index, "
                                    f"refused: {'; '.join(proxy.refused[:5])}") from None
            raise
    finally:
        proxy.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def run_step(argv: list[str], *, cwd: Path, env: dict[str, str], user: TaskUser | None,
             isolate: bool, sink: OutputSink, cancel: threading.Event, deadline: float,
             what: str, clock: Callable[[], float], wall: Callable[[], float],
             log: logging.Logger) -> None:
    """Run one build step in its own process group; its output goes to the sink line by line.
    Raises PrepareCancelled / PrepareFailed; the whole group is killed whatever happened."""
    if isolate:
        argv = isolated_argv(argv, user)
        user = None     # setpriv inside the namespace drops to the user
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        user=user.uid if user else None, group=user.gid if user else None,
        extra_groups=[] if user else None)
    reader = threading.Thread(target=_pump, args=(proc, sink, wall, log), daemon=True,
                              name="prepare-output")
    reader.start()
    try:
        while proc.poll() is None:
            if cancel.wait(_POLL_S):
                raise PrepareCancelled()
            if clock() > deadline:
                raise PrepareFailed(f"prepare timed out during {what}")
    finally:
        # Kill the whole group whatever happened: pip's children are in it.
        signal_group(proc.pid, 9)
        proc.wait()
        reader.join(5)
        if proc.stdout is not None:
            proc.stdout.close()
    if proc.returncode != 0:
        raise PrepareFailed(f"{what} failed with exit code {proc.returncode}; see the prepare output")


def _pump(proc: subprocess.Popen[bytes], sink: OutputSink, wall: Callable[[], float],
          log: logging.Logger) -> None:
    assert proc.stdout is not None
    split = LineSplitter()
    fd = proc.stdout.fileno()
    while chunk := os.read(fd, 65536):
        emit(sink, "prepare", split.feed(chunk), wall, log)
    emit(sink, "prepare", split.flush(), wall, log)


def isolated_argv(argv: list[str], user: TaskUser | None) -> list[str]:
    """`argv` in an empty network namespace: as root with setpriv dropping to `user`; as
    another user inside a user namespace of its own where the host allows one."""
    if os.geteuid() == 0:
        drop = [] if user is None else [
            "setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups",
            "--no-new-privs", "--bounding-set=-all", "--"]
        return ["unshare", "--net", "--", *drop, *argv]
    if user_netns_works():
        return ["unshare", "--user", "--net", "--", *argv]
    # No user namespaces (the shipped unit's RestrictNamespaces=, a non-root worker): what runs
    # here is venv creation and pip's offline, wheel-only install (--no-index), neither of which
    # executes archive code, so the empty namespace was defence in depth; run without it.
    return list(argv)


@functools.cache
def user_netns_works() -> bool:
    """Whether this process may create a user + network namespace (checked once)."""
    try:
        return subprocess.run(["unshare", "--user", "--net", "--", "true"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _read(requirements: Path | None) -> bytes | None:
    if requirements is None or not requirements.is_file():
        return None
    data = requirements.read_bytes()
    return data if data.strip() else None


def _base_env(home: Path | None) -> dict[str, str]:
    """A build step sees none of the worker's environment (no secrets, no NOTIFY_SOCKET)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
           "PIP_CONFIG_FILE": os.devnull}
    if home is not None:
        env["HOME"] = str(home)
    return env


def _relocate(venv: Path, final: Path) -> None:
    """Rewrite the build path to the final path in bin/ (script shebangs, activate scripts).

    The interpreter itself finds its venv through pyvenv.cfg next to bin/, so it moves freely.
    """
    old, new = str(venv).encode(), str(final).encode()
    for entry in (venv / "bin").iterdir():
        if entry.is_symlink() or not entry.is_file():
            continue
        data = entry.read_bytes()
        if old in data:
            mode = entry.stat().st_mode
            entry.write_bytes(data.replace(old, new))
            os.chmod(entry, mode)
