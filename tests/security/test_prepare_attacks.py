"""Attacks during the requirements step, against every executor: code from the archive or from
the index trying to reach the worker's ports, other loopback services, DNS or the outside."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Targets
from sandboxes import EXECUTORS, IS_ROOT, LOG, Lines, make_executor, open_dir

from hivemind.config import RequirementsConfig
from hivemind.errors import HivemindError
from hivemind.executors.base import Entry, Limits, TaskSpec
from hivemind.executors.fetch_proxy import FetchProxy, sandboxed_fetch_argv
from hivemind.executors.requirements import RequirementsRefused

from pkgindex import make_sdist, make_wheel, serve_index
from probes import NETWORK_PROBE, parse_probe, reached, run_outside

pytestmark = pytest.mark.slow
MiB = 1024 * 1024


@pytest.fixture
def base() -> Iterator[Path]:
    d = open_dir("hm-sec-prep-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _spec(base: Path, files: dict[str, str], requirements: str) -> TaskSpec:
    task_id = f"sec-{uuid.uuid4().hex[:8]}"
    ws = base / "ws" / task_id
    ws.mkdir(parents=True)
    for rel, text in files.items():
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text(text)
    (ws / "requirements.txt").write_text(requirements)
    return TaskSpec(task_id, ws, Entry(("python3", "-c", "print('ran')")),
                    Limits(cpus=1.0, memory_bytes=256 * MiB), requirements=ws / "requirements.txt")


def _backend_package(targets: Targets, probe_id: str) -> dict[str, str]:
    """An in-archive package whose PEP 517 backend (and setup.py) runs the network probe."""
    code = f"import os\nos.environ['HM_PROBE_ID'] = {probe_id!r}\n" + NETWORK_PROBE
    return {"evilpkg/pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\n'
                                      'backend-path = ["."]\n',
            "evilpkg/backend.py": code, "evilpkg/setup.py": code,
            "evilpkg/targets.json": json.dumps(targets.as_json())}


def _probe_ran(probe_id: str) -> bool:
    marker = Path(f"/tmp/hm-probe-ran-{probe_id}")
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    return ran


def _assert_probe_works_outside(targets: Targets) -> None:
    env = {**os.environ, "HM_TARGETS": json.dumps(targets.as_json()), "HM_PROBE_ID": "outside"}
    outside = run_outside(NETWORK_PROBE, env=env)
    assert set(reached(outside)) >= {"status port", "grpc port", "other loopback port",
                                     "dns resolver", "outside address"}, outside
    want = ["grpc port", "other loopback port", "status port"]
    assert targets.wait_reached(want) == want
    _probe_ran("outside")
    targets.reset()


REQUIREMENT_ATTACKS = {
    "local path": "./evilpkg\n",
    "editable local path": "-e ./evilpkg\n",
    "direct file URL": "evilpkg @ file://{ws}/evilpkg\n",
    "index option to the status port": "-i http://127.0.0.1:{status}/simple\nevilpkg\n",
    "extra index on the gRPC port": "--extra-index-url http://127.0.0.1:{grpc}/simple\nsix\n",
    "find-links to another loopback port": "-f http://127.0.0.2:{other}/\nsix\n",
    "trusted host": "--trusted-host 127.0.0.1\nsix\n",
    "nested requirements file": "-r evilpkg/reqs.txt\n",
    "VCS URL": "git+http://127.0.0.1:{status}/evil.git\n",
}


@pytest.fixture(scope="module")
def executors() -> Iterator[dict[str, object]]:
    """One executor per kind for the many requirement-file attacks (each is refused before the
    executor does anything, so they can share it)."""
    made: dict[str, object] = {}
    stack = contextlib.ExitStack()
    base = open_dir("hm-sec-prep-shared-")

    def get(kind: str) -> object:
        if kind not in made:
            made[kind] = stack.enter_context(make_executor(kind, base / kind))
        return made[kind]

    with stack:
        yield {"get": get}
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("kind", EXECUTORS)
@pytest.mark.parametrize("attack", sorted(REQUIREMENT_ATTACKS))
def test_requirement_file_options_and_paths(kind: str, attack: str, base: Path,
                                             targets: Targets, executors: dict[str, Any]) -> None:
    """requirements.txt options, local paths and URLs that would run in-archive code or point pip anywhere"""
    _assert_probe_works_outside(targets)
    probe_id = uuid.uuid4().hex[:8]
    files = {**_backend_package(targets, probe_id), "evilpkg/reqs.txt": "./evilpkg\n"}
    t = targets.items
    text = REQUIREMENT_ATTACKS[attack].format(
        ws="{ws}", status=t["status port"].port, grpc=t["grpc port"].port,
        other=t["other loopback port"].port)
    spec = _spec(base, files, "")
    spec.requirements.write_text(text.replace("{ws}", str(spec.workspace)))  # type: ignore[union-attr]
    ex = executors["get"](kind)
    lines = Lines()
    with pytest.raises(RequirementsRefused) as err:
        ex.prepare(spec, lines, threading.Event())
    assert "requirements.txt line 1" in str(err.value)
    assert targets.reached() == [] and not _probe_ran(probe_id)


@pytest.mark.parametrize("kind", EXECUTORS)
def test_sdist_build_backend_on_the_index(kind: str, base: Path, targets: Targets) -> None:
    """an sdist on the package index whose setup.py / build backend connects to local ports during prepare"""
    _assert_probe_works_outside(targets)
    probe_id = uuid.uuid4().hex[:8]
    index_dir = base / "index"
    index_dir.mkdir()
    pkg = _backend_package(targets, probe_id)
    make_sdist(index_dir, "hmevil", "1.0", {k.removeprefix("evilpkg/"): v for k, v in pkg.items()})
    with serve_index(index_dir) as index, make_executor(kind, base, index.url) as ex:
        spec = _spec(base, {}, "hmevil==1.0\n")
        lines = Lines()
        with pytest.raises(HivemindError):
            ex.prepare(spec, lines, threading.Event())
        assert any("/simple/hmevil" in h for h in index.hits)     # pip did look at the index
    assert targets.reached() == [] and not _probe_ran(probe_id), lines.texts()


@pytest.mark.parametrize("kind", EXECUTORS)
def test_wheel_dependency_pointing_at_the_status_port(kind: str, base: Path,
                                                      targets: Targets) -> None:
    """a wheel on the index whose metadata names a dependency URL on the worker's status port"""
    status = targets.items["status port"]
    index_dir = base / "index"
    index_dir.mkdir()
    make_wheel(index_dir, "hmdep", "1.0", {"hmdep.py": ""},
               requires=(f"hmpayload @ http://127.0.0.1:{status.port}/hmpayload-1.0-py3-none-any.whl",))
    with serve_index(index_dir) as index:
        # Outside the sandbox, plain pip follows the dependency to the port: the attack is real.
        dest = Path(tempfile.mkdtemp(prefix="hm-sec-dl-"))
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--isolated", "--no-deps",
                            "--only-binary=:all:", "--index-url", index.url, "--dest", str(dest),
                            "hmdep==1.0"], capture_output=True, timeout=120, check=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--isolated",
                            "--only-binary=:all:", "--index-url", index.url, "--dest", str(dest),
                            "hmdep==1.0"], capture_output=True, timeout=120)
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        assert targets.wait_reached(["status port"]) == ["status port"]
        targets.reset()
        with make_executor(kind, base, index.url) as ex:
            spec = _spec(base, {}, "hmdep==1.0\n")
            lines = Lines()
            with pytest.raises(HivemindError) as err:
                ex.prepare(spec, lines, threading.Event())
    assert targets.reached() == [], lines.texts()
    assert f"127.0.0.1:{status.port}" in str(err.value)      # the refusal is named


