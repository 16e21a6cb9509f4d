"""The worker as a systemd service, in a real systemd booted in a rootful Podman container.

tests/system/build-image makes a Debian bookworm image with systemd and a wheelhouse; the worker
is installed with units/install exactly as the README says, a development pool runs next to it
as a transient unit, and the checks go through systemctl and journalctl. Tasks use the venv
executor: rootless Podman can't run nested inside this container, so the image has no podman and
hivemind-podman.socket (which the worker Wants=) is skipped by its condition. That also proves
the fully hardened worker unit (seccomp filter, MemoryDenyWriteExecute with the Go metrics library
loaded through ctypes when native/build has it) runs the worker and a task. The Podman-crash check
puts a stand-in API server (a Python accept loop on the socket systemd passes) in
hivemind-podman.service: what it tests is systemd's dependency graph between the shipped units
(socket activation, no restart coupling), which doesn't depend on what the service runs.

The tests run in file order and share one booted container (each step builds on the last).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.system, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("HIVEMIND_TEST_CACHE", "/var/cache/hivemind-test"))
BIN = "/opt/hivemind-worker/bin/hivemind-worker"
POOL = "127.0.0.2:50051"
NODE_ID = "systest-node"
UNIT = "hivemind-worker"
PODMAN_UNIT = "hivemind-podman"
NATIVE_LIB = REPO / "native/build/libhivemindmetrics.so"
# The Go library under the unit's MemoryDenyWriteExecute when it is built; psutil otherwise.
METRICS = ("{backend: native, native_library: /src/native/libhivemindmetrics.so}"
           if NATIVE_LIB.is_file() else "{backend: psutil}")

# The package index tasks' requirements come from (no network here): a PEP 503 page per project
# pointing into the wheelhouse, written by the test that needs it.
INDEX = "/srv/hivemind-test-index"
WORKER_YAML = f"""\
node: {{id: {NODE_ID}}}
pool: {{address: "{POOL}", username: worker, password_file: pool-password, heartbeat_interval_s: 2}}
server:
  listen_host: 127.0.0.2
  port: 50052
  advertise_host: 127.0.0.2
  auth: {{mode: legacy, legacy_allowed_peers: ["127.0.0.0/8"]}}
executor: {{kind: venv, slots: 1, requirements: {{index_url: "file://{INDEX}"}}}}
status: {{enabled: false}}
metrics: {METRICS}
resources: {{cpu_score_per_core: 1000, reserve_memory_gb: 0}}
shutdown: {{policy: drain, drain_timeout_s: 10}}
"""

# Test-only settings: the hang hook (the watchdog check runs with the shipped WatchdogSec).
TEST_DROPIN = """\
[Service]
Environment=HIVEMIND_DEBUG_HANG_SIGNAL=1
RestartSec=1
"""

# The Podman-crash check: a stand-in for `podman system service` serving the activated socket.
STAND_IN = "/usr/local/lib/hivemind-test/stand-in-api.py"
STAND_IN_API = """\
import socket
s = socket.socket(fileno=3)
while True:
    c, _ = s.accept()
    c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nOK")
    c.close()
