"""The Podman executor: one container per task, driven through the Podman API service.

Task life cycle (one `_Run` per task, all state changes under `_lock`):

    prepare (pip container, optional) -> start: create -> inspect (what was applied) -> start
        -> monitor thread: logs --follow -> sink ... container exits -> wait -> inspect -> result
        -> sampler thread: locate (PID, cgroup, applied limits) -> usage every 0.2 s / 1 s
    stop: podman stop (SIGTERM, grace, SIGKILL)    timeout timer: the same, reason TIMED_OUT
    recover: running -> reattach logs from the handle's start time; exited -> collect state
    cleanup: force-remove task and prepare containers (idempotent)

Limits are checked, never assumed: `probe()` starts a container built exactly like a task's and
reads what the kernel applied from its cgroup files (kernel_limits.py); each task's own cgroup is
read the same way once it runs, for its record (`facts()`). Rootless Podman on cgroup v1 applies
none, and says nothing: the probe reports it, `executor.podman.mode: auto` then picks rootful.
Usage comes from the task's own cgroup when the kernel keeps one, else from the container's
process tree in /proc (the metrics library), sampled by one thread per task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hivemind.config import PodmanConfig, RequirementsConfig
from hivemind.errors import ExecutorUnavailable, HivemindError, TaskNotFound
from hivemind.executors.base import (
    Enforcement,
    Entry,
    ExecutorStatus,
    ExitReason,
    ExitResult,
    Limits,
    OutputLine,
    OutputSink,
    PrepareCancelled,
    TaskFacts,
    TaskHandle,
    TaskSpec,
    Usage,
)
from hivemind.executors.container_spec import (
    LABEL_MANAGED,
    LABEL_NODE,
    LABEL_ROLE,
    LABEL_TASK,
    ContainerSpec,
    build_container_spec,
    build_prepare_spec,
    container_name,
    parse_user,
)
from hivemind.executors.kernel_limits import (
    AppliedLimit,
    compare,
    own_cgroup,
    place_of,
    read_limits,
)
from hivemind.executors.podman_adapter import (
    ContainerState,
    LogFrame,
    PodmanAdapter,
    PodmanError,
)
from hivemind.executors.podman_service import PodmanService
from hivemind.executors.proc import MAX_LINE_BYTES, LineSplitter, TaskUser, lookup_user, may_access
from hivemind.executors.requirements import Requirements, parse_requirements
from hivemind.executors.venv_cache import PrepareFailed as _PrepareFailed
from hivemind.executors.venv_cache import fetch_wheels
from hivemind.executors.wheel_fetch import (
    TAGS_PROBE,
    TargetTags,
    download_argv,
    fetch_env,
    parse_tags,
)
from hivemind.metrics import MetricsError, MetricsSource, open_metrics

HANDLE_VERSION = 1
# What catatonit (the container's PID 1) prints when the entry point cannot be executed.
EXEC_FAILED = re.compile(r"^ERROR \(catatonit:\d+\): failed to exec pid1: (.*)$")
# A cgroup's counters are cheap to read (descriptors kept open); a /proc tree walk reads every
# process's stat, so it runs less often.
CGROUP_SAMPLE_S = 0.2
TREE_SAMPLE_S = 1.0
PROBE_MEMORY = 256 * 1024 * 1024
# How long a closed output is followed by quick inspects before the blocking /wait.
EXIT_POLL_S = 0.3


# One class for both executors: installing requirements.txt failed (pip's output went to the sink).
PrepareFailed = _PrepareFailed


class ProbeFailed(HivemindError):
    """The start-up probe container could not run as a task would; the message says why."""


@dataclass
class _Run:
    task_id: str
    container_id: str
    started_at: float
    timeout_s: float
    memory_limit: int                   # as applied (0: none)
    sink: OutputSink
    done: threading.Event = field(default_factory=threading.Event)
    result: ExitResult | None = None
    stop_requested: bool = False
    timed_out: bool = False
    peak_memory: int | None = None
    cpu_ns: int | None = None
    last_cpu: tuple[float, int] | None = None
    timer: threading.Timer | None = None
    exec_error: str = ""                # catatonit could not exec the entry point
    spec_limits: tuple[int | None, float | None, int | None] = (None, None, None)
    pid: int = 0                        # host PID of the container's init (catatonit)
    cgroup: str | None = None           # the task's own cgroup (relative), when the kernel keeps one
    source: str = ""
    applied: dict[str, AppliedLimit] = field(default_factory=dict)
    memory_now: int = 0
    pids_now: int | None = None
    max_pids: int | None = None
    located: threading.Event = field(default_factory=threading.Event)
    marks: dict[str, float] = field(default_factory=dict)   # phase -> when it ended (clock)


def _lines(frames: Iterator[LogFrame], now: Callable[[], float]) -> Iterator[OutputLine]:
    """Log frames as whole lines per stream, stamped when read (podman's own log timestamps
    have one-second resolution). A line longer than MAX_LINE_BYTES is cut into pieces, as on
    the venv path; each frame's bytes are looked at once (a line without a newline used to be
    re-joined and re-split on every frame: 48 MB of a 256 MiB line in 120 s)."""
    splitters: dict[str, LineSplitter] = {}
    for frame in frames:
        splitter = splitters.get(frame.stream)
        if splitter is None:
            splitter = splitters[frame.stream] = LineSplitter(MAX_LINE_BYTES)
        ts = now()
        for line in splitter.feed(frame.data):
            yield OutputLine(ts, frame.stream, line)
    for stream, splitter in splitters.items():
        for line in splitter.flush():
            yield OutputLine(now(), stream, line)


class PodmanExecutor:
    name = "podman"

    def __init__(self, cfg: PodmanConfig, node_id: str, state_dir: Path, logger: logging.Logger,
                 prepare_timeout_s: float, *, service: PodmanService | None = None,
                 clock: Callable[[], float] = time.time, wait_interval: str = "10ms",
                 host_ca_bundle: Path | None = Path("/etc/ssl/certs/ca-certificates.crt"),
                 kmsg: str = "/dev/kmsg", requirements: RequirementsConfig | None = None,
                 metrics: MetricsSource | None = None) -> None:
        self._cfg = cfg
        self._node = node_id
        self._state_dir = Path(state_dir)
        self._log = logger
        self._prepare_timeout = prepare_timeout_s
        # An injected service belongs to the caller; only one made here is stopped by close().
        self._owns_service = service is None
        self._service = service or PodmanService(cfg, logger, state_dir=self._state_dir)
        self._clock = clock
        self._interval = wait_interval
        self._ca_bundle = host_ca_bundle
        self._kmsg = kmsg
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._adapter: PodmanAdapter | None = None
        self._enforcement: Enforcement | None = None
        self._uid, self._gid = parse_user(cfg.user)
        self._metrics = metrics
        self._probe_applied: dict[str, AppliedLimit] = {}
        self._image: tuple[str, str] | None = None
        self.mode_reason = ""               # why this mode was chosen (set by the selector)
        self._req_cfg = requirements or RequirementsConfig()
        self._tags: dict[str, TargetTags] = {}     # image id -> the tags its python accepts

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def rootless(self) -> bool:
        return self._service.rootless

    def service_uid(self) -> int | None:
        """uid of the user whose Podman runs tasks (None: rootful)."""
        user = self._service.service_user()
        return user.uid if user is not None else None

    def mount_namespace_pids(self) -> list[int]:
        """Processes whose mount namespace a workspace mount made on the host must also reach:
        rootless Podman's pause process. Its namespace copied the host's mounts when it
        started; where / is not a shared mount (no systemd), later host mounts don't reach it."""
        if not self.rootless:
            return []
        # No ensure(): a namespace made after the host mount copies it, so only an existing
        # pause process matters (and every ping of a loaded service risks a restart).
        try:
            user = self._service.service_user()
        except HivemindError:
            return []
        if user is None:
            return []
        try:
            return [int(Path(user.runtime_dir, "libpod", "tmp", "pause.pid").read_text().strip())]
        except (OSError, ValueError):
            return []

    def _api(self) -> PodmanAdapter:
        uri = self._service.ensure()
        with self._lock:
            if self._adapter is None or self._adapter.uri != uri:
                self._adapter = PodmanAdapter(uri)
            return self._adapter

    def close(self) -> None:
        """Stop the API service if this executor started it. Running tasks keep running."""
        with self._lock:
            for run in self._runs.values():
                if run.timer is not None:
                    run.timer.cancel()
            if self._adapter is not None:
                self._adapter.close()
                self._adapter = None
        if self._owns_service:
            self._service.close()
        with self._lock:
            metrics, self._metrics = self._metrics, None
        if metrics is not None:      # the executor's own source (given or opened): closed here
            metrics.close()

    def _workspace_owner(self) -> tuple[int, int] | None:
        """Host uid:gid the workspace must belong to so the container's user can write it.
        Rootful: None, Podman chowns it to the task's mapped uid (its user-namespace map, `U` mount)."""
        if not self.rootless:
            return None
        user = self._service.service_user()
        # keep-id maps the service user to cfg.user inside, so its own files are writable.
        if user is not None and os.geteuid() == 0 and user.uid != 0:
            return user.uid, user.gid
        return None

    def _chown_tree(self, root: Path) -> None:
        # Only the task's user (and root) may enter its workspace.
        with contextlib.suppress(OSError):
            os.chmod(root, 0o700)
        owner = self._workspace_owner()
        if owner is None or os.geteuid() != 0:
            return
        uid, gid = owner
        os.lchown(root, uid, gid)
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                os.lchown(os.path.join(dirpath, n), uid, gid)

    # -- probe ----------------------------------------------------------------------------------

    def probe(self) -> ExecutorStatus:
        try:
            if shutil.which("podman") is None:
                return ExecutorStatus(self.name, False, "podman is not installed (apt install podman)")
            api = self._api()
            if api.image_id(self._cfg.image) is None:
                hint = ("run images/build, then scripts/setup-podman to load it for the rootless "
                        "user" if self.rootless else "run images/build")
                return ExecutorStatus(self.name, False, f"image {self._cfg.image} is missing: {hint}")
            enf = self._enforcement or self._measure_enforcement(api)
            self._enforcement = enf
            mode = "rootless" if self.rootless else "rootful"
            why = f"; {self.mode_reason}" if self.mode_reason else ""
            return ExecutorStatus(self.name, True, f"podman {api.version()} {mode}{why}", enf)
        except (ExecutorUnavailable, ProbeFailed) as exc:
            return ExecutorStatus(self.name, False, str(exc))
        except (PodmanError, OSError) as exc:
            hint = ""
            if not self.rootless and ("available IDs" in str(exc) or "subuid" in str(exc)):
                hint = ("; rootful tasks run in a user namespace: add a `containers` range to "
                        "/etc/subuid and /etc/subgid (scripts/setup-podman does)")
            return ExecutorStatus(self.name, False, f"podman service error: {exc}{hint}")

    def _measure_enforcement(self, api: PodmanAdapter) -> Enforcement:
        """Start a container exactly as a task's (the same spec builder, limits and options),
        read what the kernel applied to the running container from its cgroup files, remove it.

        A container whose limits can't be had fails to start (rootless without cgroup
        delegation): that is a PodmanError here, so the executor is reported unusable instead
        of accepting tasks that could never start."""
        name = container_name(self._node, "probe", "probe")
        probe_dir = self._state_dir / "podman-probe"
        probe_dir.mkdir(parents=True, exist_ok=True)
        self._chown_tree(probe_dir)
        spec = TaskSpec("probe", probe_dir, Entry(("sleep", "60")),
                        Limits(cpus=1.0, memory_bytes=PROBE_MEMORY, pids=self._cfg.pids_limit))
        cs = build_container_spec(spec, self._cfg, self._node, rootless=self.rootless)
        labels = {**cs.labels, LABEL_ROLE: "probe", LABEL_TASK: ""}
        cs = _replace(cs, name=name, labels=labels)
        api.remove(name)
        cid = api.create(cs)
        try:
            try:
                api.start(cid)
            except PodmanError as exc:
                raise ProbeFailed(f"a container with the task limits does not start: {exc}") from None
            st = api.inspect(cid)
            place = place_of(st.pid) if st.pid else None
            if place is None:
                raise ProbeFailed("the probe container exited at once; its cgroup can't be read")
            applied = compare(*_spec_limits(cs), read_limits(place), cid)
        finally:
            api.remove(cid)
        self._probe_applied = applied
        return _enforcement_of(st, applied)

    # -- prepare --------------------------------------------------------------------------------

    def pydeps_dir(self, spec: TaskSpec) -> Path | None:
        """Where the requirements of this task are (or will be) installed; None without any."""
        if spec.requirements is None:
            return None
        image_id = self._api().image_id(self._cfg.image) or ""
        h = hashlib.sha256(spec.requirements.read_bytes() + b"\0" + image_id.encode())
        return self._state_dir / "podman-pycache" / h.hexdigest()[:32]

    def prepare(self, spec: TaskSpec, sink: OutputSink, cancel: threading.Event) -> None:
        """requirements.txt, validated, in two steps: the worker fetches wheels only (nothing of
        the archive or of any sdist runs, see wheel_fetch.py), then a container with no
        network installs them offline into the cache dir the run mounts read-only."""
        reqs = parse_requirements(spec.requirements.read_bytes()) if spec.requirements else None
        target = self.pydeps_dir(spec)
        self._chown_tree(spec.workspace)
        if target is None or reqs is None:
            return
        if target.is_dir():
            sink(OutputLine(self._clock(), "prepare", "requirements already installed (cached)"))
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._build_lock(target, cancel):
            if target.is_dir():   # another task built it while we waited for the lock
                sink(OutputLine(self._clock(), "prepare", "requirements already installed (cached)"))
                return
            tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{spec.task_id}"
            wheels = target.parent / f".{target.name}.wheels-{os.getpid()}-{spec.task_id}"
            for d in (tmp, wheels):
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(mode=0o755)
            self._chown_tree(tmp)
            deadline = time.monotonic() + self._prepare_timeout
            try:
                self._fetch_wheels(reqs, wheels, sink, cancel, deadline)
                self._run_pip(spec, sink, cancel, tmp, wheels)
                os.chmod(tmp, 0o755)
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.rmtree(wheels, ignore_errors=True)

    def _fetch_user(self) -> TaskUser | None:
        """Who runs `pip download` when the worker is root: nobody, if it can run our pip."""
        if os.geteuid() != 0:
            return None
        try:
            user = lookup_user("nobody")
        except KeyError:
            return None
        exe = Path(os.path.realpath(sys.executable))
        pip_dir = Path(os.path.dirname(os.path.realpath(_pip_init())))
        ok = may_access(exe, user, os.X_OK) and may_access(pip_dir, user, os.R_OK | os.X_OK)
        return user if ok else None

    def _fetch_wheels(self, reqs: Requirements, wheels: Path, sink: OutputSink,
                      cancel: threading.Event, deadline: float) -> None:
        tags = self._image_tags(sink, cancel)
        req_file = wheels / "requirements.txt"
        req_file.write_text(reqs.normalized())
        user = self._fetch_user()
        if user is not None:
            os.chown(wheels, user.uid, user.gid)
        sink(OutputLine(self._clock(), "prepare",
                        "[hivemind] fetching wheels for requirements.txt (no sdists: nothing is built)"))
        argv = download_argv([sys.executable, "-m", "pip"], req_file, wheels, self._req_cfg, tags)
        fetch_wheels(argv, sys.executable, cfg=self._req_cfg, cwd=wheels,
                     env=fetch_env(self._req_cfg, wheels), user=user, sink=sink, cancel=cancel,
                     deadline=deadline, clock=time.monotonic, wall=self._clock, log=self._log)

    def _image_tags(self, sink: OutputSink, cancel: threading.Event) -> TargetTags:
        """The wheel tags the image's python accepts, asked once per image (no network)."""
        api = self._api()
        image_id = api.image_id(self._cfg.image) or ""
        if image_id in self._tags:
            return self._tags[image_id]
        probe = TaskSpec("tags", self._state_dir, Entry(("python3", "-c", TAGS_PROBE)),
                         Limits(cpus=1.0, memory_bytes=256 * 1024 * 1024))
        cs = build_container_spec(probe, self._cfg, self._node, rootless=self.rootless)
        cs = _replace(cs, name=container_name(self._node, "tags", "probe"), mounts=cs.mounts[1:],
                      labels={**cs.labels, LABEL_ROLE: "probe", LABEL_TASK: ""},
                      pids_limit=None, memory_bytes=None, memswap_bytes=None, cpu_quota_us=None,
                      cpu_period_us=None)
        out: list[str] = []
        self._run_container(cs, lambda line: out.append(line.text), cancel, "the image's wheel tags")
        try:
            tags = parse_tags("\n".join(out))
        except (ValueError, KeyError, IndexError):
            raise PrepareFailed("could not read the image's wheel tags: " + " | ".join(out[-3:])) from None
        self._tags[image_id] = tags
        return tags

    @contextlib.contextmanager
    def _build_lock(self, target: Path, cancel: threading.Event) -> Iterator[None]:
        lock_path = target.parent / f".{target.name}.lock"
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if cancel.wait(0.1):
                        raise PrepareCancelled("cancelled while waiting for the pip cache lock") from None
            try:
                yield
            finally:
                # Unlink before unlock: a waiter that then locks the stale inode rechecks target.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock_path)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _run_pip(self, spec: TaskSpec, sink: OutputSink, cancel: threading.Event,
                 build_dir: Path, wheels: Path) -> None:
        cs = build_prepare_spec(spec, self._cfg, self._node, rootless=self.rootless,
                                build_dir=str(build_dir), wheels_dir=str(wheels))
        self._run_container(cs, sink, cancel, "pip install")

    def _run_container(self, cs: ContainerSpec, sink: OutputSink, cancel: threading.Event,
                       what: str) -> None:
        """Run a helper container to its end (output to `sink` as "prepare"), then remove it."""
        api = self._api()
        if self._ours(api, cs.name):
            api.remove(cs.name)
        cid = api.create(cs)
        try:
            api.start(cid)
            pump = threading.Thread(target=self._pump, name=f"prep-logs-{cs.name}",
                                    args=(api, cid, None, sink, "prepare"), daemon=True)
            pump.start()
            code: list[int] = []
            waiter = threading.Thread(target=lambda: code.append(api.wait(cid, self._interval)),
                                      name=f"prep-wait-{cs.name}", daemon=True)
            waiter.start()
            deadline = time.monotonic() + self._prepare_timeout
            while waiter.is_alive():
                if cancel.wait(0.05):
                    api.kill(cid)
                    waiter.join(10)
                    raise PrepareCancelled(f"{cs.name}: prepare cancelled")
                if time.monotonic() > deadline:
                    api.kill(cid)
                    raise PrepareFailed(f"{what} took over {self._prepare_timeout:.0f}s")
            pump.join(5)
            if not code or code[0] != 0:
                raise PrepareFailed(f"{what} exited with {code[0] if code else '?'}; "
                                    "see the prepare output")
        finally:
            with contextlib.suppress(PodmanError):
                api.remove(cid)

    # -- start / monitor ------------------------------------------------------------------------

    def start(self, spec: TaskSpec, sink: OutputSink) -> TaskHandle:
        api = self._api()
        self._chown_tree(spec.workspace)
        deps = self.pydeps_dir(spec)
        if deps is not None and not deps.is_dir():
            raise PrepareFailed("requirements are not installed: call prepare() first")
        cs = build_container_spec(spec, self._cfg, self._node, rootless=self.rootless,
                                  pydeps_dir=str(deps) if deps else None)
        timeout_s = spec.limits.timeout_s
        if spec.entry.timeout_s is not None:
            timeout_s = min(timeout_s, spec.entry.timeout_s)
        cid = self._create(api, cs)
        created = self._clock()
        # What podman recorded of the limits is read from the exited container's inspect
        # (_follow): one API call less on the dispatch path.
        run = _Run(spec.task_id, cid, self._clock(), timeout_s, 0, sink,
                   spec_limits=_spec_limits(cs))
        try:
            frames: Iterator[LogFrame] | None = api.attach(cid)
        except (PodmanError, TaskNotFound) as exc:
            self._log.warning("task %s: attach failed (%s); following logs instead",
                              spec.task_id, exc)
            frames = None
        try:
            api.start(cid)
        except PodmanError as exc:
            now = self._clock()
            run.result = ExitResult(None, ExitReason.FAILED_TO_START, run.started_at, now,
                                    message=str(exc)[:500])
            run.applied = self._probe_fallback(run)
            run.located.set()
            run.done.set()
            if frames is not None:
                frames.close()    # type: ignore[attr-defined]
            with self._lock:
                self._runs[spec.task_id] = run
            return self._handle(run)
        run.marks = {"created": created, "container_started": self._clock()}
        with self._lock:
            self._runs[spec.task_id] = run
        self._monitor(api, run, since=None, frames=frames)
        return self._handle(run)

    def _create(self, api: PodmanAdapter, cs: ContainerSpec) -> str:
        """Create the task's container. Its name is taken only by a leftover of an earlier
        attempt of this very task: that one is removed (if it is ours) and the create retried,
        so the usual path costs one call, not an inspect first."""
        try:
            return api.create(cs)
        except PodmanError as exc:
            if "already in use" not in str(exc) or not self._ours(api, cs.name):
                raise
        api.remove(cs.name)
        return api.create(cs)

    def _handle(self, run: _Run) -> TaskHandle:
        mem, cpus, pids = run.spec_limits
        return TaskHandle(HANDLE_VERSION, run.task_id, self.name, {
            "container_id": run.container_id, "started_at": run.started_at,
            "timeout_s": run.timeout_s, "rootless": self.rootless,
            "limits": {"memory_bytes": mem, "cpus": cpus, "pids": pids},
            # For the task record: whose host uid the task's uid is.
            "isolation": {"user_namespace": "keep-id (the service user)" if self.rootless
                          else "auto (a uid no account has)"}})

    def _monitor(self, api: PodmanAdapter, run: _Run, since: float | None,
                 frames: Iterator[LogFrame] | None = None,
                 skip: Mapping[str, int] | None = None) -> None:
        remaining = run.started_at + run.timeout_s - self._clock()
        run.timer = threading.Timer(max(0.0, remaining), self._on_timeout, (run,))
        run.timer.daemon = True
        run.timer.start()
        threading.Thread(target=self._follow, args=(api, run, since, frames, skip),
                         name=f"task-{run.task_id}", daemon=True).start()
        threading.Thread(target=self._sample, args=(run,), name=f"cgroup-{run.task_id}",
                         daemon=True).start()

    def _pump(self, api: PodmanAdapter, ref: str, since: float | None, sink: OutputSink,
              stream: str | None = None, frames: Iterator[LogFrame] | None = None,
              run: _Run | None = None, skip: Mapping[str, int] | None = None,
              follow: bool = True) -> None:
        # Each line's pos is its number in its stream, counted from the container's start: the
        # log can only be re-read from there, so after a restart the first `skip[stream]` lines
        # (the ones the worker's log already holds) are read again and dropped here.
        counts: dict[str, int] = {}
        try:
            if frames is None:
                frames = api.logs(ref, follow=follow, since=since)
            first_stderr = True
            for line in _lines(frames, self._clock):
                n = counts[line.stream] = counts.get(line.stream, 0) + 1
                if skip is not None and n <= skip.get(stream or line.stream, 0):
                    first_stderr = first_stderr and line.stream != "stderr"
                    continue
                if run is not None and line.stream == "stderr" and first_stderr:
                    first_stderr = False
                    m = EXEC_FAILED.match(line.text)
                    if m:
                        run.exec_error = f"cannot execute the entry point: {m.group(1)}"
                        continue
                sink(OutputLine(line.ts, stream or line.stream, line.text, n))
        except (PodmanError, TaskNotFound, OSError) as exc:
            self._log.debug("log stream of %s ended: %s", ref, exc)

    def _follow(self, api: PodmanAdapter, run: _Run, since: float | None,
                frames: Iterator[LogFrame] | None, skip: Mapping[str, int] | None = None) -> None:
        self._pump(api, run.container_id, since, run.sink, frames=frames, run=run, skip=skip)
        run.marks["output_closed"] = self._clock()
        try:
            st = self._exited_state(api, run.container_id)
            run.marks["exit_seen"] = self._clock()
            run.memory_limit = st.memory_limit
            self._sample_once(run)
            result = self._result(run, st)
        except (PodmanError, TaskNotFound) as exc:
            result = ExitResult(None, ExitReason.LOST, run.started_at, self._clock(),
                                message=f"container vanished: {exc}")
        self._finish(run, result)

    def _exited_state(self, api: PodmanAdapter, cid: str) -> ContainerState:
        """The state of a container whose output just closed. Its process has ended, and
        conmon has the exit code on disk at once: a few inspects see it in a few ms, where
        /wait answers only after podman's cleanup process ran (~120 ms here, on every task).
        A task that closed its output but runs on is waited for (/wait) after EXIT_POLL_S."""
        deadline = time.monotonic() + EXIT_POLL_S
        delay = 0.002
        while True:
            st = api.inspect(cid)
            if st.exit_code is not None or time.monotonic() >= deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        if st.exit_code is None:
            api.wait(cid, self._interval)
            st = api.inspect(cid)
        return st

    def _finish(self, run: _Run, result: ExitResult) -> None:
        if run.timer is not None:
            run.timer.cancel()
        run.result = result
        run.done.set()

    def _result(self, run: _Run, st: ContainerState) -> ExitResult:
        code = st.exit_code
        finished = st.finished_at or self._clock()
        if run.timed_out:
            reason = ExitReason.TIMED_OUT
        elif st.oom_killed or (code == 137 and run.memory_limit > 0 and not run.stop_requested
                               and ((run.peak_memory or 0) >= run.memory_limit * 0.95
                                    or self._kernel_saw_oom(run.container_id))):
            reason = ExitReason.OUT_OF_MEMORY
        elif run.stop_requested:
            reason = ExitReason.STOPPED
        elif code is None or (st.error and code in (126, 127)) or (run.exec_error and code == 1):
            reason = ExitReason.FAILED_TO_START
        else:
            reason = ExitReason.EXITED
        cpu = run.cpu_ns / 1e9 if run.cpu_ns is not None else None
        return ExitResult(code, reason, run.started_at, finished, run.peak_memory, cpu,
                          message=(run.exec_error or st.error)[:500])

    def _kernel_saw_oom(self, cid: str) -> bool:
        """Podman with runc on cgroup v1 leaves State.OOMKilled false, and the cgroup (with its
        counters) is gone by the time wait() returns; the kernel log names the memcg it killed in."""
        needle = f"oom_memcg=/libpod_parent/libpod-{cid}".encode()
        try:
            fd = os.open(self._kmsg, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            while True:
                try:
                    record = os.read(fd, 8192)
                except BlockingIOError:
                    return False
                except OSError:        # EPIPE: a record was overwritten while reading; go on
                    continue
                if not record:
                    return False
                if needle in record:
                    return True
        finally:
            os.close(fd)

    def _on_timeout(self, run: _Run) -> None:
        if run.done.is_set():
            return
        run.timed_out = True
        self._log.info("task %s: timeout of %.0fs reached, stopping", run.task_id, run.timeout_s)
        with contextlib.suppress(PodmanError, TaskNotFound):
            self._api().stop(run.container_id, timeout=2)

    # -- usage: from the task's own cgroup when the kernel keeps one, else its /proc tree -------

    def _metrics_source(self) -> MetricsSource:
        with self._lock:
            if self._metrics is None:
                self._metrics = open_metrics("auto", logger=self._log)
            return self._metrics

    def _locate(self, run: _Run) -> None:
        """Find the running container's init PID and cgroup, and what the kernel applied."""
        try:
            st = self._api().inspect(run.container_id)
        except (PodmanError, TaskNotFound, ExecutorUnavailable):
            st = None
        place = place_of(st.pid) if st is not None and st.pid else None
        if st is not None and place is not None:
            run.pid = st.pid
            run.applied = compare(*run.spec_limits, read_limits(place), run.container_id)
            ctl = "" if place.version == 2 else "memory"
            if own_cgroup(place, run.container_id, ctl):
                run.cgroup = place.path(ctl)
                run.source = f"cgroup v{place.version}"
            else:
                run.source = "proc tree"
        else:
            run.applied = self._probe_fallback(run)
        missing = [k for k, v in run.applied.items() if v.requested is not None and v.applied is None]
        if missing:
            self._log.warning("task %s: limits not applied by the kernel: %s", run.task_id,
                              "; ".join(f"{k} ({run.applied[k].how})" for k in missing),
                              extra={"task_id": run.task_id, "event": "task.limits_not_applied"})
        run.located.set()

    def _probe_fallback(self, run: _Run) -> dict[str, AppliedLimit]:
        """The task ended before its cgroup could be read: the start-up probe ran the same spec
        on this host, so the kernel applied (or not) the same kinds of limit."""
        mem, cpus, pids = run.spec_limits
        wanted: dict[str, float | int | None] = {"memory_bytes": mem, "cpus": cpus, "pids": pids}
        out = {}
        for key, want in wanted.items():
            probe = self._probe_applied.get(key)
            held = probe is not None and probe.applied is not None and want is not None
            how = probe.how if probe is not None else "unknown: no probe result"
            out[key] = AppliedLimit(want, want if held else None,
                                    f"{how} (from the start-up probe: the task ended before its "
                                    "cgroup could be read)")
        return out

    def _sample_once(self, run: _Run) -> None:
        try:
            if run.cgroup is not None:
                cg = self._metrics_source().snapshot("/", run.cgroup).cgroup
                if cg is None:
                    return                       # the cgroup went with the container
                run.cpu_ns = cg.cpu_usage_ns
                run.memory_now = cg.memory_current
                run.peak_memory = max(run.peak_memory or 0, cg.memory_peak or cg.memory_current)
                pids: int | None = cg.pids_current or None
            elif run.pid:
                tree = self._metrics_source().tree(run.pid)
                if tree is None:
                    return
                run.cpu_ns = round(tree.cpu_seconds * 1e9)
                run.memory_now = tree.rss_bytes
                run.peak_memory = max(run.peak_memory or 0, tree.rss_bytes)
                pids = tree.procs
            else:
                return
        except MetricsError as exc:
            self._log.debug("usage of %s not read: %s", run.task_id, exc)
            return
        run.pids_now = pids
        if pids is not None:
            run.max_pids = max(run.max_pids or 0, pids)

    def _sample(self, run: _Run) -> None:
        self._locate(run)
        interval = CGROUP_SAMPLE_S if run.cgroup is not None else TREE_SAMPLE_S
        # The cgroup vanishes with the container, so the last sample before exit is what we get.
        while True:
            self._sample_once(run)
            if run.done.wait(interval):
                return

    # -- the rest of the Executor protocol ------------------------------------------------------

    def _run(self, task_id: str) -> _Run:
        with self._lock:
            run = self._runs.get(task_id)
        if run is None:
            raise TaskNotFound(f"task {task_id} is not known to the podman executor")
        return run

    def wait(self, task_id: str, timeout: float | None = None) -> ExitResult | None:
        run = self._run(task_id)
        if not run.done.wait(timeout):
            return None
        return run.result

    def stop(self, task_id: str, grace: float) -> None:
        api = self._api()
        with self._lock:
            run = self._runs.get(task_id)
        if run is None:
            for role in ("task", "prepare"):
                name = container_name(self._node, task_id, role)
                if self._ours(api, name):
                    with contextlib.suppress(TaskNotFound):
                        api.stop(name, timeout=grace)
            return
        if run.done.is_set():
            return
        run.stop_requested = True
        with contextlib.suppress(TaskNotFound):
            api.stop(run.container_id, timeout=grace)
        if not run.done.wait(grace + 30):
            with contextlib.suppress(TaskNotFound):
                api.kill(run.container_id)
            run.done.wait(10)

    def stats(self, task_id: str) -> Usage | None:
        run = self._run(task_id)
        if run.done.is_set() or run.cpu_ns is None:
            return None
        now = self._clock()
        cpu_ns = run.cpu_ns
        prev_t, prev_ns = run.last_cpu or (run.started_at, 0)
        run.last_cpu = (now, cpu_ns)
        cores = (cpu_ns - prev_ns) / 1e9 / max(now - prev_t, 1e-3)
        return Usage(max(0.0, cores), run.memory_now, run.pids_now, cpu_ns / 1e9,
                     run.peak_memory, run.source)

    def facts(self, task_id: str) -> TaskFacts:
        with self._lock:
            run = self._runs.get(task_id)
        if run is None:
            return TaskFacts()
        if run.done.is_set():       # the record's read: let a late _locate finish first
            run.located.wait(5)
        image_id, digest = self._image_info()
        prov = {"executor": self.name, "mode": "rootless" if self.rootless else "rootful",
                "image": self._cfg.image, "image_id": image_id, "image_digest": digest,
                "container_id": run.container_id}
        usage = {"source": run.source or "none", "max_pids": run.max_pids}
        return TaskFacts({k: v.as_dict() for k, v in run.applied.items()}, prov, usage,
                         dict(run.marks))

    def _image_info(self) -> tuple[str, str]:
        if self._image is None:
            try:
                self._image = self._api().image_info(self._cfg.image) or ("", "")
            except (PodmanError, ExecutorUnavailable):
                return "", ""
        return self._image

    def cleanup(self, task_id: str) -> None:
        api = self._api()
        with self._lock:
            run = self._runs.pop(task_id, None)
        if run is not None and run.timer is not None:
            run.timer.cancel()
        if run is not None and run.container_id:
            # Created (or label-checked on recovery) by this executor: removed by id, without an
            # inspect first. Its prepare containers were removed when they ended.
            api.remove(run.container_id)
            return
        for role in ("task", "prepare"):
            name = container_name(self._node, task_id, role)
            if self._ours(api, name):
                api.remove(name)

    def _ours(self, api: PodmanAdapter, ref: str) -> bool:
        """Only containers carrying our labels are ever stopped or removed."""
        try:
            labels = api.inspect(ref).labels
        except TaskNotFound:
            return False
        return labels.get(LABEL_MANAGED) == "1" and labels.get(LABEL_NODE) == self._node

    def orphans(self) -> list[str]:
        found = self._api().list_labelled({LABEL_MANAGED: "1", LABEL_NODE: self._node})
        return sorted({c.labels[LABEL_TASK] for c in found
                       if c.labels.get(LABEL_TASK) and c.labels.get(LABEL_ROLE) != "probe"})

    def recover(self, handle: TaskHandle, sink: OutputSink,
                resume: Mapping[str, int] | None = None) -> None:
        if handle.executor != self.name or handle.version != HANDLE_VERSION:
            raise TaskNotFound(f"handle of task {handle.task_id} is not a podman v1 handle")
        state: dict[str, Any] = dict(handle.state)
        cid = str(state.get("container_id", ""))
        api = self._api()
        st = api.inspect(cid)      # TaskNotFound when the container is gone
        if st.labels.get(LABEL_NODE) != self._node or st.labels.get(LABEL_MANAGED) != "1":
            raise TaskNotFound(f"container {cid[:12]} is not one of this node's tasks")
        lim = state.get("limits") or {}
        run = _Run(handle.task_id, cid, float(state.get("started_at", self._clock())),
                   float(state.get("timeout_s", 3600.0)), st.memory_limit, sink,
                   spec_limits=(lim.get("memory_bytes"), lim.get("cpus"), lim.get("pids")))
        with self._lock:
            self._runs[handle.task_id] = run
        if st.running:
            if resume is None:
                self._monitor(api, run, since=run.started_at)
            else:
                self._monitor(api, run, since=None, skip=resume)
        else:
            run.applied = self._probe_fallback(run)
            run.located.set()
            if resume is not None:
                # What it printed while no worker watched: the log still has it (the container
                # is removed only after its result is durable).
                self._pump(api, cid, None, sink, run=run, skip=resume, follow=False)
            self._finish(run, self._result(run, st))


def _replace(cs: ContainerSpec, **changes: Any) -> ContainerSpec:
    return dataclasses.replace(cs, **changes)


def _spec_limits(cs: ContainerSpec) -> tuple[int | None, float | None, int | None]:
    """The limits a container spec asks for: memory bytes, CPUs (quota / period), pids."""
    cpus = (cs.cpu_quota_us / cs.cpu_period_us
            if cs.cpu_quota_us is not None and cs.cpu_period_us else None)
    return cs.memory_bytes, cpus, cs.pids_limit


def _enforcement_of(st: ContainerState, applied: dict[str, AppliedLimit]) -> Enforcement:
    """What the kernel applied to the probe container, as the executor's Enforcement."""
    def on(key: str) -> bool:
        a = applied.get(key)
        return a is not None and a.applied is not None
    notes = [f"{key.replace('_bytes', '')} limit {a.how}" for key, a in applied.items()
             if a.requested is not None and a.applied is None]
    return Enforcement(isolation="container", memory=on("memory_bytes"), cpu=on("cpus"),
                       pids=on("pids"), network_isolated=st.network_mode in ("none", ""),
                       readonly_root=st.read_only, notes=tuple(notes))


def _pip_init() -> str:
    import pip

    return str(pip.__file__)
