"""What an idle daemon keeps resident: modules its configuration does not use stay unimported
(issue 18: every import costs resident memory for the daemon's whole life), and the main loop's
flags wake it at once instead of it polling on a short tick."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hivemind
from hivemind.daemon import Signals

# The checkout under test, also for the child (`python -c` would put its working directory first).
ROOT = Path(hivemind.__file__).resolve().parent.parent

# What `hivemind run` imports for a Podman worker speaking pool.protocol 2026-04 with
# status.enabled false, and the metrics every daemon keeps (rendered once).
PODMAN_2026_04 = """
import sys
import hivemind.cli, hivemind.daemon
import hivemind.executors.podman
import hivemind.pool.v2026_04, hivemind.server.v2026_04
from hivemind.status.prom import WorkerMetrics
WorkerMetrics("0").render()
print("\\n".join(sorted(sys.modules)))
"""

# status.enabled true binds the port at start, and loads the app and waitress on the first
# connection; the OpenAPI document waits for its own request.
WITH_STATUS = PODMAN_2026_04.replace('WorkerMetrics("0").render()', """
import http.client, logging
from hivemind.status.server import StatusServer

def load_app():
    from hivemind.status.app import create_app
    return create_app(object(), metrics=WorkerMetrics("0"), token=None, reads_need_token=False,
                      logger=logging.getLogger("t"))

server = StatusServer(load_app, "127.0.0.1", 0, logger=logging.getLogger("t"))
server.start()
print("\\n".join(sorted(sys.modules)))
print("-- after a request")
conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
conn.request("GET", "/healthz")
assert conn.getresponse().status in (200, 503)
conn.close()
server.stop()
""")

NEVER_ON_THIS_PATH = (
    "hivemind._proto.v2025_10", "hivemind.pool.v2025_10", "hivemind.server.v2025_10",  # other generation
    "hivemind.executors.venv",     # the other executor
    "prometheus_client",           # metrics are rendered by hivemind.status.exposition
    "podman", "requests", "urllib3",   # the Podman API over http.client (podman_http.py)
    "hivemind.devpool",
    "psutil",                      # only the fallback metrics backend and a guessed advertise_host
)
STATUS_ONLY = ("falcon", "waitress", "hivemind.status.app", "hivemind.status.server")


def _modules(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True, cwd=ROOT)
    return set(out.stdout.split())


def _loaded(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def test_podman_worker_without_status_api_imports_only_its_path() -> None:
    modules = _modules(PODMAN_2026_04)
    assert "hivemind._proto.v2026_04.nodepool_pb2" in modules   # the check sees the real path
    assert _loaded(modules, NEVER_ON_THIS_PATH + STATUS_ONLY) == []


def test_status_api_loads_falcon_and_waitress_on_its_first_connection() -> None:
    out = subprocess.run([sys.executable, "-c", WITH_STATUS], capture_output=True, text=True,
                         timeout=120, check=True, cwd=ROOT).stdout
    before_text, _, after_text = out.partition("-- after a request")
    before, after = set(before_text.split()), set(after_text.split())
    assert "hivemind.status.server" in before   # listening already
    assert _loaded(before, NEVER_ON_THIS_PATH + STATUS_ONLY[:-1]) == []
    assert "falcon" in after and "waitress" in after and "hivemind.status.app" in after
    assert _loaded(after, NEVER_ON_THIS_PATH + ("hivemind.status.openapi",)) == []


def test_every_flag_wakes_the_main_loop() -> None:
    for name in ("stop", "reload", "hang"):
        s = Signals()
        assert not s.wake.is_set()
        getattr(s, name).set()
        assert s.wake.is_set() and getattr(s, name).is_set()