"""
PODMAN_STAND_IN_DROPINS = {
    STAND_IN: STAND_IN_API,
    f"/etc/systemd/system/{PODMAN_UNIT}.socket.d/test.conf": "[Unit]\nConditionFileIsExecutable=\n",
    f"/etc/systemd/system/{PODMAN_UNIT}.service.d/test.conf":
        f"[Unit]\nConditionFileIsExecutable=\n[Service]\nExecStart=\nExecStart=/usr/bin/python3 {STAND_IN}\n",
}


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll until probe() is truthy; `timeout` only bounds a broken run, nothing asserts on time."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


class Machine:
    def __init__(self, container: str) -> None:
        self.container = container

    def run(self, *cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["podman", "exec", "-i", self.container, *cmd], capture_output=True,
                              text=True, input=input, timeout=300)
        if check and proc.returncode != 0:
            tail = subprocess.run(["podman", "exec", self.container, "journalctl", "--no-pager", "-n", "40"],
                                  capture_output=True, text=True, timeout=60).stdout
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n"
                                 f"--- journal tail ---\n{tail}")
        return proc

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.run("sh", "-c", f'mkdir -p "$(dirname {path})" && cat >{path} && chmod {mode} {path}', input=text)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *matches: str) -> list[dict[str, Any]]:
        out = self.run("journalctl", "--no-pager", "-o", "json", *matches, check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def events(self, event: str) -> list[dict[str, Any]]:
        return self.journal(f"_SYSTEMD_UNIT={UNIT}.service", f"EVENT={event}")


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    if os.geteuid() != 0 or not shutil.which("podman") or not shutil.which("debootstrap"):
        pytest.skip("needs root, podman and debootstrap to boot systemd in a rootful container")
    build = subprocess.run([str(REPO / "tests/system/build-image"), str(CACHE)], capture_output=True,
                           text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    image = build.stdout.strip().splitlines()[-1]
    name = f"hivemind-systest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["podman", "run", "-d", "--rm", "--name", name, "--systemd=always",
                    "-v", f"{CACHE / 'wheels'}:/wheels:ro", "-v", f"{REPO / 'units'}:/src/units:ro",
                    *(["-v", f"{NATIVE_LIB.parent}:/src/native:ro"] if NATIVE_LIB.is_file() else []),
                    image, "/sbin/init"], check=True, capture_output=True, timeout=120)
    try:
        m = Machine(name)
        wait_for("systemd to boot", lambda: m.run("systemctl", "is-system-running", check=False)
                 .stdout.strip() in ("running", "degraded"))
        yield m
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True, timeout=120)


def test_install_as_the_readme_says(machine: Machine) -> None:
    machine.run("/src/units/install", "--wheelhouse", "/wheels", "hivemind-worker")
    assert machine.run("id", "-u", "hivemind").stdout.strip()
    for map_ in ("/etc/subuid", "/etc/subgid"):
        assert machine.run("grep", "^hivemind:", map_).stdout.strip().endswith(":65536")
    assert machine.run("systemctl", "is-enabled", UNIT, check=False).stdout.strip() == "disabled"
    machine.run("test", "-f", f"/etc/systemd/system/{PODMAN_UNIT}.service")
    machine.run("test", "-f", f"/etc/systemd/system/{PODMAN_UNIT}.socket")

    # A development pool beside it, as a transient unit; its worker password becomes the credential.
    machine.run("systemd-run", "--unit=hivemind-devpool", BIN, "dev", "--pool-only",
                "--pool-listen", POOL, "--state-dir", "/var/lib/hivemind-devpool")
    wait_for("the dev pool's password file",
             lambda: machine.run("test", "-s", "/var/lib/hivemind-devpool/pool-password", check=False).returncode == 0)
    machine.run("install", "-m", "0600", "/var/lib/hivemind-devpool/pool-password", "/etc/hivemind/pool-password")
    machine.write("/etc/hivemind/worker.yaml", WORKER_YAML, "0640")
    machine.run("chgrp", "hivemind", "/etc/hivemind/worker.yaml")
    machine.write(f"/etc/systemd/system/{UNIT}.service.d/test.conf", TEST_DROPIN)
    machine.run("systemctl", "daemon-reload")


def test_start_is_active_only_after_ready(machine: Machine) -> None:
    machine.run("systemctl", "start", UNIT)   # Type=notify: returns once READY=1 arrived
    props = machine.show(UNIT, "ActiveState", "SubState", "StatusText", "ExecMainStartTimestampMonotonic",
                         "ActiveEnterTimestampMonotonic", "MainPID")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    # The worker logged its build phase (before READY) after its process started and before
    # systemd called the unit active: activation waited for READY, not for the exec.
    (selected,) = machine.events("executor.selected")[-1:]
    logged = int(selected["__MONOTONIC_TIMESTAMP"])
    assert int(props["ExecMainStartTimestampMonotonic"]) < logged < int(props["ActiveEnterTimestampMonotonic"])
    assert "executor venv" in props["StatusText"]
    # The wanted Podman socket was skipped (no podman in this image), not failed.
    socket_unit = machine.show(f"{PODMAN_UNIT}.socket", "ConditionResult", "ActiveState", "Result")
    assert socket_unit == {"ConditionResult": "no", "ActiveState": "inactive", "Result": "success"}, socket_unit
    assert machine.show(PODMAN_UNIT, "ActiveState")["ActiveState"] == "inactive"


def test_worker_runs_fully_hardened(machine: Machine) -> None:
    pid = machine.show(UNIT, "MainPID")["MainPID"]
    status = dict(line.split(":", 1) for line in machine.run("cat", f"/proc/{pid}/status").stdout.splitlines())
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"           # filter mode: SystemCallFilter and friends
    assert int(status["CapBnd"].strip(), 16) == 0
    assert machine.show(UNIT, "MemoryDenyWriteExecute")["MemoryDenyWriteExecute"] == "yes"
    # With metrics.backend native the worker refuses to start unless the Go library loaded, so
    # reaching active (previous test) already proved it works under MemoryDenyWriteExecute.
    out = machine.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    score = float(out.strip().splitlines()[-1].split(":")[1].split()[0])
    assert score <= 3.0, out.strip().splitlines()[-1]


def test_status_line_in_systemctl_status(machine: Machine) -> None:
    wait_for("registration", lambda: "registered" in machine.show(UNIT, "StatusText")["StatusText"])
    out = machine.run("systemctl", "status", "--no-pager", UNIT, check=False).stdout
    assert "active (running)" in out
    assert 'Status: "registered; 0 task(s) running; executor venv' in out


def test_journal_has_structured_records(machine: Machine) -> None:
    records = machine.journal("-u", UNIT, f"NODE_ID={NODE_ID}")
    assert records
    ready = [r for r in records if r.get("EVENT") == "worker.ready"]
    assert ready, [r["MESSAGE"] for r in records]
    rec = ready[-1]
    assert rec["SYSLOG_IDENTIFIER"] == "hivemind-worker"
    assert rec["PRIORITY"] == "6"
    assert rec["CODE_FILE"].endswith("hivemind/daemon.py") and rec["CODE_FUNC"] in ("start", "_start")
    assert rec["_UID"] == machine.run("id", "-u", "hivemind").stdout.strip()
    password = machine.run("cat", "/etc/hivemind/pool-password").stdout.strip()
    assert password not in json.dumps(machine.journal("-u", UNIT))


def test_task_output_by_task_id(machine: Machine) -> None:
    sample = machine.run("/opt/hivemind-worker/bin/python", "-c",
                         "from hivemind.samples import sample; print(sample('hello'))").stdout.strip()
    out = machine.run(BIN, "submit", sample, "--pool", POOL, "--timeout", "120").stdout
    status_line = out.strip().splitlines()[-1]
    assert status_line.startswith("task ") and ": COMPLETED" in status_line, out
    task_id = status_line.split()[1].rstrip(":")
    def stdout_lines() -> list[str] | None:
        recs = machine.journal(f"TASK_ID={task_id}", "HIVEMIND_OUTPUT=stdout")
        return [r["MESSAGE"] for r in recs] if len(recs) >= 6 else None

    try:
        lines = wait_for("the task's journaled output", stdout_lines)
    except pytest.fail.Exception:
        found = [(r.get("HIVEMIND_OUTPUT"), r.get("MESSAGE")) for r in machine.journal(f"TASK_ID={task_id}")]
        pytest.fail(f"task {task_id}: not 6 stdout records in the journal; its records: {found[-20:]}\n{out}")
    assert lines[:5] == [f"hello from the task, step {i} of 5" for i in range(1, 6)]
    assert lines[5] == "done: wrote result.txt"
    assert all(r["TASK_ID"] == task_id for r in machine.journal(f"TASK_ID={task_id}"))


def test_sighup_reloads(machine: Machine) -> None:
    pid = machine.show(UNIT, "MainPID")["MainPID"]
    before = len(machine.events("config.reloaded"))
    machine.run("systemctl", "reload", UNIT)
    wait_for("config.reloaded in the journal", lambda: len(machine.events("config.reloaded")) > before)
    wait_for("active again after RELOADING=1/READY=1",
             lambda: machine.show(UNIT, "ActiveState")["ActiveState"] == "active")
    assert machine.show(UNIT, "MainPID")["MainPID"] == pid


def test_task_with_requirements_txt(machine: Machine) -> None:
    """The preparation step installs requirements.txt into the task's venv (offline here: the
    configured index is a local PEP 503 page onto the wheelhouse; PyYAML has no dependencies).
    A requirement naming a file is refused: the index is the worker's, never the task's."""
    wheel = next(w for w in machine.run("ls", "/wheels").stdout.split() if w.lower().startswith("pyyaml-"))
    machine.write(f"{INDEX}/pyyaml/index.html", f'<a href="file:///wheels/{wheel}">{wheel}</a>\n')
    machine.run("chmod", "-R", "a+rX", INDEX)
    task = f"/tmp/req-task-{uuid.uuid4().hex[:8]}"
    machine.write(f"{task}/requirements.txt", "pyyaml\n")
    machine.write(f"{task}/run.py", "import yaml, sys\nprint('yaml from', yaml.__file__)\n"
                  "print('venv', sys.prefix)\n")
    machine.run("chmod", "-R", "a+rX", task)
    out = machine.run(BIN, "submit", task, "--pool", POOL, "--timeout", "300", "--out", f"{task}.zip").stdout
    assert ": COMPLETED" in out.strip().splitlines()[-1], out
    line = next(x for x in out.splitlines() if x.startswith("yaml from"))
    prefix = next(x for x in out.splitlines() if x.startswith("venv ")).split()[1]
    assert line.split()[-1].startswith(prefix) and prefix.startswith("/var/lib/hivemind-worker"), out


def test_invalid_reload_fails_visibly_and_the_old_config_keeps_running(machine: Machine) -> None:
    pid = machine.show(UNIT, "MainPID")["MainPID"]
    machine.write("/etc/hivemind/worker.yaml", WORKER_YAML + "bogus_key: 1\n", "0640")
    machine.run("chgrp", "hivemind", "/etc/hivemind/worker.yaml")
    try:
        reload = machine.run("systemctl", "reload", UNIT, check=False)
        assert reload.returncode != 0, reload.stdout + reload.stderr
        props = machine.show(UNIT, "ActiveState", "MainPID")
        assert props == {"ActiveState": "active", "MainPID": pid}, props
        lines = [r["MESSAGE"] for r in machine.journal("-u", UNIT)]
        assert any("bogus_key: unknown key" in line for line in lines), lines[-10:]
    finally:
        machine.write("/etc/hivemind/worker.yaml", WORKER_YAML, "0640")
        machine.run("chgrp", "hivemind", "/etc/hivemind/worker.yaml")
    machine.run("systemctl", "reload", UNIT)
    assert machine.show(UNIT, "MainPID")["MainPID"] == pid


def test_hung_main_loop_is_killed_by_the_watchdog(machine: Machine) -> None:
    props = machine.show(UNIT, "MainPID", "NRestarts")
    machine.run("systemctl", "kill", "--kill-who=main", "--signal=SIGUSR2", UNIT)
    wait_for("the debug hang", lambda: machine.events("debug.hang"))
    wait_for("a restart by the watchdog", lambda: int(machine.show(UNIT, "NRestarts")["NRestarts"])
             > int(props["NRestarts"]), timeout=120)
    systemd_lines = [r["MESSAGE"] for r in machine.journal("_PID=1", f"UNIT={UNIT}.service")]
    assert any("Watchdog timeout" in line for line in systemd_lines), systemd_lines[-10:]
    wait_for("active (running) again", lambda: machine.show(UNIT, "SubState")["SubState"] == "running")
    assert machine.show(UNIT, "MainPID")["MainPID"] != props["MainPID"]


def test_podman_crash_leaves_the_worker_running(machine: Machine) -> None:
    for path, text in PODMAN_STAND_IN_DROPINS.items():
        machine.write(path, text)
    machine.run("systemctl", "daemon-reload")
    machine.run("systemctl", "start", f"{PODMAN_UNIT}.socket")
    sock = machine.run("stat", "-c", "%U %a", "/run/hivemind-podman/podman.sock").stdout.split()
    assert sock == ["hivemind", "600"], sock
    connect = ("import socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/hivemind-podman/podman.sock'); "
               "print(s.recv(100).decode().splitlines()[0])")
    assert machine.run("python3", "-c", connect).stdout.strip() == "HTTP/1.1 200 OK"   # activated
    podman_pid = machine.show(PODMAN_UNIT, "MainPID")["MainPID"]
    assert podman_pid != "0"
    worker = machine.show(UNIT, "MainPID", "NRestarts")
    machine.run("systemctl", "kill", "--kill-who=main", "--signal=SIGKILL", PODMAN_UNIT)
    wait_for("the Podman unit to come back", lambda: machine.show(PODMAN_UNIT, "MainPID")["MainPID"]
             not in ("0", podman_pid), timeout=120)
    assert machine.show(UNIT, "MainPID", "NRestarts") == worker
    assert machine.show(UNIT, "ActiveState")["ActiveState"] == "active"
    assert machine.show(f"{PODMAN_UNIT}.socket", "ActiveState")["ActiveState"] == "active"
    assert machine.run("python3", "-c", connect).stdout.strip() == "HTTP/1.1 200 OK"
    machine.run("systemctl", "stop", f"{PODMAN_UNIT}.socket", PODMAN_UNIT)


def test_stop_with_a_running_task_drains_then_ends_it(machine: Machine) -> None:
    marker = f"long-task-{uuid.uuid4().hex[:8]}"
    task = f"/tmp/{marker}"
    machine.write(f"{task}/run.py", f"import time\nprint('{marker} started', flush=True)\ntime.sleep(3600)\n")
    machine.run("chmod", "-R", "a+rX", task)
    machine.run("systemd-run", f"--unit={marker}", BIN, "submit", task, "--pool", POOL, "--timeout", "600",
                "--out", f"{task}.zip")
    wait_for("the task to run", lambda: "1 task(s) running" in machine.show(UNIT, "StatusText")["StatusText"],
             timeout=120)
    stop = machine.run("systemctl", "stop", UNIT, check=False)
    assert stop.returncode == 0, stop.stderr
    props = machine.show(UNIT, "ActiveState", "Result")
    assert props == {"ActiveState": "inactive", "Result": "success"}, props
    assert machine.events("worker.drain_timeout"), "the drain should have timed out on a 1 h task"
    systemd_lines = [r["MESSAGE"] for r in machine.journal("_PID=1", f"UNIT={UNIT}.service")]
    assert not any("timed out" in line or "SIGKILL" in line for line in systemd_lines), systemd_lines[-10:]
    assert machine.run("pgrep", "-f", f"{marker}/run.py", check=False).returncode == 1   # nothing left
    machine.run("systemctl", "stop", marker, check=False)


def test_stop_is_clean(machine: Machine) -> None:
    machine.run("systemctl", "start", UNIT)
    machine.run("systemctl", "stop", UNIT)
    props = machine.show(UNIT, "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, props
    systemd_lines = [r["MESSAGE"] for r in machine.journal("_PID=1", f"UNIT={UNIT}.service")]
    assert not any("timed out" in line for line in systemd_lines)
    assert machine.events("worker.stopping")
