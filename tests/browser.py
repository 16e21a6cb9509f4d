"""Headless Debian chromium for tests: load a page, let its scripts run, return the DOM or a PNG.

Reusable by any test (the status monitor's, and an end-to-end one against the real daemon).
Chromium runs in its own process group, so a hung one is killed with everything it spawned,
and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")

BASE_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--hide-scrollbars")


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def with_token(url: str, token: str) -> str:
    """The URL with the token in its fragment, which the monitor page reads and the server never sees."""
    return f"{url}#token={token}"


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        # Renderer or zygote children can outlive the browser; they are in our group only.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _args(chromium: str, profile: Path, budget_ms: int, size: tuple[int, int]) -> list[str]:
    return [chromium, *BASE_FLAGS, f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={budget_ms}"]


def dump_dom(url: str, tmp_dir: Path, *, budget_ms: int = 5000, size: tuple[int, int] = (1280, 900),
             timeout: float = 60.0, chromium: str | None = None) -> str:
    """The serialised DOM after the page's scripts ran for `budget_ms` of virtual time."""
    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed")
    res = _run([*_args(exe, tmp_dir / "profile-dom", budget_ms, size), "--dump-dom", url], timeout)
    if res.returncode != 0:
        raise RuntimeError(f"chromium exited {res.returncode}: {res.stderr.decode(errors='replace')[-2000:]}")
    return res.stdout.decode("utf-8", errors="replace")


def screenshot(url: str, png: Path, tmp_dir: Path, *, budget_ms: int = 5000,
               size: tuple[int, int] = (1280, 900), timeout: float = 60.0,
               chromium: str | None = None) -> Path:
    """Render the page after `budget_ms` of virtual time into `png`."""
    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed")
    res = _run([*_args(exe, tmp_dir / "profile-png", budget_ms, size), f"--screenshot={png}", url],
               timeout)
    if res.returncode != 0 or not png.is_file():
        raise RuntimeError(f"chromium exited {res.returncode}: {res.stderr.decode(errors='replace')[-2000:]}")
    return png
