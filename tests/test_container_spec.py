"""Unit tests of the pure TaskSpec + PodmanConfig -> container arguments translation (no Podman)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from hivemind.config import PodmanConfig
from hivemind.executors.base import Entry, Limits, TaskSpec
from hivemind.executors.container_spec import (
    PYCACHE_MOUNT,
    ROOTFUL_USERNS,
    ContainerSpec,
    build_container_spec,
    build_prepare_spec,
    container_name,
    parse_user,
    rootful_userns,
)

MiB = 1024 * 1024


def _spec(tmp_path: Path, **limits: object) -> TaskSpec:
    lim = Limits(cpus=1.5, memory_bytes=512 * MiB, **limits)  # type: ignore[arg-type]
    return TaskSpec("t-1", tmp_path, Entry(("python3", "main.py")), lim,
                    env={"FOO": "bar"}, labels={"hivemind.managed": "0", "worker": "1.0"})


def test_defaults_are_locked_down(tmp_path: Path) -> None:
    kw = build_container_spec(_spec(tmp_path), PodmanConfig(), "node-a", rootless=False).create_kwargs()
    assert kw["name"] == "hivemind-node-a-t-1"
    assert kw["network_mode"] == "none"
    assert kw["read_only"] is True
    assert kw["cap_drop"] == ["ALL"]
    assert kw["no_new_privileges"] is True
    assert "security_opt" not in kw and "nano_cpus" not in kw   # podman-py drops both silently
    assert kw["user"] == "1000:1000"
    assert kw["working_dir"] == "/workspace"
    assert kw["command"] == ["python3", "main.py"]
    assert kw["pids_limit"] == 256
    assert kw["mem_limit"] == kw["memswap_limit"] == 512 * MiB
    assert (kw["cpu_quota"], kw["cpu_period"]) == (150_000, 100_000)
    assert {"Name": "nofile", "Soft": 1024, "Hard": 1024} in kw["ulimits"]
    assert {"Name": "nproc", "Soft": 1024, "Hard": 1024} in kw["ulimits"]
    assert "devices" not in kw
    # Rootful: a user namespace of its own, so uid 1000 inside is no host account's uid.
    uid, gid, size = (int(v) for v in ROOTFUL_USERNS.removeprefix("map:").split(":"))
    assert kw["userns_mode"] == {"nsmode": "private"}
    assert kw["idmappings"] == {"UIDMap": [{"container_id": 0, "host_id": uid, "size": size}],
                                "GIDMap": [{"container_id": 0, "host_id": gid, "size": size}]}
    assert kw["init"] is True            # SIGTERM reaches the task; PID 1 alone ignores it
    assert kw["log_config"] == {"Type": "k8s-file", "Config": {"size": 16 * MiB}}


def test_labels_are_ours_and_cannot_be_overridden(tmp_path: Path) -> None:
    kw = build_container_spec(_spec(tmp_path), PodmanConfig(), "node-a", rootless=False).create_kwargs()
    assert kw["labels"]["hivemind.managed"] == "1"
    assert kw["labels"]["hivemind.node_id"] == "node-a"
    assert kw["labels"]["hivemind.task_id"] == "t-1"
    assert kw["labels"]["worker"] == "1.0"


def test_mounts_workspace_rw_and_tmpfs_sized(tmp_path: Path) -> None:
    cfg = PodmanConfig(tmpfs_mb=64)
    kw = build_container_spec(_spec(tmp_path), cfg, "n", rootless=False).create_kwargs()
    by_target = {m["target"]: m for m in kw["mounts"]}
    assert by_target["/workspace"] == {"type": "bind", "target": "/workspace",
                                       "source": str(tmp_path), "read_only": False,
                                       "chown": True}   # to the task's mapped uid
    tmp = by_target["/tmp"]  # noqa: S108 - the container's tmpfs
    assert tmp["type"] == "tmpfs"
    assert tmp["size"] == str(64 * MiB)   # the smaller of Limits and config


def test_pydeps_mounted_read_only_on_pythonpath(tmp_path: Path) -> None:
    kw = build_container_spec(_spec(tmp_path), PodmanConfig(), "n", rootless=False,
                              pydeps_dir="/state/pc/abc").create_kwargs()
    deps = [m for m in kw["mounts"] if m["target"] == PYCACHE_MOUNT]
    assert deps == [{"type": "bind", "target": PYCACHE_MOUNT, "source": "/state/pc/abc",
                     "read_only": True}]
    assert kw["environment"]["PYTHONPATH"] == PYCACHE_MOUNT
    assert kw["environment"]["FOO"] == "bar"


def test_network_only_when_both_task_and_config_allow(tmp_path: Path) -> None:
    spec = _spec(tmp_path, network=True)
    assert build_container_spec(spec, PodmanConfig(), "n", rootless=False).network_mode == "none"
    out = PodmanConfig(network="outbound")
    assert build_container_spec(spec, out, "n", rootless=False).network_mode == "bridge"
    assert build_container_spec(_spec(tmp_path), out, "n", rootless=False).network_mode == "none"


def test_gpus_only_as_cdi_devices_when_asked(tmp_path: Path) -> None:
    spec = _spec(tmp_path, gpu_devices=("nvidia.com/gpu=0",))
    kw = build_container_spec(spec, PodmanConfig(), "n", rootless=False).create_kwargs()
    assert kw["devices"] == ["nvidia.com/gpu=0"]


def test_rootless_keeps_workspace_owner_as_task_user(tmp_path: Path) -> None:
    cs = build_container_spec(_spec(tmp_path), PodmanConfig(user="1234:99"), "n", rootless=True)
    assert cs.userns_mode == "keep-id:uid=1234,gid=99"
    assert cs.create_kwargs()["userns_mode"] == {"nsmode": "keep-id", "value": "uid=1234,gid=99"}


def test_pids_limit_is_the_smaller_one(tmp_path: Path) -> None:
    cs = build_container_spec(_spec(tmp_path, pids=64), PodmanConfig(pids_limit=128), "n",
                              rootless=False)
    assert cs.pids_limit == 64


def test_root_user_refused() -> None:
    with pytest.raises(ValueError):
        parse_user("0:0")
    assert parse_user("1000") == (1000, 1000)


def test_prepare_spec_has_no_network_and_no_workspace(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("six\n")
    spec = TaskSpec("t-1", tmp_path, Entry(("python3", "x.py")),
                    Limits(cpus=1, memory_bytes=MiB), requirements=tmp_path / "requirements.txt")
    rootful = build_prepare_spec(spec, PodmanConfig(), "n", rootless=False, build_dir="/b",
                                 wheels_dir="/w")
    rootless = build_prepare_spec(spec, PodmanConfig(), "n", rootless=True, build_dir="/b",
                                  wheels_dir="/w")
    # The install is offline: wheels the worker fetched, nothing of the archive.
    assert rootful.network_mode == rootless.network_mode == "none"
    assert rootful.name == container_name("n", "t-1", "prepare")
    assert rootful.labels["hivemind.role"] == "prepare"
    assert rootful.command[-2:] == ("-r", "/opt/hivemind/wheels/requirements.txt")
    assert "--no-index" in rootful.command and "--only-binary=:all:" in rootful.command
    mounts = {m.target: m for m in rootful.mounts}
    assert "/workspace" not in mounts
    assert mounts["/opt/hivemind/wheels"].read_only is True
    assert mounts[PYCACHE_MOUNT].read_only is False and mounts[PYCACHE_MOUNT].source == "/b"
    assert rootful.read_only and rootful.cap_drop == ("ALL",)


def test_container_log_is_capped_at_the_output_cap(tmp_path: Path) -> None:
    spec = build_container_spec(_spec(tmp_path, output_bytes=3 * MiB), PodmanConfig(), "node-a",
                                rootless=True)
    assert spec.create_kwargs()["log_config"] == {"Type": "k8s-file", "Config": {"size": 3 * MiB}}


def test_rootful_map_comes_from_the_containers_range(tmp_path: Path) -> None:
    sub = tmp_path / "subuid"
    sub.write_text("hivemind:100000:65536\ncontainers:165536:1048576\n")
    assert rootful_userns(str(sub), str(sub)) == "map:165536:165536:65536"
    sub.write_text("hivemind:100000:65536\n")          # no range: Podman's auto, and the probe says why
    assert rootful_userns(str(sub), str(sub)) == "auto"


def _podman_py_body(cs: ContainerSpec) -> dict[str, object]:
    """What podman-py (the reference client) would POST for the same container."""
    from podman import PodmanClient
    from podman.api import prepare_body

    kw = cs.create_kwargs()
    render = PodmanClient(base_url="unix:///nonexistent.sock").containers._render_payload
    payload = render({"image": kw.pop("image"), "command": kw.pop("command"), **kw})
    return json.loads(prepare_body(payload))  # type: ignore[no-any-return]


@pytest.mark.parametrize("rootless", [False, True])
@pytest.mark.parametrize("variant", ["plain", "pydeps", "network", "gpu", "no-limits", "auto-userns"])
def test_libpod_body_is_what_podman_py_renders(tmp_path: Path, rootless: bool, variant: str) -> None:
    """The worker renders libpod's create body itself (podman-py cost the daemon ~10 MiB); it
    must send exactly what podman-py sends for the same keywords, limits and isolation included."""
    limits = {"gpu": {"gpu_devices": ("nvidia.com/gpu=0",)}, "network": {"network": True}}.get(variant, {})
    spec = _spec(tmp_path, **limits)
    cfg = PodmanConfig(network="outbound") if variant == "network" else PodmanConfig()
    cs = build_container_spec(spec, cfg, "node-a", rootless=rootless,
                              pydeps_dir="/state/pc/abc" if variant == "pydeps" else None)
    if variant == "no-limits":
        cs = dataclasses.replace(cs, pids_limit=None, memory_bytes=None, memswap_bytes=None,
                                 cpu_quota_us=None, cpu_period_us=None)
    if variant == "auto-userns":
        cs = dataclasses.replace(cs, userns_mode="auto")
    assert cs.libpod_body() == _podman_py_body(cs)


def test_prepare_body_is_what_podman_py_renders(tmp_path: Path) -> None:
    for rootless in (False, True):
        cs = build_prepare_spec(_spec(tmp_path), PodmanConfig(), "n", rootless=rootless,
                                build_dir="/b", wheels_dir="/w")
        assert cs.libpod_body() == _podman_py_body(cs)


def test_libpod_body_keeps_the_isolation(tmp_path: Path) -> None:
    body = build_container_spec(_spec(tmp_path), PodmanConfig(), "node-a", rootless=False).libpod_body()
    assert body["netns"] == {"nsmode": "none"} and body["read_only_filesystem"] is True
    assert body["cap_drop"] == ["ALL"] and body["no_new_privileges"] is True
    assert body["userns"] == {"nsmode": "private"} and body["idmappings"]["UIDMap"][0]["host_id"] > 0
    assert body["user"] != "0:0" and body["init"] is True
