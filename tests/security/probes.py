"""Attack programs run inside the sandbox (as a build backend, setup.py or a task) and outside
it, so a test can show the probe works before it shows the sandbox stops it."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

# Tries every target in targets.json (next to it, or $HM_TARGETS), then whether any route
# leads to the DNS resolver or an outside address. UDP connect() only looks up a route: no
# packet leaves, so nothing is sent to any host off this machine.
NETWORK_PROBE = r'''
import json, os, socket, sys
here = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else "."
raw = os.environ.get("HM_TARGETS") or open(os.path.join(here, "targets.json")).read()
out = {}
for name, (host, port) in json.loads(raw).items():
    try:
        s = socket.create_connection((host, port), timeout=2)
        s.sendall(b"reached by " + name.encode())
        s.close()
        out[name] = "reached"
    except OSError as exc:
        out[name] = "blocked: %s" % exc
ns = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][:1]
for name, addr in (("dns resolver", ns[0] if ns else "10.255.255.53"), ("outside address", "198.51.100.7")):
    try:
        u = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
        u.connect((addr, 53))
        u.close()
        out[name] = "reached"
    except OSError as exc:
        out[name] = "blocked: %s" % exc
try:
    open("/tmp/hm-probe-ran-" + os.environ.get("HM_PROBE_ID", "x"), "w").write("ran")
except OSError:
    pass
print("PROBE " + json.dumps(out), flush=True)
'''


def parse_probe(lines: list[str]) -> dict[str, str]:
    for line in lines:
        if line.startswith("PROBE "):
            return dict(json.loads(line[len("PROBE "):]))
    raise AssertionError(f"the probe printed no result: {lines[-10:]}")


def run_outside(code: str, env: dict[str, str] | None = None, cwd: str | None = None) -> dict[str, str]:
    """The same probe on the host, as root, with the host's network: it must reach things."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=cwd, timeout=60)
    return parse_probe(out.stdout.splitlines())


def reached(result: dict[str, Any]) -> list[str]:
    return sorted(k for k, v in result.items() if v == "reached")
