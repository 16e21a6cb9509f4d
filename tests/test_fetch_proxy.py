"""The fetch step's filtering proxy: the policy as a unit, then a real pip-less client through a
real unix socket to real loopback listeners."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivemind.executors.fetch_proxy import FetchProxy, Policy

LOG = logging.getLogger("test.fetch_proxy")


def fake_dns(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    def resolve(host: str, port: int) -> list[str]:
        if host in table:
            return table[host]
        raise OSError("no such host")
    return resolve


DNS = fake_dns({"pypi.org": ["151.101.0.223"], "files.pythonhosted.org": ["151.101.1.63"],
                "evil.example": ["151.101.0.1", "127.0.0.1"], "lan.example": ["192.168.1.10"],
                "index.internal": ["10.1.2.3"], "127.0.0.1": ["127.0.0.1"],
                "10.0.0.5": ["10.0.0.5"], "::1": ["::1"], "169.254.169.254": ["169.254.169.254"],
                "100.64.0.1": ["100.64.0.1"], "::ffff:127.0.0.1": ["::ffff:127.0.0.1"]})


@pytest.mark.parametrize(("host", "port", "ok"), [
    ("pypi.org", 443, True), ("files.pythonhosted.org", 443, True),
    ("pypi.org", 8080, False),                    # public, but not a web port
    ("evil.example", 443, False),                 # one answer is loopback: refused whole
    ("lan.example", 443, False), ("127.0.0.1", 443, False), ("10.0.0.5", 80, False),
    ("::1", 443, False), ("169.254.169.254", 80, False), ("100.64.0.1", 443, False),
    ("::ffff:127.0.0.1", 443, False), ("no.such.host", 443, False),
    ("index.internal", 8443, True),               # exactly what the operator configured
    ("index.internal", 443, False),               # ...and nothing else on that host
])
def test_policy(host: str, port: int, ok: bool) -> None:
    policy = Policy([("index.internal", 8443)], DNS)
    d = policy.check(host, port)
    assert d.allowed is ok, d.why
    if ok:
        assert d.address == DNS(host, port)[0]   # connects to the checked address


@pytest.fixture
def listener() -> Iterator[tuple[int, list[bytes]]]:
    """A loopback server that records what reaches it."""
    srv = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            got.append(c.recv(4096))
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1], got
    srv.close()


def _through(proxy: FetchProxy, request: bytes) -> bytes:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(str(proxy.path))
    c.sendall(request)
    data = b""
    while chunk := c.recv(4096):
        data += chunk
    c.close()
    return data


def test_real_proxy_forwards_the_configured_index_and_refuses_other_loopback_ports(
        listener: tuple[int, list[bytes]]) -> None:
    port, got = listener
    other = socket.create_server(("127.0.0.1", 0))      # e.g. the status API or gRPC port
    other.settimeout(0.5)
    d = Path(tempfile.mkdtemp(prefix="hm-fp-"))
    proxy = FetchProxy.for_config(d / "s", f"http://127.0.0.1:{port}/simple", "", LOG)
    try:
        ok = _through(proxy, f"GET http://127.0.0.1:{port}/simple/x/ HTTP/1.1\r\nHost: x\r\n"
                             "Connection: keep-alive\r\n\r\n".encode())
        assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b"ok")
        assert got and got[0].startswith(b"GET /simple/x/ HTTP/1.1\r\n")
        assert b"Connection: close" in got[0] and b"keep-alive" not in got[0]
        oport = other.getsockname()[1]
        for req in (f"GET http://127.0.0.1:{oport}/api/v1/tasks HTTP/1.1\r\n\r\n",
                    f"CONNECT 127.0.0.1:{oport} HTTP/1.1\r\n\r\n",
                    f"CONNECT localhost:{oport} HTTP/1.1\r\n\r\n"):
            assert _through(proxy, req.encode()).startswith(b"HTTP/1.1 403"), req
        with pytest.raises(TimeoutError):
            other.accept()                               # nothing ever reached it
        assert len(proxy.refused) == 3
    finally:
        proxy.close()
        other.close()
    assert not (d / "s").exists()
    d.rmdir()


def test_without_a_namespace_pip_goes_through_the_proxy_only(monkeypatch: pytest.MonkeyPatch,
                                                             listener: tuple[int, list[bytes]]) -> None:
    """Where no network namespace can be made (a non-root worker under RestrictNamespaces=),
    pip runs on the host network but every request goes through the filtering proxy: the index
    works, a dependency URL on another loopback port is refused and never reached."""
    import sys

    from hivemind.config import RequirementsConfig
    from hivemind.executors import fetch_proxy
    from hivemind.executors.venv_cache import PrepareFailed, fetch_wheels
    from hivemind.executors.wheel_fetch import download_argv, fetch_env

    from pkgindex import make_wheel, serve_index

    monkeypatch.setitem(fetch_proxy._NETNS, os.geteuid() == 0, False)
    port, got = listener
    d = Path(tempfile.mkdtemp(prefix="hm-fp-"))
    try:
        (d / "index").mkdir()
        (d / "out").mkdir()
        make_wheel(d / "index", "hmok", "1.0", {"hmok.py": ""})
        make_wheel(d / "index", "hmbad", "1.0", {"hmbad.py": ""},
                   requires=(f"hmx @ http://127.0.0.1:{port}/hmx-1.0-py3-none-any.whl",))
        lines: list[str] = []
        with serve_index(d / "index") as index:
            cfg = RequirementsConfig(index_url=index.url)
            for name, ok in (("hmok", True), ("hmbad", False)):
                req = d / f"{name}.txt"
                req.write_text(f"{name}==1.0\n")
                argv = download_argv([sys.executable, "-m", "pip"], req, d / "out", cfg)

                def run(argv: list[str] = argv) -> None:
                    fetch_wheels(argv, sys.executable, cfg=cfg, cwd=d, env=fetch_env(cfg, d),
                                 user=None, sink=lambda ln: lines.append(ln.text),
                                 cancel=threading.Event(), deadline=time.monotonic() + 120,
                                 clock=time.monotonic, wall=time.time, log=LOG)
                if ok:
                    run()
                else:
                    with pytest.raises(PrepareFailed, match=f"127.0.0.1:{port}"):
                        run()
        assert (d / "out" / "hmok-1.0-py3-none-any.whl").exists()
        assert got == []                                  # the loopback port saw nothing
        assert any("no network namespace" in t for t in lines)
    finally:
        shutil.rmtree(d, ignore_errors=True)
