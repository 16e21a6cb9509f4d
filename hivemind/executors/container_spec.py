"""Pure translation of a task (TaskSpec + PodmanConfig) into the container it runs in.

No Podman here: `build_container_spec` returns a typed `ContainerSpec`; `libpod_body` renders it
as libpod's create body, which the adapter sends. `create_kwargs` is the same container as
podman-py keywords (avoiding the ones podman-py silently drops: `nano_cpus`,
`security_opt=["no-new-privileges"]`, `tmpfs`): the reference the tests check the body against.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hivemind.config import PodmanConfig
from hivemind.executors.base import TaskSpec

WORKSPACE = "/workspace"
PYCACHE_MOUNT = "/opt/hivemind/pydeps"
CPU_PERIOD_US = 100_000
TMP = "/tmp"  # noqa: S108 - the container's own private tmpfs, not the host's /tmp

LABEL_MANAGED = "hivemind.managed"
LABEL_NODE = "hivemind.node_id"
LABEL_TASK = "hivemind.task_id"
LABEL_ROLE = "hivemind.role"          # "task" or "prepare"
# Rootful tasks get a user namespace mapped onto a fixed slice of the `containers` subordinate
# range (scripts/setup-podman adds it), not userns=auto: with auto, Podman 4.3's id allocation
# (userns.lock, then the layer lock) can deadlock against conmon's cleanup of a container that
# is exiting (which holds the store lock, then wants the layer lock), and every later Podman call
# on the machine hangs. A fixed map takes no allocation lock; the task's uid is still no host
# account's. Concurrent tasks share the slice, but never a PID, mount, IPC or network namespace.
ROOTFUL_MAP_SIZE = 65536
SUBORDINATE_OWNER = "containers"


def _subordinate_start(path: str, owner: str) -> int | None:
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                name, _, rest = line.strip().partition(":")
                start, _, count = rest.partition(":")
                if name == owner and start.isdigit() and count.isdigit() and int(count) >= ROOTFUL_MAP_SIZE:
                    return int(start)
    except OSError:
        return None
    return None


def rootful_userns(subuid: str = "/etc/subuid", subgid: str = "/etc/subgid") -> str:
    """`map:UID_START:GID_START:SIZE` from the `containers` ranges, or `auto` where the host has
    none (Podman then refuses the container, and the probe's message says to add the range)."""
    uid = _subordinate_start(subuid, SUBORDINATE_OWNER)
    gid = _subordinate_start(subgid, SUBORDINATE_OWNER)
    if uid is None or gid is None:
        return "auto"
    return f"map:{uid}:{gid}:{ROOTFUL_MAP_SIZE}"


ROOTFUL_USERNS = rootful_userns()


def container_name(node_id: str, task_id: str, role: str = "task") -> str:
    """Deterministic, so a restarted daemon finds its containers by name as well as by label."""
    suffix = "" if role == "task" else f"-{role}"
    return f"hivemind-{node_id}-{task_id}{suffix}"


def parse_user(user: str) -> tuple[int, int]:
    """'uid:gid' (or 'uid') as numbers; tasks never run as root, so 0 is refused."""
    uid_s, _, gid_s = user.partition(":")
    uid, gid = int(uid_s), int(gid_s or uid_s)
    if uid == 0 or gid == 0:
        raise ValueError(f"podman.user {user!r}: tasks must not run as root")
    return uid, gid


@dataclass(frozen=True)
class Mount:
    type: str                          # "bind" | "tmpfs"
    target: str
    source: str = ""
    read_only: bool = False
    size_bytes: int | None = None      # tmpfs only
    mode: str | None = None            # tmpfs only, octal string
    chown: bool = False                # bind only: Podman chowns the source to the container's
                                       # user as mapped on the host (the `U` option)


DEFAULT_LOG_BYTES = 16 * 1024 * 1024   # the container log's cap when the task has no output cap


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    command: tuple[str, ...]
    user: str
    workdir: str
    env: Mapping[str, str]
    labels: Mapping[str, str]
    mounts: tuple[Mount, ...]
    network_mode: str                  # "none" | "bridge" | "host" | "slirp4netns" | "pasta"
    read_only: bool
    cap_drop: tuple[str, ...]
    no_new_privileges: bool
    pids_limit: int | None
    memory_bytes: int | None
    memswap_bytes: int | None
    cpu_quota_us: int | None
    cpu_period_us: int | None
    nofile: int
    nproc: int
    devices: tuple[str, ...] = ()
    # rootless: keep-id:uid=..,gid=.. so the workspace stays the service user's; rootful:
    # map:UID:GID:SIZE, a slice of the `containers` subordinate range (see ROOTFUL_USERNS), so
    # the task's uid is no host account's (uid 1000 is a person on most machines).
    userns_mode: str | None = None
    # conmon truncates its k8s-file log when it reaches this, so the log takes at most this much
    # disk (the worker keeps its own capped copy, output.log, from attach).
    log_size_bytes: int = DEFAULT_LOG_BYTES

    def libpod_body(self) -> dict[str, Any]:
        """The body of libpod's POST /containers/create (a SpecGenerator) for this container.

        Rendered here rather than by podman-py: importing podman-py (with requests and urllib3)
        costs the daemon ~10 MiB of resident memory for the one call it would serve.
        tests/test_container_spec.py checks that this is exactly what podman-py renders from
        `create_kwargs()` (with empty and None values dropped, as podman-py sends it)."""
        mounts: list[dict[str, Any]] = []
        for m in self.mounts:
            if m.type == "tmpfs":
                opts = [*([f"size={m.size_bytes}"] if m.size_bytes is not None else []),
                        *([f"mode={m.mode}"] if m.mode is not None else [])]
                mounts.append({"destination": m.target, "options": opts, "source": "tmpfs",
                               "type": "tmpfs"})
            else:
                opts = [*(["ro"] if m.read_only else []), *(["U"] if m.chown else [])]
                mounts.append({"destination": m.target, "options": opts, "source": m.source,
                               "type": "bind"})
        limits: dict[str, Any] = {}
        if self.pids_limit is not None:
            limits["pids"] = {"limit": self.pids_limit}
        if self.cpu_quota_us is not None and self.cpu_period_us is not None:
            limits["cpu"] = {"period": self.cpu_period_us, "quota": self.cpu_quota_us}
        memory = {k: v for k, v in (("limit", self.memory_bytes), ("swap", self.memswap_bytes))
                  if v is not None}
        if memory:
            limits["memory"] = memory
        body: dict[str, Any] = {
            "name": self.name, "image": self.image, "command": list(self.command),
            "user": self.user, "work_dir": self.workdir, "env": dict(self.env),
            "labels": dict(self.labels), "mounts": mounts, "netns": {"nsmode": self.network_mode},
            "read_only_filesystem": self.read_only, "cap_drop": list(self.cap_drop),
            "no_new_privileges": self.no_new_privileges,
            "r_limits": [{"type": "nofile", "hard": self.nofile, "soft": self.nofile},
                         {"type": "nproc", "hard": self.nproc, "soft": self.nproc}],
            "log_configuration": {"driver": "k8s-file", "size": self.log_size_bytes},
            "init": True,
            "resource_limits": limits,
            "devices": [{"path": d} for d in self.devices],
        }
        if self.userns_mode:
            mode, _, value = self.userns_mode.partition(":")
            if mode == "map":
                uid, gid, size = (int(v) for v in value.split(":"))
                body["userns"] = {"nsmode": "private"}
                body["idmappings"] = {"UIDMap": [{"container_id": 0, "host_id": uid, "size": size}],
                                      "GIDMap": [{"container_id": 0, "host_id": gid, "size": size}]}
            else:
                body["userns"] = {"nsmode": mode, "value": value} if value else {"nsmode": mode}
                if mode == "auto":
                    body["idmappings"] = {"AutoUserNs": True}
        return _drop_empty(body)

    def create_kwargs(self) -> dict[str, Any]:
        """The same container as keyword arguments of podman-py's `containers.create` (5.x):
        the reference `libpod_body()` is checked against."""
        mounts: list[dict[str, Any]] = []
        for m in self.mounts:
            if m.type == "tmpfs":
                d: dict[str, Any] = {"type": "tmpfs", "target": m.target, "source": "tmpfs"}
                if m.size_bytes is not None:
                    d["size"] = str(m.size_bytes)
                if m.mode is not None:
                    d["mode"] = m.mode
            else:
                d = {"type": "bind", "target": m.target, "source": m.source,
                     "read_only": m.read_only}
                if m.chown:
                    d["chown"] = True    # podman-py turns it into the `U` option
            mounts.append(d)
        kw: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "command": list(self.command),
            "user": self.user,
            "working_dir": self.workdir,
            "environment": dict(self.env),
            "labels": dict(self.labels),
            "mounts": mounts,
            "network_mode": self.network_mode,
            "read_only": self.read_only,
            "cap_drop": list(self.cap_drop),
            "no_new_privileges": self.no_new_privileges,
            "ulimits": [{"Name": "nofile", "Soft": self.nofile, "Hard": self.nofile},
                        {"Name": "nproc", "Soft": self.nproc, "Hard": self.nproc}],
            # k8s-file, not the default journald: journald may not run here, and logs --follow
            # must work for recovery after a daemon restart.
            "log_config": {"Type": "k8s-file", "Config": {"size": self.log_size_bytes}},
            # catatonit as PID 1: forwards SIGTERM (a bare PID 1 ignores it, so every stop would
            # wait the whole grace period) and reaps orphans.
            "init": True,
        }
        if self.pids_limit is not None:
            kw["pids_limit"] = self.pids_limit
        if self.memory_bytes is not None:
            kw["mem_limit"] = self.memory_bytes
        if self.memswap_bytes is not None:
            kw["memswap_limit"] = self.memswap_bytes
        if self.cpu_quota_us is not None and self.cpu_period_us is not None:
            kw["cpu_quota"] = self.cpu_quota_us
            kw["cpu_period"] = self.cpu_period_us
        if self.devices:
            kw["devices"] = list(self.devices)
        if self.userns_mode:
            # The API wants the options apart ({"nsmode": "keep-id", "value": "uid=..."});
            # podman-py passes a plain string through whole, which the service rejects.
            mode, _, value = self.userns_mode.partition(":")
            kw["userns_mode"] = {"nsmode": mode, "value": value} if value else {"nsmode": mode}
            if mode == "map":
                uid, gid, size = (int(v) for v in value.split(":"))
                kw["userns_mode"] = {"nsmode": "private"}
                kw["idmappings"] = {"UIDMap": [{"container_id": 0, "host_id": uid, "size": size}],
                                    "GIDMap": [{"container_id": 0, "host_id": gid, "size": size}]}
            if mode == "auto":
                # The service does not derive the mapping from the mode (the CLI does): without
                # AutoUserNs the container silently keeps the host's uids.
                kw["idmappings"] = {"AutoUserNs": True}
        return kw


