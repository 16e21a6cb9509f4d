"""The venv fallback executor: tasks run as plain processes, in a cached venv, with rlimits.

Lifecycle of one task (the calling rules are in base.py):

    prepare ──> start ──> running ──┬─> main process exits ──> group killed ──> output drained ──> done
      (pip)      │         │  ^     ├─> stop(): TERM group, grace, KILL ──────────────────────────┘
                 │         │  │     └─> timeout: same as stop, reason TIMED_OUT
                 │   daemon restart: recover() reattaches (poll the pid, tail the logs)
                 └─> spawn failed: done at once, FAILED_TO_START

How a task is started (no Python code runs between fork and exec, see proc.py):

    [unshare --pid --fork --mount-proc [--net] -- sh -c SANDBOX_INIT ...]   (namespaces.py)
        [setpriv --reuid=TASK_UID --regid=TASK_UID --clear-groups --no-new-privs] prlimit ... --
        sh -c 'exec 3<&0 </dev/null; "$@" 3>&-; echo $? >&3' hivemind-task ENTRY...

One task, one identity, one world (when the worker is root): each running task gets a uid of
its own from `executor.venv.uid_range_*` (task_identity.py), a workspace 0700 owned by it, and
its own PID and mount namespaces with private /tmp, /var/tmp and /dev/shm. Whatever the host
can't give is listed in status and in the task's record (`isolation` in the handle state).

- Its own session and process group (start_new_session); cwd = workspace; an environment built
  from nothing (PATH to the venv, HOME = workspace, LANG, PYTHONUNBUFFERED, the task's env, and
  HIVEMIND_TASK_ID used to find processes that left the group).
- stdout and stderr go to files under STATE_DIR/venv-tasks/<task_id>/ which reader threads
  tail; a restarted daemon tails them again from the offsets saved about once a second, so a
  few lines may be sent twice after a restart, none lost. stdin is the exit-code file: the sh
  wrapper moves it to fd 3, gives the task /dev/null, and writes the task's exit status there,
  so a daemon that is no longer the parent still learns the exit code.
- When the main process exits, whatever is left of its process group is killed (as a
  container's PID 1 exit would), then the output is drained and `wait` returns.

Limits: RLIMIT_AS = Limits.memory_bytes (virtual memory, per process), RLIMIT_NPROC (per user:
shared by every process of the task user), RLIMIT_NOFILE, RLIMIT_CPU (backstop for the wall
clock timeout, which the executor enforces itself). No CPU quota, no cgroup. Network isolation
with `unshare --net` (an empty namespace, loopback down) when the worker is root.

Out of memory is best effort: a nonzero exit whose last stderr lines show MemoryError,
"Cannot allocate memory", std::bad_alloc or "out of memory", or a SIGKILL we didn't send (the
kernel OOM killer), is reported as OUT_OF_MEMORY.

Escaped processes: a task that calls setsid leaves the group, not its PID namespace: when the
task's first process exits, the kernel kills the rest. Without namespaces (not root) the
executor also kills processes that still carry HIVEMIND_TASK_ID=<id> in their environment; a
task that clears its environment then escapes, which status says.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hivemind.config import RequirementsConfig, VenvConfig
from hivemind.errors import TaskNotFound
from hivemind.executors.base import (
    Enforcement,
    ExecutorStatus,
    ExitReason,
    ExitResult,
    OutputSink,
    TaskHandle,
    TaskSpec,
    Usage,
)
from hivemind.executors.namespaces import (
    NamespaceSupport,
    probe_namespaces,
    sandbox_init_argv,
    unshare_argv,
)
from hivemind.executors.proc import (
    FileTailer,
    RLimits,
    TaskUser,
    chown_tree,
    clamp_to_hard,
    find_marked,
    group_members,
    lookup_user,
    may_access,
    process_start_time,
    same_process,
    sample_group,
    signal_group,
    wait_gone,
    write_atomic,
)
from hivemind.executors.task_identity import NoFreeUid, UidPool, range_conflicts
from hivemind.executors.venv_cache import VenvCache

HANDLE_VERSION = 1
MARKER_ENV = "HIVEMIND_TASK_ID"
_WRAPPER = 'exec 3<&0 </dev/null; "$@" 3>&-; echo $? >&3'
_SAMPLE_S = 1.0
_GONE_S = 10.0       # how long a SIGKILLed process may take to die before we give up waiting
_OOM_PATTERNS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory")
_SIGXCPU_CODES = (128 + signal.SIGXCPU, -signal.SIGXCPU)


@dataclass
class _Task:
    task_id: str
    log_dir: Path
    workspace: Path
    started_at: float
    deadline: float
    uid: int | None
    own_uid: bool = False                           # uid came from the pool: release it at cleanup
    isolation: dict[str, Any] = field(default_factory=dict)
    pid: int = 0
    create_time: float = 0.0
    proc: subprocess.Popen[bytes] | None = None    # None after recover: not our child
    pidfd: int = -1
    tailers: list[FileTailer] = field(default_factory=list)
    output_bytes: int = 0              # per-stream cap of what the tailers read (0: none)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)
    result: ExitResult | None = None
    stop_requested: bool = False
    timed_out: bool = False
    reaped: bool = False
    peak_rss: int = 0
    peak_cpu: float = 0.0
    last_usage: tuple[float, float] | None = None  # (monotonic, cpu seconds) at the last stats()


class VenvExecutor:
    """Executor for machines where Podman is unusable (or `executor.kind: venv`)."""

    name = "venv"

    def __init__(self, cfg: VenvConfig, state_dir: Path, logger: logging.Logger, node_id: str, *,
                 prepare_timeout_s: float = 600.0, stop_grace_s: float = 10.0,
                 is_root: bool | None = None, clock: Callable[[], float] = time.time,
                 requirements: RequirementsConfig | None = None) -> None:
        self._cfg = cfg
        self._log = logger
        self._node_id = node_id
        self._prepare_timeout_s = prepare_timeout_s
        self._stop_grace_s = stop_grace_s
        self._root = os.geteuid() == 0 if is_root is None else is_root
        self._clock = clock
        self._tasks_dir = state_dir / "venv-tasks"
        self._python = cfg.python or default_python()
        self._user: TaskUser | None = None
        self._user_error = ""
        if self._root:
            try:
                self._user = lookup_user(cfg.task_user)
            except KeyError:
                self._user_error = f"executor.venv.task_user {cfg.task_user!r} does not exist"
        self.cache = VenvCache(Path(cfg.cache_dir) if cfg.cache_dir else state_dir / "venvs",
                               self._python, logger, build_user=self._user,
                               requirements=requirements)
        self._uids: UidPool | None = None
        self._uid_error = ""
        if self._root and cfg.uid_range_size > 0:
            conflicts = range_conflicts(cfg.uid_range_start, cfg.uid_range_size)
            if conflicts:
                self._uid_error = (f"executor.venv.uid_range_start..+uid_range_size overlaps "
                                   f"{', '.join(conflicts[:3])}; move the range")
            else:
                self._uids = UidPool(cfg.uid_range_start, cfg.uid_range_size)
        self._ns: NamespaceSupport | None = None
        self._netns: bool | None = None
        self._tasks: dict[str, _Task] = {}
        self._lock = threading.Lock()

    # -- probe -------------------------------------------------------------------------------

    def probe(self) -> ExecutorStatus:
        try:
            return self._probe()
        except Exception as exc:  # probe reports, never raises
            return ExecutorStatus(self.name, False, f"probe failed: {type(exc).__name__}: {exc}")

    def _probe(self) -> ExecutorStatus:
        problems: list[str] = []
        if not os.access(self._python, os.X_OK):
            problems.append(f"interpreter {self._python} is not executable")
        tools = ["prlimit", "sh"] + (["setpriv"] if self._root else [])
        problems += [f"{t} not found (util-linux/dash)" for t in tools if shutil.which(t) is None]
        if self._user_error:
            problems.append(self._user_error)
        if self._user is not None:
            if not may_access(Path(os.path.realpath(self._python)), self._user, os.R_OK | os.X_OK):
                problems.append(f"task user {self._user.name} can't run {self._python}; "
                                "set executor.venv.python to an interpreter outside private dirs")
            cache = self.cache.root
            existing = next((p for p in [cache, *cache.parents] if p.exists()), Path("/"))
            if not may_access(existing, self._user, os.X_OK):
                problems.append(f"task user {self._user.name} can't reach {cache}; make its parents o+x")
        if self._uid_error:
            problems.append(self._uid_error)
        if problems:
            return ExecutorStatus(self.name, False, "; ".join(problems))
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.cache.interpreter_id()
        notes = ["weaker isolation: venv fallback (processes on the host, no container)",
                 "memory: RLIMIT_AS per process (virtual memory), no cgroup limit",
                 "pids: RLIMIT_NPROC counts every process of the task's uid",
                 "cpu: no quota (RLIMIT_CPU only as a timeout backstop)"]
        if self._user is None:
            notes.append("worker is not root: tasks run as the worker's own user and can read its files")
        elif self._uids is None:
            notes.append(f"identity: every task runs as {self._user.name} (executor.venv.uid_range_size 0): "
                         "tasks can reach each other")
        else:
            notes.append(f"identity: a uid of its own per task ({self._uids.first}.."
                         f"{self._uids.first + self._uids.count - 1})")
        ns = self._namespaces()
        notes.append("filesystem: the host's, read-only but for the workspace (readable as the task's uid)"
                     if ns.pid_mount else "readonly root: no, the task sees the host filesystem as its user")
        notes.append("processes: own PID namespace; private /tmp, /var/tmp, /dev/shm, /run/lock" if ns.pid_mount
                     else f"processes: no PID/mount namespace ({ns.why_not}): a task sees every "
                          "host process, shares /tmp, and a process that clears its environment "
                          "and calls setsid can outlive it")
        net = self._netns_works()
        notes.append("network: empty network namespace (unshare --net)" if net
                     else "network: not isolated (unshare --net needs root)")
        enforcement = Enforcement(isolation="process", memory=True, cpu=False, pids=True,
                                  network_isolated=net, readonly_root=ns.pid_mount,
                                  notes=tuple(notes))
        who = self._user.name if self._user else "the worker's user"
        return ExecutorStatus(self.name, True, f"venv tasks as {who} with {self._python}", enforcement)

    def _namespaces(self) -> NamespaceSupport:
        if self._ns is None:
            self._ns = probe_namespaces(self._root)
        return self._ns

    def isolation_facts(self, uid: int | None, own_uid: bool) -> dict[str, Any]:
        """What this task really gets; goes into its handle state and its record."""
        ns = self._namespaces()
        facts: dict[str, Any] = {
            "uid": uid, "uid_per_task": own_uid, "pid_namespace": ns.pid_mount,
            "private_tmp": ns.pid_mount, "readonly_root": ns.pid_mount,
            "network_namespace": self._netns_works()}
        missing = [k for k in ("uid_per_task", "pid_namespace", "private_tmp") if not facts[k]]
        if missing:
            facts["not_applied"] = missing
            facts["why"] = "the worker is not root" if not self._root else (
                ns.why_not or "executor.venv.uid_range_size is 0")
        return facts

    def _netns_works(self) -> bool:
        if self._netns is None:
            self._netns = False
            if self._root and shutil.which("unshare"):
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    self._netns = subprocess.run(
                        ["unshare", "--net", "--", "true"], stdin=subprocess.DEVNULL,
                        capture_output=True, timeout=10, env={}).returncode == 0
        return self._netns

    # -- prepare / start -----------------------------------------------------------------------

    def prepare(self, spec: TaskSpec, sink: OutputSink, cancel: threading.Event) -> None:
        self.cache.ensure(spec.requirements, sink, cancel, self._prepare_timeout_s)

    def start(self, spec: TaskSpec, sink: OutputSink) -> TaskHandle:
        """Start the task. Never raises for a task that can't start: `wait` then reports
        FAILED_TO_START with the reason (the returned handle recovers to TaskNotFound)."""
        with self._lock:
            old = self._tasks.get(spec.task_id)
            if old is not None and not old.done.is_set():
                raise ValueError(f"task {spec.task_id} is already running")
        now = self._clock()
        timeout = min(spec.limits.timeout_s, spec.entry.timeout_s or math.inf)
        task = _Task(task_id=spec.task_id, log_dir=self._tasks_dir / spec.task_id,
                     workspace=spec.workspace, started_at=now, deadline=now + timeout,
                     uid=self._user.uid if self._user else None,
                     output_bytes=spec.limits.output_bytes)
        with self._lock:
            self._tasks[spec.task_id] = task
        try:
            user = self._user
            if self._uids is not None:
                try:
                    user = self._uids.allocate(spec.task_id)
                except NoFreeUid as exc:
                    raise _StartError(str(exc)) from None
                task.uid, task.own_uid = user.uid, True
            task.isolation = self.isolation_facts(task.uid, task.own_uid)
            argv, env = self._command(spec, timeout, user)
            self._spawn(task, spec, argv, env)
        except _StartError as exc:
            self._finish_failed(task, str(exc))
            return self._handle(task)
        self._start_threads(task, sink, offsets=(0, 0))
        return self._handle(task)

    def _command(self, spec: TaskSpec, timeout: float, user: TaskUser | None
                 ) -> tuple[list[str], dict[str, str]]:
        venv = self.cache.lookup(spec.requirements)
        if venv is None:
            raise _StartError("no venv for this task's requirements: prepare() did not run or failed")
        if not spec.entry.argv:
            raise _StartError("empty entry command")
        path = f"{venv}/bin:{self._cfg.task_path}"
        env = {k: v for k, v in spec.env.items() if "\0" not in k + v and "=" not in k and k}
        env.update(PATH=path, HOME=str(spec.workspace), LANG="C.UTF-8", PYTHONUNBUFFERED="1",
                   VIRTUAL_ENV=str(venv), **{MARKER_ENV: spec.task_id})
        entry = list(spec.entry.argv)
        exe = entry[0]
        found = (spec.workspace / exe) if "/" in exe else shutil.which(exe, path=path)
        if found is None or not os.path.exists(found):
            raise _StartError(f"entry command {exe!r} not found in the venv or {self._cfg.task_path}")
        if user is not None and not may_access(spec.workspace.parent, user, os.X_OK):
            raise _StartError(f"task user {user.name} can't reach the workspace; "
                              "make the state dir's parents o+x")
        limits = RLimits(
            address_space=spec.limits.memory_bytes,
            nproc=clamp_to_hard(resource.RLIMIT_NPROC, self._cfg.nproc),
            nofile=clamp_to_hard(resource.RLIMIT_NOFILE, self._cfg.nofile),
            cpu_soft=math.ceil(min(timeout, 10**9) * max(1.0, spec.limits.cpus)) + 5,
            cpu_hard=math.ceil(min(timeout, 10**9) * max(1.0, spec.limits.cpus)) + 10)
        argv: list[str] = []
        net = not spec.limits.network and self._netns_works()
        if self._namespaces().pid_mount:
            keep = [str(spec.workspace), str(venv)]
            # Other tasks' dirs sit next to this one (STATE/tasks/ID/workspace).
            argv += unshare_argv(net=net) + sandbox_init_argv(
                keep, spec.limits.tmpfs_bytes, writable=str(spec.workspace),
                hide_under=str(spec.workspace.parent.parent))
        elif net:
            argv += ["unshare", "--net", "--"]
        if user is not None:
            argv += ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
                     "--clear-groups", "--no-new-privs", "--bounding-set=-all", "--"]
        argv += limits.prlimit_argv() + ["sh", "-c", _WRAPPER, "hivemind-task", *entry]
        return argv, env

    def _spawn(self, task: _Task, spec: TaskSpec, argv: list[str], env: dict[str, str]) -> None:
        if task.log_dir.exists():
            shutil.rmtree(task.log_dir)
        task.log_dir.mkdir(parents=True, mode=0o700)
        if task.uid is not None and self._root:
            gid = task.uid if task.own_uid else (self._user.gid if self._user else task.uid)
            chown_tree(spec.workspace, task.uid, gid)
            # Only the task (and root) may enter its workspace.
            os.chmod(spec.workspace, 0o700)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        fds = [os.open(task.log_dir / n, flags, 0o600) for n in ("exit", "stdout.log", "stderr.log")]
        try:
            task.proc = subprocess.Popen(
                argv, cwd=spec.workspace, env=env, stdin=fds[0], stdout=fds[1], stderr=fds[2],
                start_new_session=True, close_fds=True)
        except OSError as exc:
            raise _StartError(f"could not start the task: {exc.strerror}") from None
        finally:
            for fd in fds:
                os.close(fd)
        task.pid = task.proc.pid
        task.pidfd = os.pidfd_open(task.pid)
        task.create_time = process_start_time(task.pid) or 0.0
        write_atomic(task.log_dir / "task.json", json.dumps(self._state(task)))
        self._log.info("task %s started as pid %d", task.task_id, task.pid)

    def _state(self, task: _Task) -> dict[str, Any]:
        return {"pid": task.pid, "pgid": task.pid, "create_time": task.create_time,
                "started_at": task.started_at, "deadline": task.deadline,
                "workspace": str(task.workspace), "log_dir": str(task.log_dir), "uid": task.uid,
                "own_uid": task.own_uid, "isolation": task.isolation,
                "output_bytes": task.output_bytes}

    def _handle(self, task: _Task) -> TaskHandle:
        return TaskHandle(version=HANDLE_VERSION, task_id=task.task_id, executor=self.name,
                          state=self._state(task))

    def _start_threads(self, task: _Task, sink: OutputSink, offsets: tuple[int, int]) -> None:
        for stream, offset in zip(("stdout", "stderr"), offsets, strict=True):
            t = FileTailer(task.log_dir / f"{stream}.log", stream, sink, self._log, offset=offset,
                           offset_file=task.log_dir / f"{stream}.offset", clock=self._clock,
                           max_bytes=task.output_bytes)
            t.start()
            task.tailers.append(t)
        threading.Thread(target=self._watch, args=(task,), name=f"venv-wait-{task.task_id}",
                         daemon=True).start()

    # -- recover -------------------------------------------------------------------------------

    def recover(self, handle: TaskHandle, sink: OutputSink,
                resume: Mapping[str, int] | None = None) -> None:
        if handle.executor != self.name or handle.version != HANDLE_VERSION:
            raise TaskNotFound(f"handle of {handle.executor} v{handle.version} is not a venv v1 handle")
        st = handle.state
        with self._lock:
            if handle.task_id in self._tasks:
                return
        log_dir = Path(st["log_dir"])
        task = _Task(task_id=handle.task_id, log_dir=log_dir, workspace=Path(st["workspace"]),
                     started_at=float(st["started_at"]), deadline=float(st["deadline"]),
                     uid=st.get("uid"), own_uid=bool(st.get("own_uid")),
                     isolation=dict(st.get("isolation") or {}),
                     pid=int(st["pid"]), create_time=float(st["create_time"]),
                     output_bytes=int(st.get("output_bytes", 0)))
        if task.own_uid and task.uid is not None and self._uids is not None:
            self._uids.claim(task.uid, task.task_id)
        alive = task.pid > 0 and same_process(task.pid, task.create_time)
        if alive:
            try:
                task.pidfd = os.pidfd_open(task.pid)
            except ProcessLookupError:
                alive = False
            # The pid might have been reused between the check and pidfd_open: check again.
            if alive and not same_process(task.pid, task.create_time):
                os.close(task.pidfd)
                task.pidfd, alive = -1, False
        if not alive and _read_exit_code(log_dir) is None:
            raise TaskNotFound(f"task {handle.task_id}: no process and no exit status left")
        with self._lock:
            self._tasks[task.task_id] = task
        # The sink's record beats our own offset files, which are saved about once a second.
        offsets = tuple(resume[s] if resume is not None and s in resume else
                        (0 if resume is not None else _read_offset(log_dir, s))
                        for s in ("stdout", "stderr"))
        self._start_threads(task, sink, offsets=(offsets[0], offsets[1]))
        self._log.info("task %s recovered (%s)", task.task_id, "running" if alive else "exited")

    # -- waiting -------------------------------------------------------------------------------

    def _watch(self, task: _Task) -> None:
        poller = select.poll()
        if task.pidfd >= 0:
            poller.register(task.pidfd, select.POLLIN)
        try:
            while task.pidfd >= 0:
                left = task.deadline - self._clock()
                if left <= 0 and not task.timed_out:
                    task.timed_out = True
                    self._log.info("task %s timed out; stopping it", task.task_id)
                    threading.Thread(target=self._terminate, args=(task, self._stop_grace_s),
                                     daemon=True).start()
                wait_s = _SAMPLE_S if task.timed_out else min(_SAMPLE_S, max(left, 0.0))
                if poller.poll(wait_s * 1000):
                    break
                self._sample(task)
            self._collect(task)
        except Exception:
            self._log.exception("watching task %s failed", task.task_id)
            if not task.done.is_set():
                self._finish_failed(task, "internal error while watching the task", lost=True)

    def _sample(self, task: _Task) -> None:
        s = sample_group(task.pid)
        task.peak_rss = max(task.peak_rss, s.rss_bytes)
        task.peak_cpu = max(task.peak_cpu, s.cpu_seconds)

    def _collect(self, task: _Task) -> None:
        code: int | None = None
        cpu: float | None = task.peak_cpu or None
        with task.lock:
            # A child that exited is a zombie until reaped, holding its pgid: the group can be
            # killed without hitting a reused pgid. Kill first, reap after.
            if task.proc is not None:
                signal_group(task.pid, signal.SIGKILL)
                wait_gone(lambda: group_members(task.pid), _GONE_S)
                _, status, ru = os.wait4(task.pid, 0)
                task.proc.returncode = code = os.waitstatus_to_exitcode(status)
                task.peak_rss = max(task.peak_rss, ru.ru_maxrss * 1024)
                cpu = max(cpu or 0.0, ru.ru_utime + ru.ru_stime)
            else:
                self._kill_members(task, signal.SIGKILL)
                wait_gone(lambda: self._members(task), _GONE_S)
            task.reaped = True
            if task.pidfd >= 0:
                os.close(task.pidfd)
                task.pidfd = -1
        self._kill_escaped(task)
        for t in task.tailers:
            t.finish()
        file_code = _read_exit_code(task.log_dir)
        if file_code is not None:
            code = file_code
        reason, message = self._reason(task, code)
        result = ExitResult(exit_code=code, reason=reason, started_at=task.started_at,
                            finished_at=self._clock(), peak_memory_bytes=task.peak_rss or None,
                            cpu_seconds=cpu, message=message)
        with contextlib.suppress(OSError):
            write_atomic(task.log_dir / "result.json", json.dumps({"exit_code": code, "reason": reason}))
        task.result = result
        task.done.set()
        self._log.info("task %s ended: %s, exit code %s", task.task_id, reason, code)

    def _reason(self, task: _Task, code: int | None) -> tuple[ExitReason, str]:
        if task.stop_requested:
            return ExitReason.STOPPED, "stopped"
        if task.timed_out:
            return ExitReason.TIMED_OUT, "wall-clock timeout reached"
        if code in _SIGXCPU_CODES:
            return ExitReason.TIMED_OUT, "CPU time limit reached"
        if code is not None and code != 0:
            tail = [line for t in task.tailers if t.stream == "stderr" for line in t.last_lines]
            if any(p in line for line in tail for p in _OOM_PATTERNS):
                return ExitReason.OUT_OF_MEMORY, "out of memory (address-space limit)"
            if code in (137, -9):
                return ExitReason.OUT_OF_MEMORY, "killed by SIGKILL, probably the kernel OOM killer"
        return ExitReason.EXITED, "" if code is not None else "exit code unknown"

    def _finish_failed(self, task: _Task, message: str, lost: bool = False) -> None:
        now = self._clock()
        task.result = ExitResult(exit_code=None,
                                 reason=ExitReason.LOST if lost else ExitReason.FAILED_TO_START,
                                 started_at=task.started_at, finished_at=now, message=message)
        task.done.set()
        self._log.warning("task %s failed to start: %s", task.task_id, message)

    def wait(self, task_id: str, timeout: float | None = None) -> ExitResult | None:
        task = self._get(task_id)
        if not task.done.wait(timeout):
            return None
        return task.result

    # -- stop / stats / cleanup --------------------------------------------------------------

    def stop(self, task_id: str, grace: float) -> None:
        task = self._get(task_id)
        if task.done.is_set():
            return
        task.stop_requested = True
        self._terminate(task, grace)
        task.done.wait(grace + 30)

    def _terminate(self, task: _Task, grace: float) -> None:
        """TERM to the group, up to `grace` seconds for the main process, then KILL."""
        if not self._signal(task, signal.SIGTERM):
            return
        poller = select.poll()
        with task.lock:
            fd = os.dup(task.pidfd) if task.pidfd >= 0 else -1
        if fd >= 0:
            try:
                poller.register(fd, select.POLLIN)
                poller.poll(max(grace, 0.0) * 1000)
            finally:
                os.close(fd)
        self._signal(task, signal.SIGKILL)
        self._kill_escaped(task)

    def _signal(self, task: _Task, sig: int) -> bool:
        with task.lock:
            if task.reaped:
                return False
            if task.proc is not None:      # our unreaped child holds the pgid: killpg is safe
                signal_group(task.pid, sig)
            else:
                self._kill_members(task, sig)
            return True

    def _kill_members(self, task: _Task, sig: int) -> None:
        """Signal a recovered task's group member by member: its leader may have been reaped by
        init and its pgid reused, so only processes of the task user that started after the task
        are signalled."""
        for pid in self._members(task):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def _members(self, task: _Task) -> list[int]:
        import psutil

        found: list[int] = []
        for pid in group_members(task.pid):
            try:
                p = psutil.Process(pid)
                if (p.create_time() >= task.create_time - 0.1
                        and (task.uid is None or p.uids().real == task.uid)):
                    found.append(pid)
            except psutil.Error:
                continue
        return found

    def _kill_escaped(self, task: _Task) -> None:
        pids = find_marked(MARKER_ENV, task.task_id, task.uid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if pids:
            wait_gone(lambda: pids, _GONE_S)

    def stats(self, task_id: str) -> Usage | None:
        with self._lock:
            task = self._tasks.get(task_id)
        if task is None or task.done.is_set():
            return None
        s = sample_group(task.pid)
        now = time.monotonic()
        task.peak_rss = max(task.peak_rss, s.rss_bytes)
        prev = task.last_usage
        task.last_usage = (now, s.cpu_seconds)
        cores = 0.0
        if prev is not None and now > prev[0]:
            cores = max(0.0, (s.cpu_seconds - prev[1]) / (now - prev[0]))
        return Usage(cpu_cores=cores, memory_bytes=s.rss_bytes, pids=s.pids)

    def cleanup(self, task_id: str) -> None:
        with self._lock:
            task = self._tasks.get(task_id)
        if task is not None and not task.done.is_set():
            task.stop_requested = True
            self._terminate(task, 0.0)
            task.done.wait(30)
        if task is not None:
            for t in task.tailers:
                t.finish()
        log_dir = task.log_dir if task else self._tasks_dir / task_id
        if task is None:
            self._kill_registered(log_dir)
        shutil.rmtree(log_dir, ignore_errors=True)
        with self._lock:
            self._tasks.pop(task_id, None)
        if task is not None and task.own_uid and task.uid is not None and self._uids is not None:
            # Only once its processes are gone; allocate() re-checks /proc before reuse anyway.
            self._uids.release(task.uid)

    def _kill_registered(self, log_dir: Path) -> None:
        """cleanup() of a task this object never saw: kill it from its registry record."""
        try:
            st = json.loads((log_dir / "task.json").read_text())
        except (OSError, ValueError):
            return
        pid, ct = int(st["pid"]), float(st["create_time"])
        if same_process(pid, ct):
            signal_group(pid, signal.SIGKILL)
            wait_gone(lambda: group_members(pid), _GONE_S)
        pids = find_marked(MARKER_ENV, log_dir.name, st.get("uid"))
        for p in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        wait_gone(lambda: pids, _GONE_S)

    def orphans(self) -> list[str]:
        """Ids of tasks in the registry (STATE_DIR/venv-tasks) whose process is still alive,
        whether or not this object knows them; the caller compares with its own handles."""
        found: list[str] = []
        if not self._tasks_dir.is_dir():
            return found
        for rec in sorted(self._tasks_dir.glob("*/task.json")):
            try:
                st = json.loads(rec.read_text())
            except (OSError, ValueError):
                continue
            if same_process(int(st["pid"]), float(st["create_time"])):
                found.append(rec.parent.name)
        return found

    def _get(self, task_id: str) -> _Task:
        with self._lock:
            task = self._tasks.get(task_id)
        if task is None:
            raise TaskNotFound(f"no venv task {task_id}")
        return task


class _StartError(Exception):
    pass


def default_python() -> str:
    """System python3 first: the worker's own interpreter may sit in a private dir (a pyenv
    under /root) the task user can't enter."""
    import sys

    for cand in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(cand, os.X_OK):
            return cand
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def _read_exit_code(log_dir: Path) -> int | None:
    try:
        text = (log_dir / "exit").read_text().strip()
    except OSError:
        return None
    return int(text) if text.lstrip("-").isdigit() else None


def _read_offset(log_dir: Path, stream: str) -> int:
    try:
        return int((log_dir / f"{stream}.offset").read_text())
    except (OSError, ValueError):
        return 0
