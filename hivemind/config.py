"""Declarative worker configuration: dataclasses, their documented defaults, and validation.

Every key has a default and a one-line doc (`metadata["doc"]`); `hivemind-worker check-config
--defaults` prints them all. Validation collects every problem before failing, so an operator
fixes a file in one pass. Secrets are never values here, only references to files.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hivemind.errors import ConfigError
from hivemind.secrets import resolve_secret_path

DEFAULT_CONFIG_PATH = "/etc/hivemind/worker.yaml"


def opt(default: Any, doc: str, *, min: float | None = None, max: float | None = None,
        choices: tuple[str, ...] | None = None, secret_file: bool = False, path: bool = False) -> Any:
    """A config field with its doc and its allowed values (checked by `_check_value`)."""
    meta = {"doc": doc, "min": min, "max": max, "choices": choices,
            "secret_file": secret_file, "path": path}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class NodeConfig:
    id: str = opt("", "Node id sent to the pool; empty means the pool username (the pool keys trust by it).")
    location: str = opt("", "Free-form location string sent at registration; no geolocation lookups are made.")
    state_dir: str = opt("/var/lib/hivemind-worker", "Where tasks, results and caches persist.", path=True)


@dataclass(frozen=True)
class PoolTLSConfig:
    enabled: bool = opt(False, "Use TLS to reach the pool.")
    ca_file: str = opt("", "CA bundle that signs the pool's certificate; empty means the system CAs.", secret_file=False, path=True)
    server_name: str = opt("", "Name expected in the pool's certificate; empty means the host of pool.address.")


@dataclass(frozen=True)
class PoolConfig:
    address: str = opt("127.0.0.1:50051", "host:port of the node pool's gRPC endpoint.")
    protocol: str = opt("2026-04", "Protocol generation the pool speaks: 2026-04 (RefreshToken, TaskUsage, chunked results) or 2025-10 (StoreLogs, ReturnTaskResult); checked against the pool at start.",
                        choices=("2026-04", "2025-10"))
    username: str = opt("worker", "Pool account the worker logs in as.")
    password_file: str = opt("", "File (or credential name) holding the pool password.", secret_file=True)
    heartbeat_interval_s: float = opt(5.0, "Seconds between ReportStatus calls (the pool needs <= 10).", min=0.2, max=10)
    register_interval_s: float = opt(300.0, "Seconds between periodic re-registrations.", min=5, max=3600)
    call_timeout_s: float = opt(10.0, "Deadline of one call to the pool.", min=0.5, max=300)
    token_refresh_margin_s: float = opt(600.0, "Renew the login token this long before it expires.", min=10, max=3000)
    output_flush_interval_s: float = opt(1.0, "Seconds between batched TaskOutputUpload calls.", min=0.05, max=30)
    output_batch_max_kb: int = opt(64, "Largest output batch sent in one TaskOutputUpload.", min=1, max=4096)
    result_min_delay_s: float = opt(1.0, "Never upload a result sooner than this after accepting (the pool's late RUNNING overwrites it).", min=0, max=60)
    max_result_message_mb: int = opt(256, "Largest result sent in one message (TaskResultUpload, or 2025-10's ReturnTaskResult) when the pool has no chunked upload.", min=1, max=1024)
    tls: PoolTLSConfig = field(default_factory=PoolTLSConfig, metadata={"doc": "TLS to the pool."})


@dataclass(frozen=True)
class ServerAuthConfig:
    mode: str = opt("auto", "auto picks the strongest mode the files allow: mtls > token > legacy.",
                    choices=("auto", "mtls", "token", "legacy"))
    cert_file: str = opt("", "Worker's TLS certificate (PEM) for mtls and token modes.", secret_file=True)
    key_file: str = opt("", "Worker's TLS private key (PEM).", secret_file=True)
    client_ca_file: str = opt("", "CA that signs the pool's client certificate (mtls).", secret_file=True)
    required_client_name: str = opt("", "mtls: the client certificate must carry this CN or SAN.")
    token_file: str = opt("", "token mode: shared bearer token the pool sends as metadata.", secret_file=True)
    legacy_allowed_peers: list[str] = opt([], "legacy mode: IP addresses allowed to call (the pool's).")


@dataclass(frozen=True)
class ServerConfig:
    listen_host: str = opt("0.0.0.0", "Address the worker's gRPC service binds.")
    port: int = opt(50052, "Port of the worker's gRPC service; 0 picks a free one.", min=0, max=65535)
    advertise_host: str = opt("", "Host the pool dials back; empty means this machine's primary address (never 127.0.0.1).")
    advertise_port: int = opt(0, "Port advertised to the pool; 0 means the bound port.", min=0, max=65535)
    max_message_mb: int = opt(1024, "Largest gRPC message accepted (task archives ride in one); never more than archive.max_archive_mb plus framing.", min=1, max=2047)
    max_inflight_uploads: int = opt(2, "ExecuteTask calls whose archives may be in memory at once; more get RESOURCE_EXHAUSTED at once (memory budget: this x the message limit).", min=1, max=64)
    max_failed_auth_per_minute: int = opt(300, "Failed authentications per minute from all addresses together before callers that never authenticated are refused for a minute (beside 10 per address).", min=1, max=1_000_000)
    auth: ServerAuthConfig = field(default_factory=ServerAuthConfig, metadata={"doc": "Who may call the worker."})


@dataclass(frozen=True)
class PodmanConfig:
    mode: str = opt("auto", "auto: rootless where it enforces memory, CPU and pids limits (cgroup v2 with delegation), else rootful when the worker is root; or force rootless / rootful.",
                    choices=("auto", "rootless", "rootful"))
    socket: str = opt("", "Podman API URI (unix:///...); empty finds or starts the service for the mode.")
    socket_wait_s: float = opt(60.0, "With socket set: how long a socket that refuses connections (Podman still starting) is waited for before falling back.", min=0, max=3600)
    image: str = opt("localhost/hivemind-task:latest", "Image tasks run in (built by images/build).")
    network: str = opt("none", "none, or outbound to let tasks open outbound connections.", choices=("none", "outbound"))
    user: str = opt("1000:1000", "uid:gid the task runs as inside the container (non-root).")
    tmpfs_mb: int = opt(256, "Size of the task's /tmp tmpfs.", min=1, max=65536)
    pids_limit: int = opt(256, "Most processes a task may have.", min=8, max=65536)
    nofile: int = opt(1024, "nofile ulimit (must not exceed the host's hard limit).", min=64, max=1048576)
    nproc: int = opt(1024, "nproc ulimit (must not exceed the host's hard limit).", min=16, max=1048576)
    rootless_user: str = opt("hivemind", "When the worker runs as root in rootless mode, the user whose Podman runs tasks.")


@dataclass(frozen=True)
class VenvConfig:
    cache_dir: str = opt("", "Where venvs are cached by requirements hash; empty means STATE_DIR/venvs.", path=True)
    python: str = opt("", "Interpreter for task venvs; empty means /usr/bin/python3 if present, else the worker's base interpreter.")
    task_user: str = opt("nobody", "Unprivileged user that builds venvs (and runs tasks when uid_range_size is 0) when the worker is root.")
    uid_range_start: int = opt(2_147_000_000, "First uid (and gid) of the range each running task gets its own uid from, when the worker is root; no account, group or /etc/subuid range may use it.", min=1000, max=4_294_000_000)
    uid_range_size: int = opt(1000, "How many uids the range has (at least the slots); 0 runs every task as task_user (weaker).", min=0, max=1_000_000)
    nofile: int = opt(1024, "RLIMIT_NOFILE of a task.", min=64, max=1048576)
    nproc: int = opt(512, "RLIMIT_NPROC of a task (per user).", min=16, max=1048576)
    # NixOS has no /usr/bin: its module points this at the system profile, where bash lives.
    task_path: str = opt("/usr/bin:/bin", "PATH of a task after its venv's bin directory.")


@dataclass(frozen=True)
class RequirementsConfig:
    index_url: str = opt("", "Package index requirements.txt is fetched from (wheels only); empty means the index pip on this host uses by default (pip.conf, PIP_INDEX_URL), else PyPI. Tasks can never choose one.")
    proxy: str = opt("", "HTTP(S) proxy for fetching wheels (http://host:port); empty means none.")


@dataclass(frozen=True)
class ExecutorConfig:
    kind: str = opt("auto", "auto (Podman if usable, else venv), podman or venv.", choices=("auto", "podman", "venv"))
    slots: int = opt(0, "Tasks run at once; 0 means one per logical CPU.", min=0, max=1024)
    task_timeout_s: float = opt(3600.0, "Wall-clock limit of one task (a manifest may lower it).", min=1, max=7 * 86400)
    prepare_timeout_s: float = opt(600.0, "Limit of the requirements.txt install step.", min=1, max=86400)
    stop_grace_s: float = opt(10.0, "Seconds between SIGTERM and SIGKILL when stopping a task.", min=0, max=600)
    max_output_mb: int = opt(64, "Output kept per task (output.log, the container log); past it a marker says the output was truncated.", min=1, max=65536)
    disk_quota_mb: int = opt(10240, "Most a task may write into its workspace (a loop-mounted filesystem as root, else polled); past it the task stops with reason disk_quota. 0: no quota.", min=0, max=16 * 1024 * 1024)
    disk_reserve_mb: int = opt(2048, "Free space kept for the host: a task's quota is lowered to what is free beyond this.", min=0, max=16 * 1024 * 1024)
    podman: PodmanConfig = field(default_factory=PodmanConfig, metadata={"doc": "Podman executor."})
    venv: VenvConfig = field(default_factory=VenvConfig, metadata={"doc": "venv fallback executor."})
    requirements: RequirementsConfig = field(default_factory=RequirementsConfig, metadata={"doc": "How requirements.txt is fetched (both executors)."})


@dataclass(frozen=True)
class ResourcesConfig:
    reserve_cpus: float = opt(0.5, "CPUs kept for the system; never given to tasks.", min=0, max=1024)
    reserve_memory_gb: float = opt(1.0, "Memory kept for the system.", min=0, max=65536)
    cpu_score_per_core: float = opt(0.0, "Score units one CPU core is worth; 0 means measured by the CPU benchmark.", min=0, max=1e9)
    default_memory_gb: int = opt(1, "Memory given to a task that requests 0 GiB.", min=1, max=65536)
    gpu: str = opt("auto", "auto detects NVIDIA GPUs, none disables them.", choices=("auto", "none"))


@dataclass(frozen=True)
class ArchiveConfig:
    max_archive_mb: int = opt(512, "Largest task archive accepted.", min=1, max=2047)
    max_members: int = opt(10000, "Most entries in a task archive.", min=1, max=10_000_000)
    max_uncompressed_mb: int = opt(2048, "Largest total uncompressed size of a task archive.", min=1, max=1_000_000)
    max_ratio: float = opt(200.0, "Largest compression ratio of any member (zip bombs).", min=1, max=100000)
    max_result_mb: int = opt(1024, "Largest result archive; files past it are left out and the cap is reported.", min=1, max=1_000_000)


@dataclass(frozen=True)
class StatusConfig:
    enabled: bool = opt(True, "Serve the status API and monitor page.")
    listen_host: str = opt("127.0.0.1", "Address of the status API; non-loopback requires token_file.")
    port: int = opt(8080, "Port of the status API; 0 picks a free one.", min=0, max=65535)
    token_file: str = opt("", "Bearer token for write endpoints and any non-loopback bind.", secret_file=True)


@dataclass(frozen=True)
class ShutdownConfig:
    policy: str = opt("drain", "On SIGTERM: drain (wait for tasks) or leave (tasks keep running, reattached on start).",
                      choices=("drain", "leave"))
    drain_timeout_s: float = opt(60.0, "Longest wait for running tasks when draining.", min=0, max=86400)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = opt("info", "Lowest level logged.", choices=("debug", "info", "warning", "error"))
    target: str = opt("auto", "auto (journal under systemd, else stderr), journal or stderr.",
                      choices=("auto", "journal", "stderr"))


@dataclass(frozen=True)
class MetricsConfig:
    backend: str = opt("auto", "auto (native if loadable), native or psutil.", choices=("auto", "native", "psutil"))
    native_library: str = opt("", "Path of libhivemindmetrics.so; empty searches next to the package.", path=True)


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig, metadata={"doc": "This node."})
    pool: PoolConfig = field(default_factory=PoolConfig, metadata={"doc": "The node pool."})
    server: ServerConfig = field(default_factory=ServerConfig, metadata={"doc": "The worker's gRPC service."})
    executor: ExecutorConfig = field(default_factory=ExecutorConfig, metadata={"doc": "How tasks run."})
    resources: ResourcesConfig = field(default_factory=ResourcesConfig, metadata={"doc": "What tasks may use."})
    archive: ArchiveConfig = field(default_factory=ArchiveConfig, metadata={"doc": "Archive rules."})
    status: StatusConfig = field(default_factory=StatusConfig, metadata={"doc": "Status API."})
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig, metadata={"doc": "Shutdown policy."})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"doc": "Logging."})
    metrics: MetricsConfig = field(default_factory=MetricsConfig, metadata={"doc": "Metrics backend."})

    @property
    def state_dir(self) -> Path:
        return Path(self.node.state_dir)

    @property
    def node_id(self) -> str:
        return self.node.id or self.pool.username


def _type_name(tp: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def _check_value(key: str, value: Any, tp: Any, meta: Mapping[str, Any], problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{key}: got {value!r}; expected a list of {_type_name(item_tp)}s")
            return None
        return [_check_value(f"{key}[{i}]", v, item_tp, {}, problems) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: got {value!r}; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: got {value!r}; expected an integer")
            return value
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: got {value!r}; expected a number")
            return value
        shown = value  # echo what the operator wrote (60, not 60.0)
        value = float(value)
    elif tp is str and not isinstance(value, str):
        problems.append(f"{key}: got {value!r}; expected a string")
        return value
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    shown = locals().get("shown", value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and (
            (lo is not None and value < lo) or (hi is not None and value > hi)):
        problems.append(f"{key}: {shown!r} is out of range; allowed {lo:g} to {hi:g}")
    if choices and value not in choices:
        problems.append(f"{key}: {value!r} is not allowed; choose one of {', '.join(choices)}")
    return value


def _build(cls: type[Any], data: Any, prefix: str, problems: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix or 'top level'}: got {data!r}; expected a mapping of keys")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else str(key)
            known = ", ".join(sorted(fields))
            problems.append(f"{where}: unknown key; known keys here: {known}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(typing.cast(type[Any], tp), data[name], key, problems)
        else:
            kwargs[name] = _check_value(key, data[name], tp, f.metadata, problems)
    if any(p.startswith(prefix) for p in problems) and prefix:
        # Keep building siblings so every problem is reported, but don't construct from bad values.
        good = {k: v for k, v in kwargs.items() if not _has_problem(f"{prefix}.{k}", problems)}
        return cls(**good)
    return cls(**kwargs)


def _has_problem(key: str, problems: list[str]) -> bool:
    return any(p.startswith(key + ":") or p.startswith(key + "[") for p in problems)


def _cross_checks(cfg: Config, environ: Mapping[str, str], problems: list[str]) -> None:
    """Rules that involve more than one key, and secret files that must be readable."""
    for key, ref in _secret_refs(cfg):
        if not ref:
            continue
        path = resolve_secret_path(ref, environ)
        if not path.is_file():
            problems.append(f"{key}: secret file {str(path)!r} does not exist; create it or fix the path")
        elif not os.access(path, os.R_OK):
            problems.append(f"{key}: secret file {str(path)!r} is not readable; fix its owner or mode")
    if cfg.server.advertise_host == "127.0.0.1":
        problems.append("server.advertise_host: '127.0.0.1' is skipped by the pool; use another loopback address such as 127.0.0.2")
    ven = cfg.executor.venv
    if ven.uid_range_size and cfg.executor.slots > ven.uid_range_size:
        problems.append(f"executor.venv.uid_range_size: {ven.uid_range_size} is less than "
                        f"executor.slots ({cfg.executor.slots}); each running task needs a uid")
    req = cfg.executor.requirements
    if req.index_url and not req.index_url.startswith(("http://", "https://", "file:///")):
        problems.append(f"executor.requirements.index_url: {req.index_url!r} must be an http://, https:// or file:/// URL")
    if req.proxy and not req.proxy.startswith(("http://", "https://")):
        problems.append(f"executor.requirements.proxy: {req.proxy!r} must be an http:// or https:// URL")
    if ":" not in cfg.pool.address:
        problems.append(f"pool.address: {cfg.pool.address!r} needs host:port")
    if (cfg.status.enabled and not _is_loopback(cfg.status.listen_host) and not cfg.status.token_file):
        problems.append(f"status.listen_host: {cfg.status.listen_host!r} is not loopback; set status.token_file too")


def check_daemon_config(cfg: Config) -> None:
    """What `run` needs beyond a well-formed file (check-config runs it too): a pool password
    and a way to authenticate the pool's calls. Raises ConfigError listing the problems."""
    problems: list[str] = []
    if not cfg.pool.password_file:
        problems.append("pool.password_file: not set; name the file (or credential) holding the pool password")
    # The gRPC auth rules live with the server; this runs the same ones before anything starts.
    from hivemind.server.auth import choose_mode, parse_networks

    for check in (lambda: choose_mode(cfg.server.auth),
                  lambda: parse_networks(cfg.server.auth.legacy_allowed_peers)):
        try:
            check()
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _secret_refs(cfg: Config) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            val = getattr(obj, f.name)
            key = f"{prefix}.{f.name}" if prefix else f.name
            if dataclasses.is_dataclass(val):
                walk(val, key)
            elif f.metadata.get("secret_file"):
                out.append((key, str(val)))

    walk(cfg, "")
    return out


