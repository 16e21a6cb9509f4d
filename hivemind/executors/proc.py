"""Process helpers for the venv executor: line splitting, log tailing, process groups, users.

Nothing here forks with Python code in the child: a Go runtime may live in the worker process
(the native metrics library) and hangs after a bare fork(), and preexec_fn is unsafe with
threads. Privilege drops and rlimits are therefore applied by exec wrappers (setpriv, prlimit).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import pwd
import resource
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hivemind.executors.base import OutputLine, OutputSink

MAX_LINE_BYTES = 8192
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class LineSplitter:
    """Bytes in, complete text lines out; a line longer than `max_bytes` is cut into pieces.

    Cuts never split a UTF-8 sequence (when the bytes are valid UTF-8), so each piece decodes
    cleanly; invalid bytes become U+FFFD.
    """

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        self._max = max_bytes
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held back because their line isn't complete yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[str]:
        return [text for text, _ in self.feed_sized(data)]

    def feed_sized(self, data: bytes) -> list[tuple[str, int]]:
        """Like `feed`, with the number of input bytes each line used up (its newline included)."""
        self._buf += data
        out: list[tuple[str, int]] = []
        while self._buf:
            nl = self._buf.find(b"\n", 0, self._max + 1)
            if nl != -1:
                out.append((_decode(self._buf[:nl]), nl + 1))
                del self._buf[: nl + 1]
            elif len(self._buf) > self._max:
                cut = _utf8_cut(self._buf, self._max)
                out.append((_decode(self._buf[:cut]), cut))
                del self._buf[:cut]
            else:
                break
        return out

    def flush(self) -> list[str]:
        if not self._buf:
            return []
        text = _decode(self._buf)
        self._buf.clear()
        return [text]


def _decode(raw: bytes | bytearray) -> str:
    return bytes(raw).decode("utf-8", errors="replace").removesuffix("\r")


def _utf8_cut(buf: bytearray, limit: int) -> int:
    cut = limit
    # Step back over continuation bytes (10xxxxxx) so a multi-byte character stays whole.
    while cut > limit - 3 and cut > 0 and (buf[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut if cut > 0 else limit


def emit(sink: OutputSink, stream: str, lines: list[str], clock: Callable[[], float],
         log: logging.Logger, positions: list[int] | None = None) -> None:
    for i, text in enumerate(lines):
        try:
            sink(OutputLine(ts=clock(), stream=stream, text=text,
                            pos=positions[i] if positions is not None else -1))
        except Exception:  # a broken sink must not stop the reader: the task keeps running
            log.exception("output sink failed; line dropped")


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc: ctypes.CDLL | None = None


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the disk blocks of [offset, offset+length) of a file, keeping its size (reads there
    give zeros). False where the filesystem can't (the file then just keeps its blocks)."""
    global _libc
    if length <= 0:
        return True
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return int(_libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                               offset, length)) == 0


