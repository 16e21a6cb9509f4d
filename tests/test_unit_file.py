"""The systemd units (hivemind-worker, and hivemind-podman with the rootless Podman API service),
sysusers and tmpfiles files: their key directives, that the committed units are the renderings of
units/*.unit.json, and systemd's own offline checks (verify, security score)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from unitfile import parse_unit

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "units"
SERVICE = UNITS / "hivemind-worker.service"
PODMAN_SERVICE = UNITS / "hivemind-podman.service"
PODMAN_SOCKET = UNITS / "hivemind-podman.socket"
# Issue 6's target for the worker (measured 1.4 with systemd 252). The Podman unit keeps the
# relaxations newuidmap needs (measured 6.2); its bound catches a hardening line dropped by accident.
MAX_EXPOSURE = {SERVICE: 3.0, PODMAN_SERVICE: 6.5}
# Each of these is seccomp-based, so for a User= service it forces no_new_privs.
SECCOMP_BASED = ("SystemCallFilter", "SystemCallArchitectures", "RestrictNamespaces",
                 "RestrictAddressFamilies", "PrivateDevices", "ProtectKernelModules", "ProtectKernelLogs",
                 "ProtectClock", "ProtectHostname", "RestrictSUIDSGID", "RestrictRealtime",
                 "LockPersonality", "MemoryDenyWriteExecute")


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


@pytest.fixture(scope="module")
def podman_unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(PODMAN_SERVICE.read_text())


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
    # Validate first: a refused config fails `systemctl reload` instead of only being logged.
    assert unit["Service"]["ExecReload"] == [
        "/opt/hivemind-worker/bin/hivemind-worker check-config --config /etc/hivemind/worker.yaml",
        "/bin/kill -HUP $MAINPID"]


def test_commands_and_credentials(unit: dict[str, dict[str, list[str]]]) -> None:
    bin_ = "/opt/hivemind-worker/bin/hivemind-worker"
    cfg = "/etc/hivemind/worker.yaml"
    assert one(unit, "ExecStartPre") == f"{bin_} check-config --config {cfg}"
    assert one(unit, "ExecStart") == f"{bin_} run --config {cfg}"
    assert "pool-password:/etc/hivemind/pool-password" in unit["Service"]["LoadCredential"]
    assert one(unit, "User") == "hivemind"
    for key in ("StateDirectory", "RuntimeDirectory", "LogsDirectory"):
        assert one(unit, key) == "hivemind-worker"



@pytest.fixture(scope="module")
def podman_socket() -> dict[str, dict[str, list[str]]]:
    return parse_unit(PODMAN_SOCKET.read_text())


def test_worker_wants_the_socket_without_restart_coupling(unit: dict[str, dict[str, list[str]]],
                                                          podman_unit: dict[str, dict[str, list[str]]],
                                                          podman_socket: dict[str, dict[str, list[str]]]) -> None:
    # Ordered after the socket; neither Requires= nor BindsTo= the Podman service, so its crash
    # or restart leaves the worker running.
    assert "hivemind-podman.socket" in one(unit, "Wants", "Unit").split()
    assert "hivemind-podman.socket" in one(unit, "After", "Unit").split()
    for key in ("Requires", "BindsTo", "PartOf", "Requisite"):
        assert key not in unit["Unit"], key
    assert "hivemind-podman.service" not in " ".join(unit["Unit"].get("After", []) + unit["Unit"]["Wants"])
    # Skipped (not failed) without Podman, socket and service both.
    assert one(podman_unit, "ConditionFileIsExecutable", "Unit") == "/usr/bin/podman"
    assert one(podman_socket, "ConditionFileIsExecutable", "Unit") == "/usr/bin/podman"
    assert "Install" not in podman_unit
    assert one(podman_unit, "Requires", "Unit") == "hivemind-podman.socket"


def test_podman_unit_serves_the_socket_the_worker_is_told_about(
        podman_unit: dict[str, dict[str, list[str]]], podman_socket: dict[str, dict[str, list[str]]]) -> None:
    socket = "%t/hivemind-podman/podman.sock"
    # Socket-activated: Podman serves the fd systemd passes it; no URI, no readiness loop.
    assert one(podman_unit, "ExecStart") == "/usr/bin/podman system service --time=0"
    assert "ExecStartPost" not in podman_unit["Service"]
    assert one(podman_socket, "ListenStream", "Socket") == socket
    assert (one(podman_socket, "SocketUser", "Socket"), one(podman_socket, "SocketGroup", "Socket"),
            one(podman_socket, "SocketMode", "Socket")) == ("hivemind", "hivemind", "0600")
    assert one(podman_unit, "Environment") == "XDG_RUNTIME_DIR=%t/hivemind-podman"
    assert one(podman_unit, "RuntimeDirectory") == "hivemind-podman"
    # %t is /run for system units: the path units/install writes into worker.yaml.
    assert f'socket: "unix://{socket.replace("%t", "/run")}"' in (UNITS / "install").read_text()
    assert (one(podman_unit, "User"), one(podman_unit, "StateDirectory")) == ("hivemind", "hivemind-worker")
    assert "hivemind-podman.socket" in (UNITS / "install").read_text()


def test_task_survival_semantics(podman_unit: dict[str, dict[str, list[str]]]) -> None:
    # Containers (children of conmon) stay when the API service restarts or stops, and so does
    # the runtime state they need.
    assert one(podman_unit, "KillMode") == "process"
    assert one(podman_unit, "RuntimeDirectoryPreserve") == "yes"
    assert one(podman_unit, "Restart") == "on-failure"


def test_worker_is_fully_hardened(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    assert one(unit, "ProtectSystem") == "strict"
    assert one(unit, "ProtectHome") == "yes"
    assert one(unit, "PrivateTmp") == "yes"
    assert one(unit, "NoNewPrivileges") == "yes"
    assert one(unit, "CapabilityBoundingSet") == ""
    assert one(unit, "AmbientCapabilities") == ""
    for key in SECCOMP_BASED:
        assert key in service, key
    assert service["SystemCallFilter"] == ["@system-service", "~@privileged"]
    assert "DeviceAllow" not in service


def test_podman_unit_keeps_only_its_documented_relaxations(
        podman_unit: dict[str, dict[str, list[str]]]) -> None:
    assert one(podman_unit, "ProtectSystem") == "strict"
    assert one(podman_unit, "ProtectHome") == "yes"
    assert one(podman_unit, "PrivateTmp") == "yes"
    assert one(podman_unit, "NoNewPrivileges") == "no"
    assert set(one(podman_unit, "CapabilityBoundingSet").split()) == {"CAP_SETUID", "CAP_SETGID"}
    assert one(podman_unit, "AmbientCapabilities") == ""
    for key in SECCOMP_BASED:
        assert key not in podman_unit["Service"], key


@pytest.mark.parametrize(("service", "relaxed"), [
    (SERVICE, ("KillMode=", "MemoryDenyWriteExecute=", "RestrictAddressFamilies=", "RestrictNamespaces=")),
    (PODMAN_SERVICE, ("NoNewPrivileges=no", "CapabilityBoundingSet=", "KillMode=", "DeviceAllow=",
                      "Delegate=", "RuntimeDirectoryPreserve=")),
], ids=lambda v: v.name if isinstance(v, Path) else "")
def test_every_relaxation_carries_a_reason(service: Path, relaxed: tuple[str, ...]) -> None:
    lines = service.read_text().splitlines()
    for key in relaxed:
        idx = next(i for i, line in enumerate(lines) if line.startswith(key))
        assert lines[idx - 1].startswith("# "), key


@pytest.mark.parametrize("name", ["hivemind-worker", "hivemind-podman"])
def test_json_entries_are_well_formed(name: str) -> None:
    data = json.loads((UNITS / f"{name}.unit.json").read_text())
    for entry in data["directives"]:
        assert entry["section"] in ("Unit", "Service", "Install")
        assert ("key" in entry) != ("comment" in entry), entry
        if "key" in entry:
            assert isinstance(entry["value"], str | list)


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that executables exist; point them at a real binary, keep everything else,
    # and verify the units together so Requires=/Wants= resolve.
    true = shutil.which("true") or "/bin/true"
    files = []
    for service in (SERVICE, PODMAN_SERVICE, PODMAN_SOCKET):
        text = (service.read_text().replace("/opt/hivemind-worker/bin/hivemind-worker", true)
                .replace("/usr/bin/podman", true))
        files.append(tmp_path / service.name)
        files[-1].write_text(text)
    run = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, files)],
                         capture_output=True, text=True, cwd=tmp_path)
    problems = [line for line in (run.stdout + run.stderr).splitlines() if "hivemind-" in line]
    assert run.returncode == 0 and not problems, run.stdout + run.stderr


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
@pytest.mark.parametrize("service", [SERVICE, PODMAN_SERVICE], ids=lambda p: p.name)
def test_security_exposure_score(service: Path, tmp_path: Path) -> None:
    run = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(service)],
                         capture_output=True, text=True, cwd=tmp_path)
    match = re.search(rf"Overall exposure level for {re.escape(service.name)}: ([0-9.]+)", run.stdout)
    assert match, run.stdout + run.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE[service]


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
