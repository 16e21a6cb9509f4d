"""VenvCache with real venvs and a real pip; LineSplitter as a unit."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivemind.config import RequirementsConfig
from hivemind.executors.base import OutputLine, PrepareCancelled
from hivemind.executors.proc import LineSplitter, lookup_user, may_access
from hivemind.executors.requirements import RequirementsRefused
from hivemind.executors.venv import default_python
from hivemind.executors.venv_cache import PrepareFailed, VenvCache

from pkgindex import make_wheel, serve_index

LOG = logging.getLogger("test.venv_cache")
IS_ROOT = os.geteuid() == 0


def _open_dir() -> Path:
    # pytest's tmp_path sits under a 0700 dir the task user can't enter.
    d = Path(tempfile.mkdtemp(prefix="hm-venv-"))
    d.chmod(0o755)
    return d


@pytest.fixture
def root() -> Iterator[Path]:
    d = _open_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_root() -> Iterator[Path]:
    d = _open_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_cache(root: Path, index_url: str = "") -> VenvCache:
    return VenvCache(root / "venvs", default_python(), LOG,
                     build_user=lookup_user("nobody") if IS_ROOT else None,
                     requirements=RequirementsConfig(index_url=index_url))


class Lines:
    def __init__(self) -> None:
        self.items: list[OutputLine] = []
        self.seen = threading.Event()
        self.wanted = ""

    def __call__(self, line: OutputLine) -> None:
        self.items.append(line)
        if self.wanted and self.wanted in line.text:
            self.seen.set()

    @property
    def texts(self) -> list[str]:
        return [x.text for x in self.items]


def processes_under(path: Path) -> list[int]:
    """Pids whose command line or cwd mentions `path`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{name}/cwd")
        except OSError:
            continue
        if str(path) in cmd or cwd.startswith(str(path)):
            found.append(int(name))
    return found


# -- LineSplitter ----------------------------------------------------------------------------

def test_splitter_lines_partial_and_crlf() -> None:
    s = LineSplitter()
    assert s.feed(b"a\nb") == ["a"]
    assert s.pending == 1
    assert s.feed(b"c\r\nd\n") == ["bc", "d"]
    assert s.feed(b"tail") == []
    assert s.flush() == ["tail"]
    assert s.flush() == []


def test_splitter_cuts_long_lines_on_utf8_boundaries() -> None:
    s = LineSplitter(max_bytes=10)
    text = "é" * 12                               # 24 bytes, 2 per character
    out = s.feed(text.encode() + b"\n")
    assert "".join(out) == text
    assert all(len(p.encode()) <= 10 for p in out)
    assert "\ufffd" not in "".join(out)


def test_splitter_replaces_invalid_bytes() -> None:
    assert LineSplitter().feed(b"ok\xff\xfe\n") == ["ok\ufffd\ufffd"]


# -- cache -----------------------------------------------------------------------------------

def test_base_venv_built_once_and_found_by_another_process(root: Path) -> None:
    cache, lines = make_cache(root), Lines()
    path = cache.ensure(None, lines, threading.Event(), 60)
    assert (path / "bin" / "python").exists()
    assert cache.ensure(None, lines, threading.Event(), 60) == path
    assert cache.builds == 1
    other = make_cache(root)                       # a restarted daemon: a fresh object
    assert other.lookup(None) == path
    assert other.ensure(None, Lines(), threading.Event(), 60) == path
    assert other.builds == 0
    assert not list((root / "venvs").glob(".build-*"))


def test_key_depends_on_content_and_interpreter(root: Path) -> None:
    cache = make_cache(root)
    assert cache.key(b"six\n") == cache.key(b"six\n")
    assert cache.key(b"six\n") != cache.key(b"six==1.16.0\n")
    other = VenvCache(root / "venvs", "/usr/bin/env", LOG)
    other._interp_id = "/somewhere/else\n3.11.0"   # another interpreter, same content
    assert other.key(b"six\n") != cache.key(b"six\n")


