"""Find the Podman API service for the configured mode, or start one and own it.

- podman.socket set: use it as is; never start anything.
- rootful: /run/podman/podman.sock; started as `podman system service --time=0` when absent
  (the default 5 s idle timeout would pull the socket away between tasks).
- rootless, worker not root: the worker's own user, $XDG_RUNTIME_DIR/podman/podman.sock.
- rootless, worker is root: the service runs as podman.rootless_user with that user's
  XDG_RUNTIME_DIR (/run/user/UID, created if missing), so tasks never get root's storage.
A service this module started is stopped by `close()`; one it found is left alone.

Ownership survives a crash: the PID and start time of a service this module started are recorded
in the state directory (`podman-service.json`) as soon as it answers, and removed once it is
stopped. A restarted worker that finds the record and the same process (PID *and* start time, so
a reused PID is never touched) adopts it when it still answers on the socket, and stops it when
it doesn't; either way, it is the worker's to stop again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from hivemind.config import PodmanConfig
from hivemind.errors import ExecutorUnavailable
from hivemind.executors.proc import process_start_time, same_process

ROOTFUL_SOCKET = "/run/podman/podman.sock"
# How long a service that answered is taken to still answer without asking again: every API call
# goes through ensure(), and a ping per call costs a round trip and, on a loaded machine, risks a
# restart that breaks every call in flight.
TRUST_S = 5.0


@dataclass(frozen=True)
class ServiceUser:
    name: str
    uid: int
    gid: int
    home: str
    runtime_dir: str


def ping(socket_path: str, timeout: float = 2.0) -> bool:
    """True when a Podman service answers /_ping on this unix socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(socket_path)
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
            reply = s.recv(64)
    except OSError:
        return False
    return reply.startswith(b"HTTP/1.") and b" 200 " in reply[:16]


def _socket_path(uri: str) -> str:
    for prefix in ("unix://", "http+unix://"):
        if uri.startswith(prefix):
            return uri[len(prefix):]
    raise ExecutorUnavailable(f"podman.socket {uri!r}: only unix:// sockets are supported")


