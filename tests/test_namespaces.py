"""The venv task's namespaces as a unit: real unshare, real mounts (root only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivemind.executors.namespaces import sandbox_init_argv, unshare_argv

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and mounts need root here")


@pytest.fixture
def tasks() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hm-ns-", dir="/var/lib"))
    yield d
    subprocess.run(["umount", "-l", str(d / "other" / "workspace")], capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


def test_a_task_neither_sees_nor_pins_another_task_s_mounts(tasks: Path) -> None:
    mine, other = tasks / "mine" / "workspace", tasks / "other" / "workspace"
    mine.mkdir(parents=True)
    other.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "hm-other", str(other)], check=True)
    (other / "secret").write_text("x")
    argv = [*unshare_argv(net=True),
            *sandbox_init_argv([str(mine)], 1 << 20, writable=str(mine), hide_under=str(tasks)),
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
