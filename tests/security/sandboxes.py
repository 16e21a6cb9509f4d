"""The executors the attacks run against, built the way the worker builds them, each with its
own state under /var/tmp (task users must traverse it) and a unique node id."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hivemind.config import PodmanConfig, RequirementsConfig, VenvConfig
from hivemind.executors.base import Executor, OutputLine
from hivemind.executors.podman_service import PodmanService

LOG = logging.getLogger("test.security")
IS_ROOT = os.geteuid() == 0
EXECUTORS = ("venv", "podman-rootful", "podman-rootless")


class Lines:
    def __init__(self) -> None:
        self.items: list[OutputLine] = []
        self.cv = threading.Condition()

    def __call__(self, line: OutputLine) -> None:
        with self.cv:
            self.items.append(line)
            self.cv.notify_all()

    def texts(self, stream: str | None = None) -> list[str]:
        with self.cv:
            return [x.text for x in self.items if stream is None or x.stream == stream]

    def wait_for(self, text: str, timeout: float = 60) -> bool:
        """`text` in a line the task printed (prepare lines don't count)."""
        with self.cv:
            return self.cv.wait_for(lambda: any(text in x.text for x in self.items
                                                if x.stream != "prepare"), timeout)


def open_dir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    d.chmod(0o755)
    return d


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def skip_unless_runnable(kind: str) -> None:
    if not IS_ROOT:
        pytest.skip("needs root (task uids, namespaces, rootful Podman)")
    if kind.startswith("podman") and shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    if kind == "podman-rootless" and not _has_user("hivemind"):
        pytest.skip("scripts/setup-podman has not created the hivemind user")


@contextmanager
def make_executor(kind: str, base: Path, index_url: str = "") -> Iterator[Executor]:
    """An executor of `kind` whose requirements come from `index_url` (the operator's index)."""
    skip_unless_runnable(kind)
    req = RequirementsConfig(index_url=index_url)
    node = f"sec-{uuid.uuid4().hex[:8]}"
    if kind == "venv":
        from hivemind.executors.venv import VenvExecutor

        vex = VenvExecutor(VenvConfig(cache_dir=str(base / "venvs")), base / "state",
                           LOG, node, requirements=req, stop_grace_s=1.0)
        try:
            yield vex
        finally:                       # a failed test leaves no task running
            for task_id in list(vex._tasks):
                vex.cleanup(task_id)
        return
    from hivemind.executors.podman import PodmanExecutor

    mode = "rootful" if kind == "podman-rootful" else "rootless"
    service = None
    if mode == "rootful":
        service = PodmanService(PodmanConfig(mode="rootful"), LOG,
                                rootful_socket=str(base / "podman.sock"))
    pex = PodmanExecutor(PodmanConfig(mode=mode), node, base / "state", LOG, 300,
                         service=service, requirements=req)
    try:
        st = pex.probe()
        if not st.usable:
            pytest.fail(f"{kind} is not usable here: {st.reason}")
        yield pex
    finally:
        for task_id in pex.orphans():
            pex.stop(task_id, grace=0)
            pex.cleanup(task_id)
        pex.close()
        if service is not None:
            service.close()