class FileTailer(threading.Thread):
    """Follows a log file the task writes, from `offset`, and sends its lines to the sink.

    Tasks write to files rather than pipes so that a restarted daemon can keep streaming (a pipe
    dies with its reader, and the task would get SIGPIPE). Polling backs off from 1 ms to 50 ms
    while the file is idle, so a first line arrives within about a millisecond of being written.
    `finish()` drains what is left once the task's processes are gone and ends the thread.

    With `max_bytes`, only that much of the stream is read at all; the rest is punched out of
    the file unread (its blocks freed, offsets unchanged) as soon as it is seen, so a task
    printing without end holds about `max_bytes` of disk here, plus what it writes while the
    reader is not looking. What lies below the cap stays: a restarted daemon may resume from
    any offset its own log says it reached.
    """

    MIN_SLEEP = 0.001
    MAX_SLEEP = 0.05

    def __init__(self, path: Path, stream: str, sink: OutputSink, log: logging.Logger, *,
                 offset: int = 0, offset_file: Path | None = None,
                 clock: Callable[[], float] = time.time, keep_last: int = 20,
                 max_bytes: int = 0) -> None:
        super().__init__(name=f"tail-{path.name}", daemon=True)
        self._path = path
        self._stream = stream
        self._sink = sink
        self._log = log
        self._offset = offset            # bytes handed out as complete lines (or cut pieces)
        self._offset_file = offset_file
        self._saved_offset = offset
        self._saved_at = 0.0
        self._clock = clock
        self._split = LineSplitter()
        self._max_bytes = max_bytes
        self._punched_past = 0           # the file past the cap is punched out up to here
        self.discarded = 0               # bytes past max_bytes, never read
        self._finishing = threading.Event()
        self.last_lines: collections.deque[str] = collections.deque(maxlen=keep_last)

    @property
    def stream(self) -> str:
        return self._stream

    @property
    def offset(self) -> int:
        return self._offset

    def finish(self, timeout: float | None = 10.0) -> None:
        self._finishing.set()
        if self.is_alive():
            self.join(timeout)

    def _punch_past_cap(self, fd: int, size: int) -> None:
        start = max(self._max_bytes, self._punched_past)
        if size > start:
            punch_hole(fd, start, size - start)
            self._punched_past = size

    def run(self) -> None:
        try:
            with open(self._path, "r+b") as f:
                fd = f.fileno()
                f.seek(self._offset)
                read_pos = self._offset
                sleep = self.MIN_SLEEP
                while True:
                    finishing = self._finishing.is_set()
                    if self._max_bytes and read_pos >= self._max_bytes:
                        # At the cap: hand out the cut line, then skip everything new unread.
                        if self._split.pending:
                            pending = self._split.pending
                            self._deliver([(t, pending) for t in self._split.flush()])
                        size = os.fstat(fd).st_size
                        if size > read_pos:
                            self.discarded += size - read_pos
                            read_pos = self._offset = size
                            self._punch_past_cap(fd, size)
                            sleep = self.MIN_SLEEP
                            continue
                        if finishing:
                            break
                        self._save_offset(force=False)
                        self._finishing.wait(sleep)
                        sleep = min(sleep * 2, self.MAX_SLEEP)
                        continue
                    want = 65536 if not self._max_bytes else min(65536, self._max_bytes - read_pos)
                    data = f.read(want)
                    if data:
                        read_pos += len(data)
                        self._take(data)
                        if self._max_bytes:
                            # Behind the writer: what lies past the cap will never be read.
                            self._punch_past_cap(fd, os.fstat(fd).st_size)
                        sleep = self.MIN_SLEEP
                        continue
                    if finishing:  # read after the flag was seen: nothing more can come
                        pending = self._split.pending
                        rest = self._split.flush()
                        self._deliver([(t, pending) for t in rest])
                        break
                    self._save_offset(force=False)
                    self._finishing.wait(sleep)
                    sleep = min(sleep * 2, self.MAX_SLEEP)
        except OSError as exc:
            self._log.warning("stopped reading %s: %s", self._path.name, exc.strerror)
        finally:
            self._save_offset(force=True)

    def _take(self, data: bytes) -> None:
        self._deliver(self._split.feed_sized(data))

    def _deliver(self, sized: list[tuple[str, int]]) -> None:
        # Each line carries the file offset just past it, so a restarted worker resumes exactly
        # after the last line its log holds (OutputLine.pos).
        lines, positions = [], []
        for text, used in sized:
            self._offset += used
            lines.append(text)
            positions.append(self._offset)
        self.last_lines.extend(lines)
        emit(self._sink, self._stream, lines, self._clock, self._log, positions)

    def _save_offset(self, *, force: bool) -> None:
        if self._offset_file is None or self._offset == self._saved_offset:
            return
        now = time.monotonic()
        if not force and now - self._saved_at < 1.0:
            return
        self._saved_at = now
        with contextlib.suppress(OSError):
            write_atomic(self._offset_file, str(self._offset))
            self._saved_offset = self._offset


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass(frozen=True)
class GroupSample:
    pids: int
    rss_bytes: int
    cpu_seconds: float                 # user+system of live members and the children they reaped


def group_members(pgid: int) -> list[int]:
    return [pid for pid, pg, _rss, _cpu in _proc_stats() if pg == pgid]


def sample_group(pgid: int) -> GroupSample:
    """Usage of the task started as process (group) `pgid`: its process group together with
    every descendant of `pgid`. Descendants count because a process group does not follow a task
    into its PID namespace (the sandbox's init starts it in a session of its own); the group
    counts because without a PID namespace an orphan leaves the tree but keeps the group."""
    stats: dict[int, tuple[int, float]] = {}
    children: dict[int, list[int]] = {}
    chosen: set[int] = set()
    for pid, ppid, pg, r, c in _proc_stats_with_parent():
        stats[pid] = (r, c)
        children.setdefault(ppid, []).append(pid)
        if pg == pgid:
            chosen.add(pid)
    todo = [pgid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in chosen:
                chosen.add(child)
                todo.append(child)
    n, rss, cpu = 0, 0, 0.0
    for pid in chosen & stats.keys():
        r, c = stats[pid]
        n, rss, cpu = n + 1, rss + r, cpu + c
    return GroupSample(pids=n, rss_bytes=rss, cpu_seconds=cpu)


def _proc_stats_with_parent() -> Iterator[tuple[int, int, int, int, float]]:
    """(pid, ppid, pgid, rss bytes, cpu seconds) of every live process, from /proc/PID/stat
    (one read each)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue  # exited while we looked
        # comm (field 2) may hold spaces and parentheses: split after its last ')'.
        fields = raw[raw.rfind(b")") + 2:].split()
        if len(fields) < 22 or fields[0] == b"Z":
            continue  # zombies hold no memory and can't be signalled; their reaper owns them
        ticks = sum(int(x) for x in fields[11:15])
        yield int(name), int(fields[1]), int(fields[2]), int(fields[21]) * _PAGE, ticks / _CLK_TCK


def _proc_stats() -> Iterator[tuple[int, int, int, float]]:
    """(pid, pgid, rss bytes, cpu seconds) of every live process."""
    for pid, _ppid, pgid, rss, cpu in _proc_stats_with_parent():
        yield pid, pgid, rss, cpu


def signal_group(pgid: int, sig: int) -> bool:
    """Signal a whole process group; False when it is already gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def is_running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2:][:1] != b"Z"