@pytest.mark.skipif(not IS_ROOT, reason="the fetch step's own network namespace needs root here")
def test_fetch_step_has_no_network_of_its_own(targets: Targets) -> None:
    """code in the fetch step's namespace connecting to local ports, DNS and the outside"""
    _assert_probe_works_outside(targets)
    d = Path(tempfile.mkdtemp(prefix="hm-sec-fetch-"))
    proxy = FetchProxy.for_config(d / "s", "https://pypi.org/simple", "", LOG)
    try:
        argv = sandboxed_fetch_argv(sys.executable, proxy.path, [sys.executable, "-c", NETWORK_PROBE],
                                    drop=[])
        env = {"PATH": "/usr/bin:/bin", "HM_TARGETS": json.dumps(targets.as_json()),
               "HM_PROBE_ID": "fetchns"}
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    finally:
        proxy.close()
        shutil.rmtree(d, ignore_errors=True)
    _probe_ran("fetchns")
    result = parse_probe(out.stdout.splitlines())
    assert reached(result) == [], result
    assert targets.reached() == []


def test_index_and_proxy_come_from_config_only() -> None:
    """a task naming its own package index or proxy (only executor.requirements.* can)"""
    from hivemind.executors.wheel_fetch import download_argv

    cfg = RequirementsConfig(index_url="https://pypi.example/simple", proxy="http://proxy.example:3128")
    argv = download_argv(["pip"], Path("/r.txt"), Path("/w"), cfg)
    assert argv[argv.index("--index-url") + 1] == "https://pypi.example/simple"
    assert "--isolated" in argv and "--only-binary=:all:" in argv
    assert argv[argv.index("--proxy") + 1] == "{proxy}"   # the relay to the filtering proxy
