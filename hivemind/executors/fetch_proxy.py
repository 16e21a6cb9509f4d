"""The only way out of the wheel fetch step: a filtering HTTP proxy on a unix socket.

    pip download (empty network namespace) --proxy http://127.0.0.1:P
        -> fetch_relay.py (same namespace: 127.0.0.1:P -> unix socket)
        -> FetchProxy (the worker, host network): allowed? connect : 403

pip runs with no network of its own, so whatever an index page or a wheel's metadata names (a
dependency `x @ http://127.0.0.1:8080/...`, a link to a LAN address) can only be reached through
here, and here a destination is allowed only when it is
- exactly a host:port the operator configured (the index, the upstream proxy), or
- a name or address on port 80/443 whose every address is global (never loopback, private,
  link-local, CGNAT, multicast or reserved); the connection goes to the address that was checked,
  so a second DNS answer can't turn it into a local one.
With an upstream proxy configured, allowed requests go to it unchanged (the operator's proxy
decides the rest); IP literals and names that resolve locally are still refused here.

One request per connection for plain HTTP (`Connection: close` is forced), so a kept-alive
connection can't carry a second request to another host past the check.

Where the worker can't create the namespace (not root and no user namespaces, e.g. under the
hardened unit's RestrictNamespaces=), pip runs on the host network with `--proxy` pointing at
this proxy on 127.0.0.1 (a random port and a random credential, so no other local process can
use it). pip sends every request through its proxy, so what index pages and metadata name is
still checked here; only pip itself, which runs nothing from the archive, has the host network.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import ipaddress
import logging
import os
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024
_PUBLIC_PORTS = (80, 443)

Resolver = Callable[[str, int], list[str]]


def _resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(i[4][0]) for i in infos}, key=lambda a: ":" in a)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    address: str = ""                  # where to connect (already checked)
    why: str = ""


def host_port(url: str) -> tuple[str, int] | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.hostname.lower(), parts.port or (443 if parts.scheme == "https" else 80)


class Policy:
    """Which destinations the fetch step may reach."""

    def __init__(self, configured: list[tuple[str, int]], resolver: Resolver = _resolve) -> None:
        self._configured = set(configured)
        self._resolve = resolver

    def check(self, host: str, port: int) -> Decision:
        host = host.lower().strip("[]")
        if (host, port) in self._configured:
            try:
                return Decision(True, self._resolve(host, port)[0])
            except (OSError, IndexError):
                return Decision(False, why=f"{host} does not resolve")
        if port not in _PUBLIC_PORTS:
            return Decision(False, why=f"port {port} is not 80/443 and {host}:{port} is not configured")
        try:
            addrs = self._resolve(host, port)
        except OSError:
            return Decision(False, why=f"{host} does not resolve")
        bad = [a for a in addrs if not _is_global(a)]
        if not addrs or bad:
            return Decision(False, why=f"{host} resolves to a non-public address ({', '.join(bad)})")
        return Decision(True, addrs[0])


def _is_global(addr: str) -> bool:
    try:
        ip = ipaddress.ip_address(addr.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def relay_source() -> str:
    return (Path(__file__).with_name("fetch_relay.py")).read_text(encoding="utf-8")


_NETNS: dict[bool, bool] = {}


def netns_available() -> bool:
    """Whether this process can give the fetch step a network namespace of its own."""
    root = os.geteuid() == 0
    if root not in _NETNS:
        argv = (["unshare", "--net", "--", "true"] if root
                else ["unshare", "--user", "--map-root-user", "--net", "--", "true"])
        try:
            _NETNS[root] = subprocess.run(argv, capture_output=True, timeout=10,
                                          stdin=subprocess.DEVNULL).returncode == 0
        except (OSError, subprocess.SubprocessError):
            _NETNS[root] = False
    return _NETNS[root]


def sandboxed_fetch_argv(python: str, socket_path: Path, pip_argv: list[str],
                         drop: list[str]) -> list[str]:
    """`pip_argv` (with `{proxy}` where the proxy URL goes) in an empty network namespace whose
    loopback leads only to the worker's proxy at `socket_path`; `drop`: setpriv to the user."""
    if os.geteuid() == 0:
        ns = ["unshare", "--net", "--"]
    else:
        ns = ["unshare", "--user", "--map-root-user", "--net", "--"]
    ip = shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin") or "ip"
    return [*ns, "sh", "-c", '"$0" link set lo up && exec "$@"', ip, *drop,
            python, "-c", relay_source(), str(socket_path), *pip_argv]