@pytest.mark.slow
def test_real_pip_install_then_cached_without_pip(shared_root: Path) -> None:
    """Fetches a wheel from a local index once; the second prepare must use no pip and no network."""
    wheels = shared_root / "index"
    wheels.mkdir()
    make_wheel(wheels, "hmsix", "1.0", {"hmsix.py": "VALUE = 6\n"})
    req = shared_root / "requirements.txt"
    req.write_text("hmsix==1.0  # a comment\n")
    with serve_index(wheels) as index:
        cache, lines = make_cache(shared_root, index.url), Lines()
        path = cache.ensure(req, lines, threading.Event(), 300)
        assert any("hmsix" in t for t in lines.texts if not t.startswith("[hivemind]")), lines.texts
        assert all(x.stream == "prepare" for x in lines.items)
        fetched = len(index.hits)
        assert fetched >= 2                         # the project page and the wheel
        again = Lines()
        assert make_cache(shared_root, index.url).ensure(req, again, threading.Event(), 300) == path
        assert again.texts == []                    # no build step, no pip line
        assert len(index.hits) == fetched           # and no request to the index
    assert cache.builds == 1
    run = subprocess.run([str(path / "bin" / "python"), "-c", "import hmsix; print(hmsix.__file__)"],
                         capture_output=True, text=True, check=True)
    assert run.stdout.startswith(str(path))         # relocated from the build dir
    if IS_ROOT:
        nobody = lookup_user("nobody")
        assert may_access(path / "bin" / "python", nobody, os.X_OK)
        assert not may_access(path / "lib", nobody, os.W_OK)   # tasks can't poison it
        assert path.stat().st_uid == 0


@pytest.mark.slow
def test_cancel_during_pip_install_leaves_nothing(root: Path) -> None:
    # An index that accepts connections and never answers keeps pip busy deterministically.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    req = root / "requirements.txt"
    req.write_text("hivemind-no-such-package\n")
    cache, lines, cancel = make_cache(root, f"http://127.0.0.1:{port}/simple"), Lines(), threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            cache.ensure(req, lines, cancel, 120)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    try:
        srv.settimeout(60)
        conn, _ = srv.accept()                      # pip is now inside `pip download`
        assert processes_under(root / "venvs")
        cancel.set()
        t.join(30)
        conn.close()
    finally:
        srv.close()
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], PrepareCancelled)
    assert processes_under(root / "venvs") == []
    assert not list((root / "venvs").glob(".build-*"))
    assert cache.lookup(req) is None
    fd = os.open(root / "venvs" / ".locks" / f"{cache.key(req.read_bytes())}.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # raises if the lock were still held
    finally:
        os.close(fd)


def test_waiting_for_a_held_lock_honours_cancel_and_timeout(root: Path) -> None:
    cache = make_cache(root)
    (root / "venvs" / ".locks").mkdir(parents=True)
    fd = os.open(root / "venvs" / ".locks" / f"{cache.key(None)}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)                  # another builder of the same key
    try:
        lines = Lines()
        with pytest.raises(PrepareFailed, match="waiting"):
            cache.ensure(None, lines, threading.Event(), 0.2)
        assert any("waiting for another build" in t for t in lines.texts)
        cancel = threading.Event()
        cancel.set()
        with pytest.raises(PrepareCancelled):
            cache.ensure(None, Lines(), cancel, 60)
    finally:
        os.close(fd)
    assert cache.ensure(None, Lines(), threading.Event(), 60).exists()


def test_crashed_build_is_cleaned_up(root: Path) -> None:
    cache = make_cache(root)
    key = cache.key(None)
    stale = root / "venvs" / f".build-{key}-crashed"
    (stale / "venv" / "bin").mkdir(parents=True)
    # A process the crashed build left running, with its cwd in the build dir.
    orphan = subprocess.Popen(["sleep", "1000"], cwd=stale, start_new_session=True)
    try:
        path = cache.ensure(None, Lines(), threading.Event(), 60)
        assert orphan.wait(10) == -9
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
    assert not stale.exists()
    assert (path / "bin" / "python").exists()


def test_pip_failure_raises_prepare_failed(root: Path) -> None:
    empty = root / "index"
    empty.mkdir()
    req = root / "requirements.txt"
    req.write_text("hivemind-no-such-package\n")
    with serve_index(empty) as index:
        cache, lines = make_cache(root, index.url), Lines()
        with pytest.raises(PrepareFailed, match="pip download failed"):
            cache.ensure(req, lines, threading.Event(), 120)
    assert cache.lookup(req) is None
    assert not list((root / "venvs").glob(".build-*"))


def test_requirement_options_are_refused_before_anything_runs(root: Path) -> None:
    req = root / "requirements.txt"
    req.write_text("six\n--index-url http://127.0.0.1:1/simple\n")
    cache, lines = make_cache(root), Lines()
    with pytest.raises(RequirementsRefused, match="line 2: .*option '--index-url'"):
        cache.ensure(req, lines, threading.Event(), 120)
    assert lines.texts == []                        # not even a venv was created
    assert not (root / "venvs").exists() or not list((root / "venvs").iterdir())