def wait_gone(pids: Callable[[], list[int]], timeout: float) -> bool:
    """Poll until `pids()` lists no running process: kill() only queues a signal, and the
    target dies when next scheduled. False if some were still running at `timeout`."""
    end = time.monotonic() + timeout
    delay = 0.001
    while any(is_running(p) for p in pids()):
        if time.monotonic() > end:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def find_marked(env_key: str, value: str, uid: int | None) -> list[int]:
    """Pids whose environment carries `env_key=value` (and, if given, owned by `uid`).

    Catches processes that left the task's process group (setsid, double fork) but kept the
    environment. Best effort: a task may clear its environment, and only root (or the same uid)
    can read another process's environ.
    """
    needle = f"{env_key}={value}".encode()
    found: list[int] = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            if uid is not None and os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(int(name))
    return found


def kill_by_cwd(prefix: Path) -> list[int]:
    """SIGKILL processes whose cwd lies under `prefix`: a build whose daemon crashed left them."""
    killed: list[int] = []
    root = str(prefix)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
            if cwd == root or cwd.startswith(root + "/"):
                os.kill(int(name), signal.SIGKILL)
                killed.append(int(name))
        except OSError:
            continue
    return killed


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (which may hold spaces and parentheses):
    [0] is the state, [19] the start time in clock ticks since boot."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].decode().split()


@functools.lru_cache(maxsize=1)
def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def process_start_time(pid: int) -> float | None:
    """When `pid` started, as psutil's create_time() says it (boot time + start ticks / CLK_TCK,
    so records written with either compare equal); with the pid it tells a process from a reused
    pid. Read from /proc: psutil would be ~1 MiB of the idle daemon for this one number."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    return _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def same_process(pid: int, create_time: float) -> bool:
    """The process `pid` started at `create_time` still runs (a zombie counts as gone)."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20 or fields[0] == "Z":
        return False
    return abs(_boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK") - create_time) < 0.1


@dataclass(frozen=True)
class TaskUser:
    name: str
    uid: int
    gid: int


def lookup_user(name: str) -> TaskUser:
    pw = pwd.getpwnam(name)
    return TaskUser(name=name, uid=pw.pw_uid, gid=pw.pw_gid)


def may_access(path: Path, user: TaskUser, want: int) -> bool:
    """Whether `user` (with only its primary group) can reach `path` and has `want` on it.

    `want` is a combination of os.R_OK, os.W_OK, os.X_OK. Judged from mode bits, since the
    worker (root) can't ask the kernel on another user's behalf.
    """
    p = Path(os.path.abspath(path))
    parts = [*reversed(p.parents), p]
    for i, part in enumerate(parts):
        try:
            st = os.stat(part)
        except OSError:
            return False
        need = want if i == len(parts) - 1 else os.X_OK
        if not _mode_allows(st, user, need):
            return False
    return True


def _mode_allows(st: os.stat_result, user: TaskUser, need: int) -> bool:
    if user.uid == 0:
        return True
    if st.st_uid == user.uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid == user.gid:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return bits & need == need


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """chown a tree without following symlinks (a task archive may contain hostile links)."""
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


def strip_group_other_write(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, ""]:
            p = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022:
                os.chmod(p, stat.S_IMODE(st.st_mode) & ~0o022)


@dataclass(frozen=True)
class RLimits:
    address_space: int
    nproc: int
    nofile: int
    cpu_soft: int
    cpu_hard: int

    def prlimit_argv(self) -> list[str]:
        return ["prlimit", f"--as={self.address_space}", f"--nproc={self.nproc}",
                f"--nofile={self.nofile}", f"--cpu={self.cpu_soft}:{self.cpu_hard}", "--"]


def clamp_to_hard(which: int, value: int) -> int:
    """Limits can only be lowered here (root lacks CAP_SYS_RESOURCE on some hosts)."""
    hard = resource.getrlimit(which)[1]
    return value if hard == resource.RLIM_INFINITY else min(value, hard)


def exit_signal_name(code: int) -> str:
    try:
        return signal.Signals(-code if code < 0 else code - 128).name
    except ValueError:
        return f"signal {code}"
