"""The venv task's namespaces as a unit: real unshare, real mounts (root only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivemind.executors.namespaces import sandbox_init_argv, sandbox_init_binary, unshare_argv

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and mounts need root here")


@pytest.fixture(params=["compiled", "shell"])
def compiled(request: pytest.FixtureRequest) -> bool:
    """Both inits: the compiled one (native/sandbox-init, built by scripts/setup) and the
    shell one it replaces where it is not built; they must do the same."""
    if request.param == "compiled":
        assert sandbox_init_binary() is not None, "hm-sandbox-init is not built: make -C native"
    return bool(request.param == "compiled")


@pytest.fixture
def tasks() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hm-ns-", dir="/var/lib"))
    yield d
    subprocess.run(["umount", "-l", str(d / "other" / "workspace")], capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


def test_a_task_neither_sees_nor_pins_another_task_s_mounts(tasks: Path, compiled: bool) -> None:
    mine, other = tasks / "mine" / "workspace", tasks / "other" / "workspace"
    mine.mkdir(parents=True)
    other.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "hm-other", str(other)], check=True)
    (other / "secret").write_text("x")
    argv = [*unshare_argv(net=True),
            *sandbox_init_argv([str(mine)], 1 << 20, writable=str(mine), hide_under=str(tasks),
                               compiled=compiled),
            "sh", "-c", f'ls {other}; echo ok > {mine}/w; echo started; sleep 30']
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout is not None
        first = p.stdout.readline().strip()
        assert first == "started"                          # `ls` printed nothing: not its mount
        assert (mine / "w").read_text() == "ok\n"          # its own workspace is writable
        # The host can take the other mount away and remove its dir while the task runs.
        subprocess.run(["umount", str(other)], check=True)
        other.rmdir()
    finally:
        os.killpg(p.pid, 9)
        p.wait()


def test_private_dirs_read_only_root_and_kept_paths_under_a_private_dir(compiled: bool) -> None:
    """A kept path under /var/tmp (as test state dirs are) survives the tmpfs that hides the
    rest of /var/tmp; /tmp is empty and private; / is read-only but the workspace is not."""
    base = Path(tempfile.mkdtemp(prefix="hm-ns-keep-", dir="/var/tmp"))
    ws, venv = base / "workspace", base / "venv"
    ws.mkdir()
    venv.mkdir()
    (venv / "marker").write_text("venv")
    (base / "sibling").write_text("hidden")
    host_tmp = Path(tempfile.mkstemp(prefix="hm-ns-host-", dir="/tmp")[1])
    script = (f'cat {venv}/marker; echo; ls -A /tmp | wc -l; '
              f'[ -e {base}/sibling ] && echo sibling-seen || echo sibling-hidden; '
              f'touch /etc/hm-ns-probe 2>/dev/null && echo root-writable || echo root-ro; '
              f'echo w > {ws}/out && echo ws-writable; pwd; touch /tmp/mine && echo tmp-writable')
    try:
        argv = [*unshare_argv(net=True),
                *sandbox_init_argv([str(ws), str(venv)], 1 << 20, writable=str(ws),
                                   compiled=compiled),
                "sh", "-c", script]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ws)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["venv", "0", "sibling-hidden", "root-ro", "ws-writable",
                                      str(ws), "tmp-writable"]
        assert (ws / "out").read_text() == "w\n"
        assert not Path("/etc/hm-ns-probe").exists() and not Path("/tmp/mine").exists()
    finally:
        host_tmp.unlink()
        shutil.rmtree(base, ignore_errors=True)


def test_the_compiled_init_refuses_bad_arguments_before_running_anything() -> None:
    binary = sandbox_init_binary()
    assert binary is not None, "hm-sandbox-init is not built: make -C native"
    for args in ([], ["--tmpfs-kib", "x", "--", "true"], ["--bogus", "--", "true"],
                 ["--tmpfs-kib", "8", "/nonexistent-keep", "--", "true"], ["--tmpfs-kib", "8", "--"]):
        out = subprocess.run([*unshare_argv(net=False), str(binary), *args],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 125 and out.stderr.startswith("hm-sandbox-init: "), (args, out)
