"""The composition root: builds every part of the daemon from the config, wires them, runs the
main loop, and shuts down. No other module reaches into globals; everything is passed in here.

Order matters for systemd: READY=1 is sent only after signal handlers are installed and the gRPC
and HTTP listeners exist. SIGTERM/SIGINT stop (draining or leaving tasks, by config), SIGHUP
reloads the config (validated first; an invalid one is refused and the old one keeps running).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
import time
from types import FrameType
from typing import Any

from hivemind import __version__
from hivemind.config import Config, load_config
from hivemind.errors import ConfigError, ExecutorUnavailable, HivemindError, StartupError
from hivemind.executors.base import Executor, ExecutorStatus, OutputLine
from hivemind.executors.select import select_executor
from hivemind.heap import release_free_heap
from hivemind.logging_setup import log_task_output, register_secret, setup_logging
from hivemind.notify import Heartbeat, Notifier, Watchdog
from hivemind.pool.client import NodeInfo, NodeStatus
from hivemind.pool.select import open_pool_client
from hivemind.pool.session import PoolSession, TaskUsageReport
from hivemind.secrets import Secret, read_secret
from hivemind.server.grpc_server import RunningServer, start_worker_server
from hivemind.status.prom import WorkerMetrics
from hivemind.tasks.state import Lifecycle
from hivemind.tasks.store import TaskStore
from hivemind.tasks.usage import node_percentages
from hivemind.worker import GIB, Capacity, Worker
from hivemind.worker_view import ViewState, WarningLog, WorkerView

# How often the main loop refreshes the status line and the machine metrics. Signals and task
# state changes wake it at once, so the tick only paces the metrics: every second while tasks
# run, every few seconds when idle (that refresh was most of the idle daemon's CPU time). The
# idle tick stays well inside the loop heartbeat's 15 s, which the watchdog checks.
LOOP_TICK_S = 1.0
IDLE_TICK_S = 5.0
EXIT_NO_EXECUTOR = 3
EXIT_STARTUP = 2      # the environment keeps the worker from starting (as config errors)


class _Flag(threading.Event):
    """An Event whose set() also wakes the main loop, wherever it is set from."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake = wake

    def set(self) -> None:
        super().set()
        self._wake.set()


class Signals:
    def __init__(self) -> None:
        self.wake = threading.Event()
        self.stop: threading.Event = _Flag(self.wake)
        self.reload: threading.Event = _Flag(self.wake)
        self.hang: threading.Event = _Flag(self.wake)   # debug: see _install_signals


def advertised_host(cfg: Config) -> str:
    """The address the pool dials back: configured, else the bound address, else the first IPv4
    address of an interface that is up. Never 127.0.0.1 (the pool skips it)."""
    if cfg.server.advertise_host:
        return cfg.server.advertise_host
    if cfg.server.listen_host not in ("0.0.0.0", "::", "", "127.0.0.1"):
        return cfg.server.listen_host
    import psutil  # only here, and only without server.advertise_host: ~1 MiB idle otherwise

    stats = psutil.net_if_stats()
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        if name == "lo" or not (stats.get(name) and stats[name].isup):
            continue
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return str(a.address)
    return socket.gethostname()


