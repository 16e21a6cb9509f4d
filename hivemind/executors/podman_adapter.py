"""A small typed wrapper over the Podman (libpod) API, the only module that reads its JSON.

Calls go over plain HTTP on the service's unix socket (podman_http.py): podman-py, with requests
and urllib3, cost the daemon ~10 MiB of resident memory and ~2 ms of CPU per call; the create
body is rendered by ContainerSpec.libpod_body(), which the tests check against podman-py's own
rendering. Everything returned is a plain typed value. Errors become `TaskNotFound` (no such container) or
`PodmanError` (anything else the service said), with podman's own message kept.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from hivemind.errors import HivemindError, TaskNotFound
from hivemind.executors.container_spec import ContainerSpec
from hivemind.executors.podman_http import HttpError, Response, UnixHttp


class PodmanError(HivemindError):
    """The Podman service refused or failed a call; retrying may help."""

    recoverable = True


@dataclass(frozen=True)
class ContainerState:
    id: str
    name: str
    status: str                        # created | running | exited | stopped | ...
    running: bool
    exit_code: int | None
    oom_killed: bool
    started_at: float | None           # epoch seconds
    finished_at: float | None
    labels: Mapping[str, str]
    memory_limit: int                  # what podman really applied (0: none)
    memswap_limit: int
    cpu_quota: int
    cpu_period: int
    pids_limit: int
    network_mode: str
    read_only: bool
    error: str
    pid: int = 0                       # host PID of the container's init while it runs (0: none)


@dataclass(frozen=True)
class ContainerSummary:
    id: str
    name: str
    state: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class LogFrame:
    stream: str                        # "stdout" | "stderr"
    data: bytes


def _epoch(value: Any) -> float | None:
    """Podman's RFC 3339 timestamps (nanoseconds, zero value year 1) as epoch seconds."""
    if not isinstance(value, str) or not value or value.startswith("0001-"):
        return None
    text = value.replace("Z", "+00:00")
    # Python parses at most microseconds; trim the nanosecond digits.
    head, dot, rest = text.partition(".")
    if dot:
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits):]
        text = f"{head}.{digits[:6]}{zone}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


