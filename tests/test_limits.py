"""Unit tests of what the kernel applied (cgroup files) and of `executor.podman.mode: auto`.

The mode choice runs over probe results recorded on real hosts: this cgroup-v1 VM (rootless
applies nothing, rootful everything), a cgroup-v2 host with delegation to the service user, one
without (rootless containers with limits don't start), and a worker that isn't root.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hivemind.executors.base import Enforcement, ExecutorStatus
from hivemind.executors.kernel_limits import compare, parse_proc_cgroup, read_limits
from hivemind.executors.podman_mode import HostCgroups, choose_mode, host_cgroups

CID = "3f" * 32
V1_CGROUP = f"""12:pids:/libpod_parent/libpod-{CID}
11:memory:/libpod_parent/libpod-{CID}
4:cpu,cpuacct:/libpod_parent/libpod-{CID}
1:name=systemd:/libpod_parent/libpod-{CID}
0::/
"""
V1_ROOTLESS = """9:name=systemd:/
8:pids:/
4:memory:/process_api/523c69af
1:cpu:/
0::/
"""
V2_CGROUP = f"0::/user.slice/user-999.slice/user@999.service/user.slice/libpod-{CID}.scope\n"


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_v1_limits_of_the_task_own_cgroup(tmp_path: Path) -> None:
    d = f"libpod_parent/libpod-{CID}"
    _write(tmp_path, f"memory/{d}/memory.limit_in_bytes", "268435456\n")
    _write(tmp_path, f"cpu/{d}/cpu.cfs_quota_us", "150000\n")
    _write(tmp_path, f"cpu/{d}/cpu.cfs_period_us", "100000\n")
    _write(tmp_path, f"pids/{d}/pids.max", "256\n")
    place = parse_proc_cgroup(V1_CGROUP, unified=False)
    k = read_limits(place, str(tmp_path))
    assert (k.memory_bytes, k.cpus, k.pids) == (268435456, 1.5, 256)
    applied = compare(268435456, 1.5, 256, k, CID)
    assert {n: a.applied for n, a in applied.items()} == {"memory_bytes": 268435456, "cpus": 1.5, "pids": 256}
    assert "memory.limit_in_bytes" in applied["memory_bytes"].how
    # The same files, but the kernel holds other values than granted: not applied, and why.
    wrong = compare(512 * 1024 * 1024, 2.0, 100, k, CID)
    assert all(a.applied is None for a in wrong.values())
    assert "holds 268435456" in wrong["memory_bytes"].how


def test_v1_rootless_shares_a_cgroup_that_is_not_the_tasks(tmp_path: Path) -> None:
    # The service's cgroup may have a limit of its own: it is still not the task's.
    _write(tmp_path, "memory/process_api/523c69af/memory.limit_in_bytes", "268435456\n")
    _write(tmp_path, "memory/memory.limit_in_bytes", str(2**63 - 4096))
    place = parse_proc_cgroup(V1_ROOTLESS, unified=False)
    applied = compare(268435456, 1.0, 256, read_limits(place, str(tmp_path)), CID)
    assert all(a.applied is None for a in applied.values())
    assert "shares cgroup /process_api/523c69af" in applied["memory_bytes"].how
    assert "no pids cgroup file" in applied["pids"].how


def test_v2_limits_and_unlimited_values(tmp_path: Path) -> None:
    d = f"user.slice/user-999.slice/user@999.service/user.slice/libpod-{CID}.scope"
    _write(tmp_path, f"{d}/memory.max", "1073741824\n")
    _write(tmp_path, f"{d}/cpu.max", "max 100000\n")
    _write(tmp_path, f"{d}/pids.max", "max\n")
    place = parse_proc_cgroup(V2_CGROUP, unified=True)
    assert place.version == 2
    k = read_limits(place, str(tmp_path))
    assert (k.memory_bytes, k.cpus, k.pids) == (1073741824, None, None)
    applied = compare(1073741824, 1.0, 256, k, CID)
    assert applied["memory_bytes"].applied == 1073741824
    assert applied["cpus"].applied is None and "no limit" in applied["cpus"].how
    assert applied["pids"].applied is None


def test_host_cgroups_reads_the_delegated_controllers(tmp_path: Path) -> None:
    assert host_cgroups(999, str(tmp_path)).version == 1
    _write(tmp_path, "cgroup.controllers", "cpuset cpu io memory pids\n")
    assert host_cgroups(999, str(tmp_path)) == HostCgroups(2, None)
    _write(tmp_path, "user.slice/user-999.slice/user@999.service/cgroup.controllers", "memory pids\n")
    assert host_cgroups(999, str(tmp_path)) == HostCgroups(2, ("memory", "pids"))


def _st(usable: bool, memory: bool = False, cpu: bool = False, pids: bool = False,
        reason: str = "podman 4.3.1") -> ExecutorStatus:
    enf = Enforcement("container", memory, cpu, pids, True, True) if usable else None
    return ExecutorStatus("podman", usable, reason, enf)


ALL = {"memory": True, "cpu": True, "pids": True}
START_FAILED = ("a container with the task limits does not start: runc create failed: rootless "
                "needs no limits + no cgrouppath when no permission is granted for cgroups")


@pytest.mark.parametrize(("case", "host", "rootless", "rootful", "root", "mode", "enforced", "words"), [
    ("cgroup v1, root (this VM)", HostCgroups(1, None), _st(True), _st(True, **ALL), True,
     "rootful", True, ["cgroup v1", "memory, cpu, pids", "the worker is root"]),
    ("cgroup v2 with delegation", HostCgroups(2, ("cpu", "memory", "pids")), _st(True, **ALL), None,
     True, "rootless", True, ["enforces memory, CPU and pids", "cgroup v2"]),
    ("cgroup v2 without delegation, root", HostCgroups(2, None), _st(False, reason=START_FAILED),
     _st(True, **ALL), True, "rootful", True, ["can't run tasks here", "does not start"]),
    ("cgroup v2, partial delegation, root", HostCgroups(2, ("memory", "pids")),
     _st(True, memory=True, pids=True), _st(True, **ALL), True, "rootful", True,
     ["no cpu limit", "memory pids"]),
    ("cgroup v1, worker not root", HostCgroups(1, None), _st(True), None, False,
     "rootless", False, ["needs a root worker", "scripts/setup-podman"]),
    ("cgroup v2 without delegation, not root", HostCgroups(2, None), _st(False, reason=START_FAILED),
     None, False, "rootless", False, ["needs a root worker"]),
    ("cgroup v1, root, rootful unusable", HostCgroups(1, None), _st(True),
     _st(False, reason="image missing"), True, "rootless", False, ["rootful Podman is unusable (image missing)"]),
])
def test_mode_choice_from_recorded_probes(case: str, host: HostCgroups, rootless: ExecutorStatus,
                                          rootful: ExecutorStatus | None, root: bool, mode: str,
                                          enforced: bool, words: list[str]) -> None:
    choice = choose_mode(host, rootless, rootful, root)
    assert (choice.mode, choice.enforced) == (mode, enforced), case
    for w in words:
        assert w in choice.reason, (case, choice.reason)