def parse_config(data: Any, environ: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed YAML document; raises ConfigError listing every problem."""
    problems: list[str] = []
    cfg = _build(Config, data, "", problems)
    if not problems:
        _cross_checks(cfg, os.environ if environ is None else environ, problems)
    if problems:
        raise ConfigError(problems)
    return typing.cast(Config, cfg)


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"config file {str(p)!r} does not exist; pass --config PATH or create it"]) from None
    except (PermissionError, IsADirectoryError, UnicodeDecodeError) as exc:
        raise ConfigError([f"config file {str(p)!r} can't be read: {type(exc).__name__}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"config file {str(p)!r} is not valid YAML{where}: {getattr(exc, 'problem', exc)}"]) from None
    return parse_config(data, environ)


def describe_defaults() -> str:
    """Every key, its default and its doc, as commented YAML."""
    lines: list[str] = []

    def walk(cls: type[Any], indent: int) -> None:
        inst = cls()
        for f in dataclasses.fields(cls):
            pad = "  " * indent
            doc = f.metadata.get("doc", "")
            val = getattr(inst, f.name)
            if dataclasses.is_dataclass(val):
                lines.append(f"{pad}{f.name}:  # {doc}")
                walk(type(val), indent + 1)
            else:
                choices = f.metadata.get("choices")
                extra = f" [{'|'.join(choices)}]" if choices else ""
                lines.append(f"{pad}{f.name}: {yaml.safe_dump(val, default_flow_style=True).strip().removesuffix('...').strip()}  # {doc}{extra}")

    walk(Config, 0)
    return "\n".join(lines) + "\n"


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


__all__ = ["Config", "ConfigError", "DEFAULT_CONFIG_PATH", "check_daemon_config", "describe_defaults", "load_config",
           "parse_config", "to_dict"]
