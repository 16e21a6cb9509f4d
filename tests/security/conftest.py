"""The attack suite: each test performs one attack against one executor and passes only when the
attack was stopped (and, where it makes sense, shows the same probe succeeds outside the sandbox,
so a broken probe can't pass for a stopped attack).

At the end of the run it prints one line per attack and `N attacks, N stopped`. An attack whose
executor this machine can't run is listed as skipped (with the reason), never as stopped.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

_RESULTS: list[tuple[str, str, str]] = []      # (attack, outcome, detail)


def _describe(item: pytest.Item) -> str:
    doc = (getattr(item, "obj", None).__doc__ or "").strip().splitlines()  # type: ignore[union-attr]
    name = doc[0].rstrip(".") if doc else item.name
    params = getattr(item, "callspec", None)
    if params is not None:
        name += f" [{params.id}]"
    return name


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    if "tests/security/" not in item.nodeid.replace("\\", "/"):
        return
    if rep.when == "call" or (rep.when == "setup" and not rep.passed):
        if rep.skipped:
            detail = str(rep.longrepr[2]) if isinstance(rep.longrepr, tuple) else ""
            _RESULTS.append((_describe(item), "skipped", detail))
        elif rep.passed:
            _RESULTS.append((_describe(item), "stopped", ""))
        else:
            _RESULTS.append((_describe(item), "NOT STOPPED", "or not proven: see the failure above"))


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("attack suite")
    for name, outcome, detail in _RESULTS:
        tr.write_line(f"attack: {name}: {outcome}" + (f" ({detail})" if detail else ""))
    run = [r for r in _RESULTS if r[1] != "skipped"]
    stopped = sum(1 for r in run if r[1] == "stopped")
    tr.write_line(f"{len(run)} attacks, {stopped} stopped"
                  + (f" ({len(_RESULTS) - len(run)} skipped)" if len(run) != len(_RESULTS) else ""))


@dataclass
class Target:
    name: str
    host: str
    port: int
    hits: list[bytes] = field(default_factory=list)


class Targets:
    """Loopback listeners standing for the worker's status port, its gRPC port and any other
    local service; each records every connection that reaches it."""

    def __init__(self) -> None:
        self.items: dict[str, Target] = {}
        self._socks: list[socket.socket] = []

    def add(self, name: str, host: str = "127.0.0.1") -> Target:
        srv = socket.create_server((host, 0))
        srv.settimeout(0.2)
        t = Target(name, host, srv.getsockname()[1])
        self.items[name] = t
        self._socks.append(srv)

        def serve() -> None:
            while True:
                try:
                    c, _ = srv.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                c.settimeout(2)
                try:
                    t.hits.append(c.recv(1024) or b"<connected>")
                except OSError:
                    t.hits.append(b"<connected>")
                c.close()

        threading.Thread(target=serve, daemon=True).start()
        return t

    def as_json(self) -> dict[str, list[object]]:
        return {t.name: [t.host, t.port] for t in self.items.values()}

    def wait_reached(self, names: list[str], timeout: float = 10) -> list[str]:
        """Names reached once all of `names` were (the listeners record asynchronously)."""
        import time

        end = time.monotonic() + timeout
        while not set(names) <= set(self.reached()) and time.monotonic() < end:
            time.sleep(0.02)
        return sorted(self.reached())

    def reached(self) -> list[str]:
        return [t.name for t in self.items.values() if t.hits]

    def reset(self) -> None:
        for t in self.items.values():
            t.hits.clear()

    def close(self) -> None:
        for s in self._socks:
            s.close()


@pytest.fixture
def targets() -> Iterator[Targets]:
    t = Targets()
    t.add("status port")
    t.add("grpc port")
    t.add("other loopback port", "127.0.0.2")
    yield t
    t.close()