class FetchProxy:
    """Listens on a unix socket until `close()`; one thread per connection."""

    @classmethod
    def for_config(cls, path: Path | None, index_url: str, proxy: str, logger: logging.Logger,
                   resolver: Resolver = _resolve) -> FetchProxy:
        configured = [hp for hp in (host_port(index_url), host_port(proxy)) if hp]
        return cls(path, Policy(configured, resolver), logger, upstream=host_port(proxy))

    def __init__(self, path: Path | None, policy: Policy, logger: logging.Logger,
                 upstream: tuple[str, int] | None = None) -> None:
        """On the unix socket `path`, or (None) on 127.0.0.1 with a credential (see `url`)."""
        self.path = path
        self._policy = policy
        self._log = logger
        self._upstream = upstream
        self.refused: list[str] = []       # "host:port: why", for the prepare output and tests
        self._secret = ""
        if path is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self._sock.bind(str(path))
            self.url = ""
        else:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._sock.bind(("127.0.0.1", 0))
            self._secret = secrets.token_hex(16)
            self.url = f"http://hm:{self._secret}@127.0.0.1:{self._sock.getsockname()[1]}"
        self._sock.listen(64)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fetch-proxy", daemon=True)
        self._thread.start()

    def chown(self, uid: int, gid: int) -> None:
        if self.path is not None:
            os.chown(self.path, uid, gid)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True,
                             name="fetch-proxy-conn").start()

    def _handle(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            client.settimeout(60)
            head = _read_head(client)
            if head is None:
                return
            line, _, rest = head.partition(b"\r\n")
            parts = line.decode("latin-1").split()
            if len(parts) != 3:
                return _refuse(client, 400, "bad request")
            method, target, version = parts
            if self._secret and not self._authorized(rest):
                return _refuse(client, 407, "proxy credential missing or wrong")
            if method == "CONNECT":
                host, _, port_s = target.rpartition(":")
                port = int(port_s) if port_s.isdigit() else 443
            else:
                hp = host_port(target)
                if hp is None:
                    return _refuse(client, 400, "absolute http:// URL expected")
                host, port = hp
            decision = self._policy.check(host, port)
            if not decision.allowed:
                self.refused.append(f"{host}:{port}: {decision.why}")
                self._log.info("fetch step: refused %s:%d (%s)", host, port, decision.why)
                return _refuse(client, 403, decision.why)
            if self._upstream is not None:
                upstream = socket.create_connection(self._upstream, timeout=30)
                upstream.sendall(_close_after_one(head) if method != "CONNECT" else head)
            else:
                upstream = socket.create_connection((decision.address, port), timeout=30)
                if method == "CONNECT":
                    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                else:
                    path = urlsplit(target)
                    origin = (path.path or "/") + (f"?{path.query}" if path.query else "")
                    first = f"{method} {origin} {version}".encode("latin-1")
                    upstream.sendall(_close_after_one(first + b"\r\n" + rest))
            _splice(client, upstream)
        except (OSError, ValueError) as exc:
            self._log.debug("fetch proxy connection ended: %s", exc)
        finally:
            client.close()
            if upstream is not None:
                upstream.close()


    def _authorized(self, headers: bytes) -> bool:
        want = base64.b64encode(f"hm:{self._secret}".encode())
        for line in headers.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"proxy-authorization":
                scheme, _, cred = value.strip().partition(b" ")
                return scheme.lower() == b"basic" and hmac.compare_digest(cred.strip(), want)
        return False


def _read_head(sock: socket.socket) -> bytes | None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        buf += chunk
        if len(buf) > MAX_HEAD:
            return None
    return buf


def _close_after_one(head: bytes) -> bytes:
    """Drop Connection/Proxy-Connection headers and ask for `Connection: close`."""
    top, sep, body = head.partition(b"\r\n\r\n")
    lines = [ln for ln in top.split(b"\r\n")
             if not ln.lower().startswith((b"connection:", b"proxy-connection:", b"keep-alive:"))]
    return b"\r\n".join([*lines, b"Connection: close"]) + sep + body


def _refuse(client: socket.socket, code: int, why: str) -> None:
    body = f"refused by the worker: {why}\n".encode()
    reason = {403: "Forbidden", 407: "Proxy Authentication Required"}.get(code, "Bad Request")
    with contextlib.suppress(OSError):
        client.sendall(f"HTTP/1.1 {code} {reason}\r\nContent-Length: {len(body)}\r\n"
                       "Connection: close\r\n\r\n".encode() + body)


def _splice(a: socket.socket, b: socket.socket) -> None:
    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=pump, args=(b, a), daemon=True, name="fetch-proxy-down")
    t.start()
    a.settimeout(None)
    b.settimeout(None)
    pump(a, b)
    t.join(300)