class PodmanService:
    def __init__(self, cfg: PodmanConfig, logger: logging.Logger, *,
                 podman_bin: str = "podman", start_timeout_s: float = 15.0,
                 euid: Callable[[], int] = os.geteuid,
                 rootful_socket: str = ROOTFUL_SOCKET, state_dir: Path | None = None,
                 stop_timeout_s: float = 10.0) -> None:
        self._cfg = cfg
        self._log = logger
        self._bin = podman_bin
        self._start_timeout = start_timeout_s
        self._euid = euid
        self._rootful_socket = rootful_socket
        self._proc: subprocess.Popen[bytes] | None = None
        self._err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the service
        self._uri: str | None = None
        self._record = state_dir / "podman-service.json" if state_dir is not None else None
        self._adopted: tuple[int, float] | None = None   # (pid, start time) of an adopted service
        self._own_path: str | None = None   # the socket of the service this object started/adopted
        self._stop_timeout = stop_timeout_s
        # One caller at a time decides whether to start a service: slots call ensure() at once,
        # and two that both found it silent would each start one, orphaning the first.
        self._ensure_lock = threading.RLock()   # close() runs inside, from _start()
        self._trusted_until = 0.0

    @property
    def rootless(self) -> bool:
        return self._cfg.mode == "rootless"

    def service_user(self) -> ServiceUser | None:
        """Whose rootless Podman runs tasks; None when rootful."""
        if not self.rootless:
            return None
        if self._euid() == 0:
            try:
                pw = pwd.getpwnam(self._cfg.rootless_user)
            except KeyError:
                raise ExecutorUnavailable(
                    f"podman.rootless_user {self._cfg.rootless_user!r} does not exist; "
                    "run scripts/setup-podman or set podman.mode: rootful") from None
            return ServiceUser(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir,
                               f"/run/user/{pw.pw_uid}")
        pw = pwd.getpwuid(self._euid())
        runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{pw.pw_uid}"
        return ServiceUser(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, runtime)

    def socket_path(self) -> str:
        """The socket this object talks to: the configured one, the one of the service it
        started, or the standard one (a service someone else runs there is used as it is)."""
        if self._cfg.socket:
            return _socket_path(self._cfg.socket)
        if self._own_path is not None:
            return self._own_path
        return self._standard_path()

    def _standard_path(self) -> str:
        user = self.service_user()
        return self._rootful_socket if user is None else f"{user.runtime_dir}/podman/podman.sock"

    def _private_path(self) -> str:
        """Where a service this worker starts listens: a socket of its own (one per state dir),
        so stopping or restarting it never pulls a service from under another worker, or from a
        person using the standard socket."""
        standard = self._standard_path()
        if self._record is None:
            return standard
        tag = hashlib.sha256(str(self._record.parent.resolve()).encode()).hexdigest()[:12]
        return str(Path(standard).parent / f"hivemind-{tag}.sock")

    def _own_alive(self, path: str) -> bool:
        """Our service still runs and answers, given time: a slow ping on a loaded machine is no
        reason to restart it (a restart breaks every call in flight)."""
        return self._proc is not None and self._proc.poll() is None and ping(path, timeout=5.0)

    @property
    def owned(self) -> bool:
        return self._proc is not None or self._adopted is not None

    def _recorded(self) -> tuple[int, float, str] | None:
        if self._record is None:
            return None
        try:
            d = json.loads(self._record.read_text())
            return int(d["pid"]), float(d["start_time"]), str(d["socket"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_record(self, pid: int, path: str) -> None:
        if self._record is None:
            return
        start = process_start_time(pid)
        if start is None:
            return
        tmp = self._record.with_name(self._record.name + ".tmp")
        self._record.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"pid": pid, "start_time": start, "socket": path}))
        os.replace(tmp, self._record)

    def _forget_record(self) -> None:
        if self._record is not None:
            self._record.unlink(missing_ok=True)

    def _take_over(self, path: str) -> bool:
        """A service an earlier worker (this state dir) started: adopt it when it still serves
        `path` (True), else stop it. Only the recorded PID with the recorded start time counts."""
        rec = self._recorded()
        if rec is None:
            return False
        pid, start, sock = rec
        if not same_process(pid, start):
            self._forget_record()
            return False
        if sock == path and ping(path, timeout=1.0):
            self._adopted = (pid, start)
            self._log.info("adopted the podman service (pid %d) an earlier worker started", pid,
                           extra={"socket": path})
            return True
        self._log.warning("stopping the podman service (pid %d) an earlier worker left behind", pid)
        self._stop_pid(pid, start)
        self._forget_record()
        return False

    def _stop_pid(self, pid: int, start: float) -> None:
        import psutil

        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            if abs(p.create_time() - start) >= 0.1:
                return
            p.terminate()
            try:
                p.wait(self._stop_timeout)
            except psutil.TimeoutExpired:
                _kill_group(pid)
                p.wait(5)

    def ensure(self) -> str:
        """The service URI, starting the service if needed. Raises ExecutorUnavailable."""
        with self._ensure_lock:
            uri = self._ensure()
            self._trusted_until = time.monotonic() + TRUST_S
            return uri

    def _ensure(self) -> str:
        path = self.socket_path()
        if self._uri is not None:
            own_running = self._proc is not None and self._proc.poll() is None
            if (own_running or self._proc is None) and time.monotonic() < self._trusted_until:
                return self._uri
            if ping(path) or self._own_alive(path):
                return self._uri
            state = ("exited" if self._proc is not None and self._proc.poll() is not None
                     else "stopped answering")
            self._log.warning("the podman service %s; finding or starting another", state,
                              extra={"socket": path})
        private = self._private_path()
        if not self._cfg.socket and self._adopted is None and self._proc is None \
                and self._take_over(private):
            self._own_path = private
            self._uri = f"unix://{private}"
            return self._uri
        if self._cfg.socket:
            if ping(path):
                self._uri = f"unix://{path}"
                return self._uri
            raise ExecutorUnavailable(f"no Podman service answers on {self._cfg.socket}")
        standard = self._standard_path()
        if self._proc is None and self._adopted is None and ping(standard):
            self._uri = f"unix://{standard}"
            return self._uri
        path = private
        if shutil.which(self._bin) is None:
            raise ExecutorUnavailable(f"{self._bin} is not installed (apt install podman)")
        if not self.rootless and self._euid() != 0:
            raise ExecutorUnavailable("podman.mode rootful needs the worker to run as root")
        self._start(path)
        self._own_path = path
        self._uri = f"unix://{path}"
        return self._uri

    def _start(self, path: str) -> None:
        self.close()
        user = self.service_user()
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        for key in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF"):
            if key in os.environ and user is None:
                env[key] = os.environ[key]
        kwargs: dict[str, object] = {}
        if user is not None:
            env.update(HOME=user.home, USER=user.name, LOGNAME=user.name,
                       XDG_RUNTIME_DIR=user.runtime_dir)
            # A lingering user manager (scripts/setup-podman on systemd + cgroup v2) gives Podman
            # the systemd cgroup manager and a delegated cgroup: rootless limits then hold.
            if os.path.exists(f"{user.runtime_dir}/bus"):
                env["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={user.runtime_dir}/bus"
            if self._euid() == 0:
                self._make_runtime_dir(user)
                kwargs = {"user": user.uid, "group": user.gid, "extra_groups": [],
                          "cwd": user.home if os.path.isdir(user.home) else "/"}
        if user is None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        argv = [self._bin, "system", "service", "--time=0", f"unix://{path}"]
        self._log.info("starting podman service", extra={"socket": path})
        # A file, not a pipe: a long-lived service would block once a pipe nobody reads fills.
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=self._err,
                                start_new_session=True, **kwargs)  # type: ignore[call-overload]
        self._proc = proc
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if ping(path, timeout=0.5):
                self._write_record(proc.pid, path)
                return
            if proc.poll() is not None:
                self._err.seek(0)
                err = self._err.read().decode(errors="replace")
                self._proc = None
                raise ExecutorUnavailable(
                    f"podman system service exited with {proc.returncode}: {err.strip()[-400:]}")
            time.sleep(0.05)
        self.close()
        raise ExecutorUnavailable(f"podman system service did not answer on {path} "
                                  f"within {self._start_timeout:.0f}s")

    @staticmethod
    def _make_runtime_dir(user: ServiceUser) -> None:
        # What logind would do for a login session; a system service user has none.
        rd = Path(user.runtime_dir)
        for d in (rd, rd / "podman"):
            if not d.exists():
                d.mkdir(mode=0o700, parents=True)
                os.chown(d, user.uid, user.gid)

    def close(self) -> None:
        """Stop the service if this object started it (or adopted it from an earlier worker)."""
        with self._ensure_lock:
            self._close()

    def _close(self) -> None:
        proc, self._proc = self._proc, None
        adopted, self._adopted = self._adopted, None
        if proc is not None or adopted is not None:
            self._own_path = None
        if adopted is not None:
            self._stop_pid(*adopted)
            self._forget_record()
            self._uri = None
        if proc is None:
            return
        self._trusted_until = 0.0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self._stop_timeout)
            except subprocess.TimeoutExpired:
                # The whole group, before the leader is reaped (its pid, the group's id, can't be
                # reused until then): rootless Podman re-execs itself into the user namespace,
                # and a killed parent would leave that child serving with nobody to stop it.
                _kill_group(proc.pid)
                proc.wait()
        self._forget_record()
        self._err.close()
        self._uri = None


def _kill_group(pid: int) -> None:
    """SIGKILL the process group a service leads (it was started in a session of its own)."""
    with contextlib.suppress(OSError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
            return
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