def _drop_empty(mapping: Mapping[str, Any], nested: bool = False) -> dict[str, Any]:
    """None and empty values left out, as podman-py's prepare_body does: in mappings at every
    depth (the service then applies its defaults instead of a zero value), not inside lists
    (a mount keeps its empty `options`)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            value = _drop_empty(value, nested=True)
        elif isinstance(value, list):
            value = [v for v in value if v is not None]
        if value is None or value == [] or value == {} or (value == "" and not nested):
            continue
        out[key] = value
    return out


def _common_env(spec_env: Mapping[str, str]) -> dict[str, str]:
    env = {"HOME": TMP, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", "LANG": "C.UTF-8"}
    env.update(spec_env)
    return env


def build_container_spec(spec: TaskSpec, cfg: PodmanConfig, node_id: str, *,
                         rootless: bool, pydeps_dir: str | None = None) -> ContainerSpec:
    """The run container of a task. `pydeps_dir` is the host dir of its installed requirements."""
    uid, gid = parse_user(cfg.user)
    lim = spec.limits
    env = _common_env(spec.env)
    mounts = [Mount("bind", WORKSPACE, str(spec.workspace), chown=not rootless),
              Mount("tmpfs", TMP, size_bytes=min(lim.tmpfs_bytes, cfg.tmpfs_mb * 1024 * 1024),
                    mode="1777")]
    if pydeps_dir is not None:
        mounts.append(Mount("bind", PYCACHE_MOUNT, pydeps_dir, read_only=True))
        env["PYTHONPATH"] = ":".join(p for p in (PYCACHE_MOUNT, env.get("PYTHONPATH", "")) if p)
    network = "none"
    if lim.network and cfg.network == "outbound":
        network = "slirp4netns" if rootless else "bridge"
    labels = {k: v for k, v in spec.labels.items() if not k.startswith("hivemind.")}
    labels.update({LABEL_MANAGED: "1", LABEL_NODE: node_id, LABEL_TASK: spec.task_id,
                   LABEL_ROLE: "task"})
    return ContainerSpec(
        name=container_name(node_id, spec.task_id),
        image=cfg.image,
        command=tuple(spec.entry.argv),
        user=f"{uid}:{gid}",
        workdir=WORKSPACE,
        env=env,
        labels=labels,
        mounts=tuple(mounts),
        network_mode=network,
        read_only=True,
        cap_drop=("ALL",),
        no_new_privileges=True,
        pids_limit=min(lim.pids, cfg.pids_limit),
        memory_bytes=lim.memory_bytes,
        memswap_bytes=lim.memory_bytes,     # equal: no swap on top of the memory limit
        cpu_quota_us=max(1000, round(lim.cpus * CPU_PERIOD_US)),
        cpu_period_us=CPU_PERIOD_US,
        nofile=cfg.nofile,
        nproc=cfg.nproc,
        devices=tuple(lim.gpu_devices),
        userns_mode=f"keep-id:uid={uid},gid={gid}" if rootless else ROOTFUL_USERNS,
        log_size_bytes=lim.output_bytes if lim.output_bytes > 0 else DEFAULT_LOG_BYTES,
    )


WHEELS_MOUNT = "/opt/hivemind/wheels"


def build_prepare_spec(spec: TaskSpec, cfg: PodmanConfig, node_id: str, *, rootless: bool,
                       build_dir: str, wheels_dir: str) -> ContainerSpec:
    """The offline install container: no network, nothing of the workspace; pip installs the
    wheels the worker fetched (`wheels_dir`, read-only, with the validated requirements.txt)
    into `build_dir`, mounted rw."""
    uid, gid = parse_user(cfg.user)
    req = f"{WHEELS_MOUNT}/requirements.txt"
    command = ("python3", "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
               "--progress-bar", "off", "--isolated", "--no-index", "--only-binary=:all:",
               "--no-cache-dir", "--no-warn-script-location", "--find-links", WHEELS_MOUNT,
               "--target", PYCACHE_MOUNT, "-r", req)
    base = build_container_spec(spec, cfg, node_id, rootless=rootless)
    labels = dict(base.labels)
    labels[LABEL_ROLE] = "prepare"
    mounts = [Mount("tmpfs", TMP, size_bytes=1024 * 1024 * 1024, mode="1777"),
              Mount("bind", PYCACHE_MOUNT, build_dir, chown=not rootless),
              Mount("bind", WHEELS_MOUNT, wheels_dir, read_only=True)]
    return ContainerSpec(
        name=container_name(node_id, spec.task_id, "prepare"),
        image=cfg.image, command=command, user=f"{uid}:{gid}", workdir=TMP,
        env=_common_env({}), labels=labels, mounts=tuple(mounts),
        network_mode="none",
        read_only=True, cap_drop=("ALL",), no_new_privileges=True,
        pids_limit=base.pids_limit, memory_bytes=None, memswap_bytes=None,
        cpu_quota_us=None, cpu_period_us=None, nofile=cfg.nofile, nproc=cfg.nproc,
        userns_mode=base.userns_mode,
    )
