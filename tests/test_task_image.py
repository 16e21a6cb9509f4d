"""The task image is reproducible: same inputs, same image ID and digest.

What is proven here, and how:
- `images/build --verify-fresh` debootstraps a second rootfs from scratch (the .debs come from the
  download cache, the mirror is not pinned), slims it and checks its tar is byte-identical to the
  cached rootfs tar; it then builds the image into a fresh, empty podman storage.
- `images/build --force` builds again into another fresh, empty storage from the cached tar.
- Both builds and the image in the default storage have the same ID and digest.
- A second `images/build` with unchanged inputs does nothing (the input-hash label matches).
Budget: about 3 minutes (the fresh debootstrap dominates); marked slow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "images" / "build"
IMAGE = "localhost/hivemind-task:latest"

pytestmark = [
    pytest.mark.podman, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("podman") is None
                       or shutil.which("debootstrap") is None,
                       reason="needs root, podman and debootstrap"),
]


def _build(*args: str, podman_args: str = "", timeout: float = 400) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HIVEMIND_PODMAN_ARGS": podman_args}
    return subprocess.run([str(BUILD), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _inspect(fmt: str, podman_args: str = "") -> str:
    return subprocess.run(["podman", *podman_args.split(), "image", "inspect", "--format", fmt,
                           IMAGE], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def storages() -> Iterator[list[str]]:
    base = Path(tempfile.mkdtemp(prefix="hivemind-image-test-", dir="/var/tmp"))
    args = [f"--root {base}/{n}/root --runroot {base}/{n}/run" for n in ("a", "b")]
    yield args
    for a in args:
        subprocess.run(["podman", *a.split(), "rmi", "--all", "--force"], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


def test_same_inputs_give_the_same_image(storages: list[str]) -> None:
    first = _build()                             # builds if needed, else the fast path
    assert first.returncode == 0, first.stderr[-2000:]
    main_id, main_digest = _inspect("{{.Id}}"), _inspect("{{.Digest}}")

    again = _build()
    assert again.returncode == 0
    assert "up to date" in again.stderr          # idempotent: nothing rebuilt

    fresh = _build("--verify-fresh", podman_args=storages[0])
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "byte-identical" in fresh.stderr
    forced = _build("--force", podman_args=storages[1])
    assert forced.returncode == 0, forced.stderr[-2000:]

    ids = {_inspect("{{.Id}}", s) for s in storages} | {main_id}
    digests = {_inspect("{{.Digest}}", s) for s in storages} | {main_digest}
    assert len(ids) == 1, ids
    assert len(digests) == 1, digests


def test_image_contents() -> None:
    out = subprocess.run(
        ["podman", "run", "--rm", "--network", "none", "--read-only", IMAGE, "python3", "-c",
         "import os, numpy, pandas, matplotlib, requests; print(os.getuid(), os.getgid())"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1000", "1000"]