class Daemon:
    def __init__(self, cfg: Config, *, config_path: str | None, logger: logging.Logger,
                 environ: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.log = logger
        self.environ = dict(os.environ if environ is None else environ)
        self.signals = Signals()
        self.notifier = Notifier()
        self.loop_heartbeat = Heartbeat(max_age=15.0)
        self.view_state = ViewState()
        self.warnings = WarningLog()
        logging.getLogger().addHandler(self.warnings)
        self.prom = WorkerMetrics(__version__, cfg.node_id)
        self._parts_started: list[Any] = []
        self.server: RunningServer | None = None
        self.status_server: Any = None
        self.session: PoolSession | None = None
        self._shape_lock = threading.Lock()
        self._last_shape: tuple[bool, int, bool] | None = None
        self.executor: Executor | None = None
        self.executor_status: ExecutorStatus | None = None
        self.metrics: Any = None
        self.fatal_error = ""

    # -- building ------------------------------------------------------------------------------
    def build(self) -> None:
        """Open everything the worker needs; an unusable path or device is a StartupError."""
        try:
            self._build()
        except OSError as exc:
            raise StartupError(f"can't start: {_os_problem(exc)}") from None

    def _build(self) -> None:
        cfg = self.cfg
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        # Task data is private: root (or the worker's user) only. As root, tasks run as other
        # users (per-task uids, the rootless Podman user) that must traverse the state dir to
        # reach their own workspace: 0711, never listable or readable by them.
        cfg.state_dir.chmod(0o711 if os.geteuid() == 0 else 0o700)
        password = self._password()
        from hivemind.metrics import open_metrics
        from hivemind.metrics.cpuscore import cpu_score
        from hivemind.metrics.gpu import detect_gpus

        self.metrics = open_metrics(cfg.metrics.backend, cfg.metrics.native_library, self.log)
        self.view_state.metrics_backend = self.metrics.backend
        snap = self.metrics.snapshot(str(cfg.state_dir))
        score = cpu_score(cfg.state_dir, per_core_override=cfg.resources.cpu_score_per_core)
        per_core = float(score.per_core)
        self.gpu_detection = detect_gpus() if cfg.resources.gpu == "auto" else None
        gpus = self.gpu_detection.gpus if self.gpu_detection is not None else ()
        self.gpus = gpus
        self.executor, self.executor_status = select_executor(cfg, self.log)
        cores = snap.cpu_count
        capacity = Capacity(total_cpus=float(cores), total_memory_bytes=int(snap.memory_total),
                            reserve_cpus=cfg.resources.reserve_cpus,
                            reserve_memory_bytes=int(cfg.resources.reserve_memory_gb * GIB),
                            slots=cfg.executor.slots or cores,
                            gpus=tuple(str(g.index) for g in gpus), cpu_score_per_core=per_core,
                            gpu_memory_mib=tuple(g.memory_total_mib for g in gpus))
        self.cpu_score_total = int(per_core * cores)
        self.lifecycle = Lifecycle(capacity.for_tasks())
        self.store = TaskStore(cfg.state_dir / "worker.db")
        self.client = open_pool_client(cfg.pool, password, cfg.node_id, self.log)
        self.worker = Worker(cfg, executor=self.executor, lifecycle=self.lifecycle, store=self.store,
                             capacity=capacity, logger=self.log,
                             upload_output=self.client.upload_output,
                             upload_result=self.client.upload_result,
                             on_output_line=self._journal_output, on_event=self._on_event)

    def _password(self) -> Secret:
        if not self.cfg.pool.password_file:
            raise ConfigError(["pool.password_file: no pool password configured; set it to a file or credential name"])
        pw = read_secret("pool.password_file", self.cfg.pool.password_file, self.environ)
        register_secret(pw)
        return pw

    def _journal_output(self, task_id: str, line: OutputLine) -> None:
        if line.stream in ("stdout", "stderr"):
            log_task_output(self.task_log, task_id, line.stream, line.text)

    @property
    def task_log(self) -> logging.Logger:
        return logging.getLogger("hivemind.task")

    def _on_event(self, name: str, info: dict[str, Any]) -> None:
        if name == "upload_failed":
            self.prom.upload_failed()
        elif name == "task_finished":
            dur = info.get("duration") or 0.0
            self.prom.observe_task_duration(max(0.0, float(dur)), str(info["record"].get("reason", "exited")))
        elif name == "state" and str(info.get("new")) == "running":
            rec = self.lifecycle.get(info["task_id"])
            if rec is not None and rec.started_at:
                self.prom.observe_start_latency(max(0.0, rec.started_at - rec.accepted_at))
        if name == "state":
            self._count_states()
        # task_finished too: the runner leaves the running count after its last state change.
        if name in ("state", "task_finished") and self._reported_shape_changed():
            self.signals.wake.set()   # the status line follows the task at once
            if self.session is not None:
                self.session.poke()  # Idle/Busy or the running count changed: tell the pool now

    def _reported_shape_changed(self) -> bool:
        """Whether what the pool and systemd are told (Idle/Busy/Draining, tasks running) differs
        from what it was at the last state change: a task passes ~8 states, and a heartbeat for
        each (with a usage report per running task) cost a busy batch ~5 ms of daemon CPU a task."""
        shape = (self.worker.is_idle(), self.worker.running_count(), self.worker.draining)
        with self._shape_lock:
            changed, self._last_shape = shape != self._last_shape, shape
        return changed

    def _count_states(self) -> None:
        self.prom.task_state(self.lifecycle.counts())

    # -- node facts for the pool ----------------------------------------------------------------
    def node_info(self) -> NodeInfo:
        cap = self.worker.capacity
        gpu_mem = sum(g.memory_total_mib for g in self.gpus) // 1024
        from hivemind.metrics.gpu import gpu_score

        return NodeInfo(
            node_id=self.cfg.node_id, hostname=advertised_host(self.cfg),
            port=self.cfg.server.advertise_port or (self.server.port if self.server else self.cfg.server.port),
            cpu_cores=int(cap.total_cpus), memory_gb=int(cap.total_memory_bytes // GIB),
            cpu_score=self.cpu_score_total, gpu_score=sum(gpu_score(g) for g in self.gpus),
            gpu_memory_gb=gpu_mem, gpu_name=self.gpus[0].name if self.gpus else "",
            location=self.cfg.node.location, docker_status=self.docker_status())

    def docker_status(self) -> str:
        es = self.executor_status
        if es is None or not es.usable:
            return "unavailable"
        if es.name == "podman":
            rootless = getattr(self.executor, "rootless", self.cfg.executor.podman.mode == "rootless")
            return f"podman {'rootless' if rootless else 'rootful'}"
        return "venv (no container isolation)"

    def node_status(self) -> NodeStatus:
        idle = self.worker.is_idle()
        running = self.worker.running_count()
        status = "Idle" if idle else ("Draining" if self.worker.draining else "Busy")
        self.view_state.reported_status = status
        m = self.view_state.machine
        cpu, mem = node_percentages(m.cpu_percent / 100.0, m.memory_used, self.worker.capacity.total_memory_bytes)
        return NodeStatus(status=status, cpu_usage=cpu, memory_usage=mem,
                          gpu_usage=0.0, gpu_memory_usage=0.0, docker_status=self.docker_status(),
                          running_tasks=running)

    def task_usage(self) -> list[TaskUsageReport]:
        out = []
        for r in self.worker.runners():
            u = r.usage.last
            if u is not None:
                # Raw figures plus the grant: each protocol generation reports in its own units.
                out.append(TaskUsageReport(r.task_id, cpu=100.0 * u.cpu_cores,
                                           memory=u.memory_bytes / (1024 * 1024),
                                           cpu_grant_cores=r.limits.cpus,
                                           memory_grant_mib=r.limits.memory_bytes / (1024 * 1024)))
        return out

    # -- running --------------------------------------------------------------------------------
    def start(self) -> None:
        """Serve; a listener that can't bind is a StartupError (shutdown() undoes the rest)."""
        self._install_signals()
        self.worker.start()
        self.worker.recover()
        self.server = start_worker_server(self.cfg.server, self.worker, logger=self.log, environ=self.environ,
                                          max_archive_mb=self.cfg.archive.max_archive_mb,
                                          generation=self.cfg.pool.protocol, node_id=self.cfg.node_id)
        self.view_state.grpc_auth_mode = self.server.mode.value
        self.worker.context["auth_mode"] = self.server.mode.value
        self.view_state.pool_tls = self.cfg.pool.tls.enabled
        self.view_state.pool_protocol = self.client.generation
        self.view_state.pool_limitations = list(self.client.limitations())
        self.session = PoolSession(self.client, self.node_info, self.node_status, self.task_usage,
                                   heartbeat_interval_s=self.cfg.pool.heartbeat_interval_s,
                                   register_interval_s=self.cfg.pool.register_interval_s,
                                   logger=self.log, on_heartbeat_failure=self.prom.heartbeat_failed,
                                   on_fatal=self._fatal)
        self.view = WorkerView(self.worker, lambda: self.executor_status,  # type: ignore[arg-type,return-value]
                               self.session, self.view_state, self.warnings, self.cfg.pool.address)
        if self.cfg.status.enabled:
            self._start_status()
        self.session.start()
        self.watchdog = Watchdog(self.notifier, self.healthy, logger=self.log)
        self.notifier.ready(self.status_line())
        self.watchdog.start()
        self.log.info("worker %s ready: gRPC on %s:%d (%s), executor %s", self.cfg.node_id,
                      self.cfg.server.listen_host, self.server.port, self.server.mode.value,
                      self.executor.name if self.executor else "-", extra={"event": "worker.ready"})

    def _start_status(self) -> None:
        from hivemind.status.server import StatusServer, reads_need_token

        if self.cfg.status.token_file:
            token = read_secret("status.token_file", self.cfg.status.token_file, self.environ)
        else:
            from hivemind.status.token import generated_token

            token, path = generated_token(self.cfg.state_dir)
            self.log.info("status API: status.token_file is unset; task lists and operator actions "
                          "take the token in %s (mode 0600)", path, extra={"event": "status.token_generated"})
        register_secret(token)
        host = self.cfg.status.listen_host
        need_token = reads_need_token(host)

        def load_app() -> Any:
            from hivemind.status.app import create_app

            return create_app(self.view, metrics=self.prom, token=token, reads_need_token=need_token,
                              logger=self.log)

        server = StatusServer(load_app, host, self.cfg.status.port, logger=self.log)
        try:
            server.start()
        except OSError as exc:
            raise StartupError(f"status.listen_host/port: can't listen on {host}:{self.cfg.status.port}: "
                               f"{exc.strerror or exc}") from None
        except ImportError as exc:
            raise StartupError(f"status.enabled: the status API can't be served ({exc}); reinstall the "
                               "worker's dependencies or set status.enabled: false") from None
        self.status_server = server

    def _fatal(self, message: str) -> None:
        """A problem no retry fixes (the pool speaks another protocol generation): stop."""
        self.fatal_error = message
        self.signals.stop.set()

    def healthy(self) -> bool:
        """The watchdog's check: the main loop turned recently and the gRPC server answers."""
        return (self.loop_heartbeat.fresh() and self.server is not None and self.server.healthy(timeout=2.0)
                and (self.session is None or self.session.healthy()))

    def status_line(self) -> str:
        pool = "registered" if (self.session and self.session.state.registered and self.session.state.connected) \
            else "pool unreachable" if (self.session and self.session.state.last_error) else "connecting"
        es = self.executor_status
        parts = [pool, f"{self.worker.running_count()} task(s) running",
                 f"executor {es.name if es else '-'}"]
        if self.worker.draining:
            parts.append("draining")
        if self.uploader_pending():
            parts.append(f"{self.uploader_pending()} result(s) waiting for upload")
        if self.session and self.session.state.last_error:
            parts.append(f"last error: {self.session.state.last_error[:80]}")
        return "; ".join(parts)

    def uploader_pending(self) -> int:
        return self.worker.uploader.pending()

    def loop(self) -> None:
        last_status = ""
        quiet_since: float | None = time.monotonic()    # since when no task runs
        trimmed = False
        while not self.signals.stop.is_set():
            self.loop_heartbeat.beat()
            if self.signals.hang.is_set():
                self.log.error("debug hang requested: the main loop stops turning", extra={"event": "debug.hang"})
                while not self.signals.stop.is_set():
                    time.sleep(1)  # deliberately no heartbeat: the watchdog must catch this
                break
            if self.signals.reload.is_set():
                self.signals.reload.clear()
                self.reload()
            self._refresh_metrics()
            line = self.status_line()
            if line != last_status:
                self.notifier.status(line)
                last_status = line
            # Once nothing has run for a whole idle tick (after start-up, after the last task),
            # the heap's holes go back to the kernel: once per quiet spell, not between tasks.
            if self.worker.running_count():
                quiet_since, trimmed = None, False
            else:
                quiet_since = quiet_since or time.monotonic()
                if not trimmed and time.monotonic() - quiet_since >= IDLE_TICK_S:
                    release_free_heap()
                    trimmed = True
            # Cleared before the flags are read again at the top: a signal in between is seen.
            self.signals.wake.wait(IDLE_TICK_S if self.worker.is_idle() else LOOP_TICK_S)
            self.signals.wake.clear()

    def _refresh_metrics(self) -> None:
        try:
            snap = self.metrics.snapshot(str(self.cfg.state_dir))
            self.view_state.machine.cpu_percent = 100.0 * float(snap.cpu_busy)
            self.view_state.machine.memory_used = int(snap.memory_total - snap.memory_available)
        except Exception as exc:
            self.log.debug("metrics snapshot failed: %s", exc)
        cap = self.worker.capacity
        reserved = self.lifecycle.reserved()
        self._count_states()
        self.prom.results_pending(self.uploader_pending())
        self.prom.resources(total_cpus=cap.total_cpus, reserved_cpus=cap.reserve_cpus, allocated_cpus=reserved.cpus,
                            total_mem=cap.total_memory_bytes,
                            reserved_mem=cap.reserve_memory_bytes, allocated_mem=reserved.memory_bytes,
                            used_mem=self.view_state.machine.memory_used,
                            cpu_usage=self.view_state.machine.cpu_percent / 100.0)
        self.prom.slots(cap.slots, reserved.slots)
        self.prom.draining(self.worker.draining)
        self.view_state.pool_limitations = list(self.client.limitations())
        st = self.session.state if self.session else None
        self.prom.pool_registered(bool(st and st.registered and st.connected))

    def reload(self) -> None:
        self.notifier.reloading()
        try:
            if not self.config_path:
                raise ConfigError(["no config file to reload"])
            new = load_config(self.config_path, self.environ)
        except ConfigError as err:
            self.log.error("reload refused, the running config stays: %s", "; ".join(err.problems),
                           extra={"event": "config.reload_refused"})
            self.notifier.ready(self.status_line())
            return
        changed = _changed_keys(self.cfg, new)
        applied = [k for k in changed if k.split(".")[0] in LIVE_SECTIONS or k in LIVE_KEYS]
        need_restart = sorted(set(changed) - set(applied))
        self.apply_live(_merge_live(self.cfg, new))
        self.log.info("config reloaded from %s; applied: %s%s", self.config_path,
                      ", ".join(sorted(applied)) or "nothing changed",
                      f"; these need a restart: {', '.join(need_restart)}" if need_restart else "",
                      extra={"event": "config.reloaded"})
        self.notifier.ready(self.status_line())

    def apply_live(self, cfg: Config) -> None:
        """Swap in a config whose differences are all safe to apply while tasks run."""
        self.cfg = cfg
        self.worker.reconfigure(cfg)
        setup_logging(cfg.logging.level, cfg.logging.target, cfg.node_id)
        if self.session is not None:
            self.session.set_intervals(cfg.pool.heartbeat_interval_s, cfg.pool.register_interval_s)

    def shutdown(self) -> None:
        if not hasattr(self, "worker"):
            self._close_partial()   # build() stopped part-way: nothing runs, close what it opened
            return
        policy = self.cfg.shutdown.policy
        # The drain may outlast the unit's TimeoutStopSec (a static 90 s on Debian): extend it by
        # what this config can take, so systemd never kills the worker in mid-drain.
        drain = self.cfg.shutdown.drain_timeout_s + self.cfg.executor.stop_grace_s + 30
        self.notifier.stopping(extend_timeout_s=drain if policy == "drain" else None)
        self.log.info("shutting down (policy %s)", policy, extra={"event": "worker.stopping"})
        self.worker.drain()
        if self.session is not None:
            self.session.stop()
            self.session.send_not_idle(self.node_status())
        if self.server is not None:
            self.server.stop(grace=2.0)
        if policy == "drain":
            if not self.worker.wait_idle(self.cfg.shutdown.drain_timeout_s):
                self.log.warning("drain timeout: stopping the remaining tasks", extra={"event": "worker.drain_timeout"})
                self.worker.stop_all("worker shutting down")
                self.worker.wait_idle(self.cfg.executor.stop_grace_s + 10)
            # Results still in upload stay on disk and are delivered after the next start.
            deadline = time.monotonic() + 5
            while self.worker.results_owed() and time.monotonic() < deadline:
                time.sleep(0.1)
        watchdog = getattr(self, "watchdog", None)   # absent when start() failed part-way
        if watchdog is not None:
            watchdog.stop()
        if self.status_server is not None:
            self.status_server.stop()
        self.worker.close()
        close = getattr(self.executor, "close", None)
        if close is not None and policy == "drain":
            close()
        self.client.close()
        self.store.close()
        if self.metrics is not None:
            self.metrics.close()

    def _close_partial(self) -> None:
        close = getattr(self.executor, "close", None)
        if close is not None:
            close()
        if self.metrics is not None:
            self.metrics.close()

    def _install_signals(self) -> None:
        def on_stop(signum: int, frame: FrameType | None) -> None:
            self.signals.stop.set()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self.signals.reload.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        if self.environ.get("HIVEMIND_DEBUG_HANG_SIGNAL") == "1":
            # Test hook for the watchdog system test only: SIGUSR2 makes the main loop hang.
            def on_usr2(signum: int, frame: FrameType | None) -> None:
                self.signals.hang.set()

            signal.signal(signal.SIGUSR2, on_usr2)


# What a reload (SIGHUP) applies at once; everything else (listeners, credentials, executor,
# state directory, capacity) is reported as needing a restart and keeps its running value.
LIVE_SECTIONS = frozenset({"logging", "shutdown", "archive"})
LIVE_KEYS = frozenset({
    "pool.heartbeat_interval_s", "pool.register_interval_s", "pool.result_min_delay_s",
    "executor.task_timeout_s", "executor.stop_grace_s", "resources.default_memory_gb",
})


def _merge_live(old: Config, new: Config) -> Config:
    """`old` with the live-applicable parts of `new`."""
    pool = dataclasses.replace(old.pool, heartbeat_interval_s=new.pool.heartbeat_interval_s,
                               register_interval_s=new.pool.register_interval_s,
                               result_min_delay_s=new.pool.result_min_delay_s)
    executor = dataclasses.replace(old.executor, task_timeout_s=new.executor.task_timeout_s,
                                   stop_grace_s=new.executor.stop_grace_s)
    resources = dataclasses.replace(old.resources, default_memory_gb=new.resources.default_memory_gb)
    return dataclasses.replace(old, logging=new.logging, shutdown=new.shutdown, archive=new.archive,
                               pool=pool, executor=executor, resources=resources)


def _changed_keys(old: Config, new: Config) -> list[str]:
    from hivemind.config import to_dict

    out: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in a:
                walk(a[k], b.get(k), f"{prefix}.{k}" if prefix else k)
        elif a != b:
            out.append(prefix)

    walk(to_dict(old), to_dict(new), "")
    return out


def run_daemon(cfg: Config, *, config_path: str | None = None) -> int:
    setup_logging(cfg.logging.level, cfg.logging.target, cfg.node_id)
    log = logging.getLogger("hivemind")
    daemon = Daemon(cfg, config_path=config_path, logger=log)
    try:
        daemon.build()
    except ExecutorUnavailable as exc:
        log.error("%s", exc, extra={"event": "worker.no_executor"})
        daemon.shutdown()
        return EXIT_NO_EXECUTOR
    except ConfigError:
        daemon.shutdown()
        raise
    except HivemindError as exc:
        log.error("start failed: %s", exc, extra={"event": "worker.start_failed"})
        daemon.shutdown()
        return EXIT_STARTUP if isinstance(exc, StartupError) else 1
    try:
        try:
            daemon.start()
        except StartupError as exc:
            log.error("start failed: %s", exc, extra={"event": "worker.start_failed"})
            return EXIT_STARTUP
        daemon.loop()
    finally:
        daemon.shutdown()
    if daemon.fatal_error:
        # A pool of the other protocol generation: the fix is pool.protocol, as for a config error.
        log.error("stopped: %s", daemon.fatal_error, extra={"event": "worker.fatal"})
        return EXIT_STARTUP
    return 0


def _os_problem(exc: OSError) -> str:
    """An OSError as one line an operator can act on: what failed, and on which path."""
    where = f" {exc.filename!s}" if exc.filename else ""
    return f"{exc.strerror or exc}:{where}".rstrip(":")


__all__ = ["Daemon", "advertised_host", "run_daemon"]