@contextlib.contextmanager
def _api_errors(what: str, ref: str) -> Iterator[None]:
    """The service's answers as this module's errors: 404 is TaskNotFound, the rest PodmanError
    with Podman's own message."""
    try:
        yield
    except HttpError as exc:
        if exc.status == 404:
            raise TaskNotFound(f"container {ref} not found") from None
        raise PodmanError(f"{what} {ref}: {exc.message}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise PodmanError(f"{what} {ref}: {type(exc).__name__}: {exc}") from None


class PodmanAdapter:
    def __init__(self, uri: str, timeout: float | None = None) -> None:
        self.uri = uri
        # No client timeout by default: wait and logs --follow legitimately block for hours.
        self._http = UnixHttp(uri.removeprefix("http+unix://").removeprefix("unix://"), timeout)

    def close(self) -> None:
        self._http.close()

    def version(self) -> str:
        info = self._call("version", "service", "GET", "/version").json() or {}
        return str(info.get("Version", "?"))

    def image_id(self, image: str) -> str | None:
        info = self.image_info(image)
        return info[0] if info is not None else None

    def image_info(self, image: str) -> tuple[str, str] | None:
        """(image ID, digest) of a local image; None when it is missing."""
        try:
            data = self._call("image", image, "GET", f"/images/{image}/json").json() or {}
        except TaskNotFound:
            return None
        return str(data.get("Id", "")), str(data.get("Digest") or "")

    def create(self, spec: ContainerSpec) -> str:
        """The new container's ID (one call: nothing is inspected after it)."""
        resp = self._call("create", spec.name, "POST", "/containers/create",
                          body=json.dumps(spec.libpod_body()).encode())
        return str(resp.json()["Id"])

    def _call(self, what: str, ref: str, method: str, path: str,
              params: Mapping[str, Any] | None = None, body: bytes | None = None) -> Response:
        with _api_errors(what, ref):
            return self._http.request(method, path, params, body)

    def start(self, ref: str) -> None:
        self._call("start", ref, "POST", f"/containers/{ref}/start")

    def wait(self, ref: str, interval: str = "10ms") -> int:
        """Blocks until the container is no longer running; its exit code."""
        resp = self._call("wait", ref, "POST", f"/containers/{ref}/wait",
                          {"condition": ["stopped", "exited"], "interval": interval})
        return int(resp.json())

    def stop(self, ref: str, timeout: float) -> None:
        try:
            self._call("stop", ref, "POST", f"/containers/{ref}/stop",
                       {"timeout": max(0, int(round(timeout)))})
        except PodmanError as exc:
            # 304 "not modified": it already stopped, which is what we asked for.
            if "304" not in str(exc):
                raise

    def kill(self, ref: str, signal: str = "SIGKILL") -> None:
        self._call("kill", ref, "POST", f"/containers/{ref}/kill", {"signal": signal})

    def remove(self, ref: str) -> None:
        """Force-remove with its anonymous volumes; a missing container is fine."""
        for attempt in range(20):
            try:
                with contextlib.suppress(TaskNotFound):
                    self._call("remove", ref, "DELETE", f"/containers/{ref}",
                               {"force": True, "v": True, "timeout": 0})
                return
            except PodmanError as exc:
                # With userns=auto, conmon's cleanup of a container that just exited may still
                # hold its shm mount: EBUSY for a moment, then the remove works.
                if "resource busy" not in str(exc) or attempt == 19:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def inspect(self, ref: str) -> ContainerState:
        data: dict[str, Any] = self._call("inspect", ref, "GET", f"/containers/{ref}/json").json()
        st = data.get("State") or {}
        hc = data.get("HostConfig") or {}
        cfg = data.get("Config") or {}
        exit_code = st.get("ExitCode")
        status = str(st.get("Status", ""))
        return ContainerState(
            id=str(data.get("Id", "")), name=str(data.get("Name", "")).lstrip("/"),
            status=status, running=bool(st.get("Running")),
            exit_code=int(exit_code) if exit_code is not None and status in ("exited", "stopped")
            else None,
            oom_killed=bool(st.get("OOMKilled")),
            started_at=_epoch(st.get("StartedAt")), finished_at=_epoch(st.get("FinishedAt")),
            labels=dict(cfg.get("Labels") or {}),
            memory_limit=int(hc.get("Memory") or 0), memswap_limit=int(hc.get("MemorySwap") or 0),
            cpu_quota=int(hc.get("CpuQuota") or 0), cpu_period=int(hc.get("CpuPeriod") or 0),
            pids_limit=int(hc.get("PidsLimit") or 0),
            network_mode=str(hc.get("NetworkMode", "")), read_only=bool(hc.get("ReadonlyRootfs")),
            error=str(st.get("Error") or ""),
            pid=int(st.get("Pid") or 0),
        )

    def list_labelled(self, labels: Mapping[str, str]) -> list[ContainerSummary]:
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        resp = self._call("list", "*", "GET", "/containers/json",
                          {"all": True, "filters": json.dumps(filters)})
        out = []
        for c in resp.json():
            names = c.get("Names") or [""]
            out.append(ContainerSummary(id=str(c.get("Id", "")), name=str(names[0]),
                                        state=str(c.get("State", "")),
                                        labels=dict(c.get("Labels") or {})))
        return out

    def logs(self, ref: str, *, follow: bool, since: float | None = None) -> Iterator[LogFrame]:
        """Log frames; with follow, the stream ends when the container stops."""
        params: dict[str, Any] = {"follow": follow, "stdout": True, "stderr": True}
        if since is not None:
            params["since"] = str(int(since))
        with _api_errors("logs", ref):
            resp, conn = self._http.stream("GET", f"/containers/{ref}/logs", params)
        return _closing_frames(conn, resp)

    def attach(self, ref: str, timeout: float = 10.0) -> Iterator[LogFrame]:
        """Attach to stdout/stderr of a created (not yet started) container; the frames end when
        it exits. Faster than logs --follow, whose end and lines arrive on a 250 ms poll.

        A raw socket because the reply is a hijacked (101 UPGRADED) connection, which
        podman-py's requests session cannot hand over.
        """
        path = self.uri.removeprefix("http+unix://").removeprefix("unix://")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall((f"POST /v4.0.0/libpod/containers/{ref}/attach?stream=true&stdout=true"
                          "&stderr=true&logs=false HTTP/1.1\r\nHost: d\r\n"
                          "Connection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 0\r\n\r\n"
                          ).encode())
            raw = sock.makefile("rb")
            head = b""
            while not head.endswith(b"\r\n\r\n") and len(head) < 65536:
                byte = raw.read(1)
                if not byte:
                    break
                head += byte
            status = head.split(b" ", 2)[1:2]
            if status not in ([b"101"], [b"200"]):
                body = raw.read(2048) if status else b""
                if status == [b"404"]:
                    raise TaskNotFound(f"container {ref} not found")
                raise PodmanError(f"attach {ref}: {head[:40]!r} {body[:300]!r}")
            sock.settimeout(None)   # output may pause for hours
        except OSError as exc:
            sock.close()
            raise PodmanError(f"attach {ref}: {exc}") from None
        except BaseException:
            sock.close()
            raise
        return _closing_frames(sock, raw)

    def stats(self, ref: str) -> dict[str, Any] | None:
        resp = self._call("stats", ref, "GET", "/containers/stats",
                          {"containers": [ref], "stream": False})
        data: dict[str, Any] = resp.json()
        stats = data.get("Stats") or []
        return dict(stats[0]) if stats else None


def _closing_frames(sock: socket.socket | http.client.HTTPConnection, raw: Any) -> Iterator[LogFrame]:
    try:
        yield from _frames(raw)
    finally:
        raw.close()
        sock.close()


def _frames(raw: Any) -> Iterator[LogFrame]:
    """Docker's multiplexed stream: 8-byte header (stream id, size) then the payload."""
    names = {1: "stdout", 2: "stderr"}
    while True:
        header = raw.read(8)
        if len(header) < 8:
            return
        kind, size = struct.unpack(">BxxxL", header)
        data = bytearray()    # += on bytes would copy the frame once per chunk
        while len(data) < size:
            chunk = raw.read(min(size - len(data), 1 << 20))
            if not chunk:
                return
            data += chunk
        yield LogFrame(names.get(kind, "stdout"), bytes(data))
