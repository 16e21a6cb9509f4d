"""Run-step attacks on Podman tasks from the host side: a person's account (uid 1000) reaching a
task's workspace and processes."""

from __future__ import annotations

import pwd
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from sandboxes import Lines, make_executor, open_dir

from hivemind.executors.base import Entry, Limits, TaskSpec

pytestmark = [pytest.mark.slow, pytest.mark.podman]
MiB = 1024 * 1024
HOST_UID = 1000


@pytest.fixture
def base() -> Iterator[Path]:
    d = open_dir("hm-sec-podman-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _as_uid(uid: int, script: str) -> str:
    """Run `script` (sh) as a plain account with that uid: no groups, no capabilities."""
    out = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                          "--inh-caps=-all", "--bounding-set=-all", "--", "sh", "-c", script],
                         capture_output=True, text=True, timeout=30)
    return out.stdout


ATTACK = ('cat "$1/secret.txt" >/dev/null 2>&1 && echo read-secret; '
          'echo tampered 2>/dev/null > "$1/result.txt" && echo rewrote-result; '
          'ls "$1" >/dev/null 2>&1 && echo listed; '
          'for p in $2; do kill -0 "$p" 2>/dev/null && echo signalled; done; true')


@pytest.mark.parametrize("kind", ["podman-rootful", "podman-rootless"])
def test_host_account_uid_1000_reads_a_task_workspace(kind: str, base: Path) -> None:
    """a host account with uid 1000 reading, rewriting and signalling a Podman task"""
    with make_executor(kind, base) as ex:
        task_id = f"sec-{uuid.uuid4().hex[:8]}"
        ws = base / "ws" / task_id
        ws.mkdir(parents=True)
        (ws / "main.py").write_text(
            "import os, time\nopen('secret.txt', 'w').write('s3cret')\n"
            "open('result.txt', 'w').write('honest')\nprint('TASK-READY', flush=True)\n"
            "while not os.path.exists('done'):\n    time.sleep(0.05)\n"
            "print('result', open('result.txt').read(), flush=True)\n")
        spec = TaskSpec(task_id, ws, Entry(("python3", "main.py")),
                        Limits(cpus=1.0, memory_bytes=256 * MiB, timeout_s=120))
        lines = Lines()
        ex.prepare(spec, lines, threading.Event())
        ex.start(spec, lines)
        try:
            assert lines.wait_for("TASK-READY"), lines.texts()
            owner = ws.stat().st_uid
            pids = [p.pid for p in psutil.process_iter(["pid", "cmdline"])
                    if (p.info["cmdline"] or [])[-2:] == ["python3", "main.py"]
                    and p.cwd() == "/workspace"] if kind == "podman-rootful" else []
            # The task's files belong to a uid that is nobody's account (and not uid 1000).
            assert owner != HOST_UID
            if kind == "podman-rootful":
                with pytest.raises(KeyError):
                    pwd.getpwuid(owner)
                assert pids and all(psutil.Process(p).uids().real not in (0, HOST_UID) for p in pids)
            assert ws.stat().st_mode & 0o077 == 0
            args = f"set -- {ws} '{' '.join(map(str, pids))}'; "
            # The probe works: as root, outside any sandbox, reading, listing and signalling
            # succeed (the rewrite is left out so the task's result stays honest).
            probe = ATTACK.replace('echo tampered 2>/dev/null > "$1/result.txt" && echo rewrote-result; ', "")
            as_root = subprocess.run(["sh", "-c", args + probe], capture_output=True, text=True)
            assert as_root.stdout.split() == ["read-secret", "listed"] + ["signalled"] * len(pids)
            got = _as_uid(HOST_UID, args + ATTACK)
            assert got.split() == [], got
            (ws / "done").touch()
            res = ex.wait(task_id, 60)
            assert res is not None and res.exit_code == 0, lines.texts()
            assert "result honest" in lines.texts("stdout")
        finally:
            ex.cleanup(task_id)
