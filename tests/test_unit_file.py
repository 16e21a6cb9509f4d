"""The systemd unit, sysusers and tmpfiles files: their key directives, that the committed unit is
the rendering of units/hivemind-worker.unit.json, and systemd's own offline checks."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "units"
SERVICE = UNITS / "hivemind-worker.service"
# Measured 5.8 with every seccomp-based directive left out (they force no_new_privs, see the
# unit's comments); this bound catches a hardening line dropped by accident.
MAX_EXPOSURE = 6.0


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        sections[section][key].append(value)
    return sections


@pytest.fixture(autouse=True, scope="module")
def _remove_systemd_analyze_marker() -> Iterator[None]:
    # systemd-analyze's offline manager writes this marker when no systemd runs; remove it if
    # these tests created it.
    marker = Path("/run/systemd/systemd-units-load")
    existed = marker.exists()
    yield
    if not existed:
        marker.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(SERVICE.read_text())


def one(unit: dict[str, dict[str, list[str]]], key: str, section: str = "Service") -> str:
    values = unit[section][key]
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def test_committed_unit_is_the_rendering_of_the_json() -> None:
    run = subprocess.run([str(UNITS / "gen-unit"), "--check"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_notify_watchdog_and_restart(unit: dict[str, dict[str, list[str]]]) -> None:
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    assert one(unit, "WatchdogSec") == "30"
    assert one(unit, "Restart") == "on-failure"
    assert int(one(unit, "StartLimitBurst", "Unit")) >= 3
    assert int(one(unit, "StartLimitIntervalSec", "Unit")) > 0
    # drain_timeout_s defaults to 60; the stop timeout must leave room for it.
    assert int(one(unit, "TimeoutStopSec")) >= 90
    assert one(unit, "KillMode") == "process"
    assert one(unit, "ExecReload") == "/bin/kill -HUP $MAINPID"


def test_commands_and_credentials(unit: dict[str, dict[str, list[str]]]) -> None:
    bin_ = "/opt/hivemind-worker/bin/hivemind-worker"
    cfg = "/etc/hivemind/worker.yaml"
    assert one(unit, "ExecStartPre") == f"{bin_} check-config --config {cfg}"
    assert one(unit, "ExecStart") == f"{bin_} run --config {cfg}"
    assert "pool-password:/etc/hivemind/pool-password" in unit["Service"]["LoadCredential"]
    assert one(unit, "User") == "hivemind"
    for key in ("StateDirectory", "RuntimeDirectory", "LogsDirectory"):
        assert one(unit, key) == "hivemind-worker"
    assert one(unit, "RuntimeDirectoryPreserve") == "restart"


def test_hardening_and_its_documented_relaxations(unit: dict[str, dict[str, list[str]]]) -> None:
    assert one(unit, "ProtectSystem") == "strict"
    assert one(unit, "ProtectHome") == "yes"
    assert one(unit, "PrivateTmp") == "yes"
    assert one(unit, "NoNewPrivileges") == "no"
    assert set(one(unit, "CapabilityBoundingSet").split()) == {"CAP_SETUID", "CAP_SETGID"}
    assert one(unit, "AmbientCapabilities") == ""
    # Each of these implies no_new_privs for a User= service, which breaks newuidmap.
    for forbidden in ("SystemCallFilter", "RestrictNamespaces", "PrivateDevices",
                      "ProtectKernelTunables", "LockPersonality", "RestrictSUIDSGID"):
        assert forbidden not in unit["Service"], forbidden
    # Every relaxation carries a one-line reason just above it.
    lines = SERVICE.read_text().splitlines()
    for key in ("NoNewPrivileges=no", "CapabilityBoundingSet=", "KillMode=", "DeviceAllow="):
        idx = next(i for i, line in enumerate(lines) if line.startswith(key))
        assert lines[idx - 1].startswith("# "), key


def test_json_entries_are_well_formed() -> None:
    data = json.loads((UNITS / "hivemind-worker.unit.json").read_text())
    for entry in data["directives"]:
        assert entry["section"] in ("Unit", "Service", "Install")
        assert ("key" in entry) != ("comment" in entry), entry
        if "key" in entry:
            assert isinstance(entry["value"], str | list)


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart exists; point it at a real binary, keep everything else.
    text = SERVICE.read_text().replace("/opt/hivemind-worker/bin/hivemind-worker", shutil.which("true") or "/bin/true")
    unit_file = tmp_path / "hivemind-worker.service"
    unit_file.write_text(text)
    run = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit_file)],
                         capture_output=True, text=True, cwd=tmp_path)
    problems = [line for line in (run.stdout + run.stderr).splitlines() if "hivemind-worker" in line]
    assert run.returncode == 0 and not problems, run.stdout + run.stderr


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_security_exposure_score(tmp_path: Path) -> None:
    run = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(SERVICE)],
                         capture_output=True, text=True, cwd=tmp_path)
    match = re.search(r"Overall exposure level for hivemind-worker.service: ([0-9.]+)", run.stdout)
    assert match, run.stdout + run.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE


@pytest.mark.skipif(not shutil.which("systemd-sysusers") or not shutil.which("systemd-tmpfiles"),
                    reason="systemd-sysusers/systemd-tmpfiles not installed")
def test_sysusers_and_tmpfiles_apply_to_an_empty_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "hivemind-worker.sysusers.conf")],
                   check=True, capture_output=True)
    passwd = (tmp_path / "etc/passwd").read_text()
    entry = next(line for line in passwd.splitlines() if line.startswith("hivemind:"))
    assert entry.split(":")[5] == "/var/lib/hivemind-worker"
    subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create",
                    str(UNITS / "hivemind-worker.tmpfiles.conf")], check=True, capture_output=True)
    etc = tmp_path / "etc/hivemind"
    assert etc.is_dir() and oct(etc.stat().st_mode & 0o777) == "0o750"
    assert oct((etc / "tls").stat().st_mode & 0o777) == "0o700"


def test_install_script_is_valid_sh() -> None:
    subprocess.run(["sh", "-n", str(UNITS / "install")], check=True)
