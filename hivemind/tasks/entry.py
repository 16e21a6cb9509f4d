"""Which command starts a task, found in its extracted workspace.

Without a manifest, the order the existing HiveMind worker uses (PROTOCOL.md):
`run.sh` (run with bash), then `run.py`, `main.py`, `app.py`, `index.py`, `start.py`, then the
first other root-level `*.py` in sorted order (run with python). Only regular files at the
workspace root count; links are ignored.

Optional manifest: `hivemind.yaml` at the archive root, a YAML mapping with these keys (any other
key is an error, so a typo is reported rather than ignored):

    entry: train.py                 # a .py or .sh file in the workspace, relative path
    # or, with arguments:
    entry: [python, train.py, --epochs, "3"]
                                    # [interpreter, script, args...]; interpreter is one of
                                    # bash, sh, python, python3; script is a file in the workspace
    timeout_s: 600                  # optional, seconds > 0; the worker takes the smaller of this
                                    # and its configured executor.task_timeout_s

Paths are relative, use `/`, have no `..` or `.` components, and name a regular file (no links
anywhere on the way). Both keys are optional; without `entry` the default order applies.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from hivemind.errors import ArchiveRejected
from hivemind.executors.base import Entry

MANIFEST = "hivemind.yaml"
REQUIREMENTS = "requirements.txt"
PREFERRED = ("run.py", "main.py", "app.py", "index.py", "start.py")
INTERPRETERS = frozenset({"bash", "sh", "python", "python3"})
MAX_MANIFEST_BYTES = 64 * 1024
MAX_ARGS = 256
MAX_ARG_CHARS = 4096
MAX_TIMEOUT_S = 7 * 86400.0
_KEYS = frozenset({"entry", "timeout_s"})


class InvalidManifest(ArchiveRejected):
    """hivemind.yaml is malformed; the message says which key and how to fix it."""


class NoEntryFound(ArchiveRejected):
    """Nothing in the workspace can start the task."""


def discover_entry(workspace: Path) -> Entry:
    manifest = _load_manifest(workspace)
    timeout = _timeout(manifest)
    if "entry" in manifest:
        return Entry(argv=_manifest_argv(workspace, manifest["entry"]), timeout_s=timeout)
    return Entry(argv=_default_argv(workspace), timeout_s=timeout)


def find_requirements(workspace: Path) -> Path | None:
    path = workspace / REQUIREMENTS
    return path if _is_regular(path) else None


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _default_argv(workspace: Path) -> tuple[str, ...]:
    if _is_regular(workspace / "run.sh"):
        return ("bash", "run.sh")
    for name in PREFERRED:
        if _is_regular(workspace / name):
            return ("python", name)
    others = sorted(e.name for e in os.scandir(workspace)
                    if e.name.endswith(".py") and e.is_file(follow_symlinks=False))
    if others:
        return ("python", others[0])
    raise NoEntryFound(
        "no entry point: put run.sh, run.py, main.py, app.py, index.py, start.py or another "
        f"*.py at the archive root, or name one in {MANIFEST} (entry: FILE)")


def _load_manifest(workspace: Path) -> dict[str, Any]:
    path = workspace / MANIFEST
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return {}
    if not stat.S_ISREG(st.st_mode):
        raise InvalidManifest(f"{MANIFEST} must be a regular file")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise InvalidManifest(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidManifest(f"{MANIFEST} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InvalidManifest(f"{MANIFEST} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidManifest(f"{MANIFEST} must be a mapping with keys entry and timeout_s")
    unknown = sorted(str(k) for k in data if k not in _KEYS)
    if unknown:
        raise InvalidManifest(f"{MANIFEST}: unknown key {', '.join(repr(k[:40]) for k in unknown)};"
                              " known keys: entry, timeout_s")
    return data


def _timeout(manifest: dict[str, Any]) -> float | None:
    if "timeout_s" not in manifest or manifest["timeout_s"] is None:
        return None
    value = manifest["timeout_s"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidManifest(f"{MANIFEST}: timeout_s must be a number of seconds")
    if not (0 < value <= MAX_TIMEOUT_S):
        raise InvalidManifest(f"{MANIFEST}: timeout_s must be > 0 and <= {MAX_TIMEOUT_S:g}")
    return float(value)


def _manifest_argv(workspace: Path, entry: Any) -> tuple[str, ...]:
    if isinstance(entry, str):
        script = _check_script(workspace, entry)
        if script.endswith(".sh"):
            return ("bash", script)
        if script.endswith(".py"):
            return ("python", script)
        raise InvalidManifest(f"{MANIFEST}: entry {entry[:80]!r} must end in .py or .sh, "
                              "or be a list [interpreter, script, args...]")
    if isinstance(entry, list):
        if len(entry) < 2 or len(entry) > MAX_ARGS:
            raise InvalidManifest(f"{MANIFEST}: entry list must be [interpreter, script, args...]"
                                  f" with at most {MAX_ARGS} items")
        if not all(isinstance(a, str) for a in entry):
            raise InvalidManifest(f"{MANIFEST}: every item of the entry list must be a string "
                                  "(quote numbers)")
        if entry[0] not in INTERPRETERS:
            raise InvalidManifest(f"{MANIFEST}: entry interpreter {entry[0][:40]!r} is not one of "
                                  f"{', '.join(sorted(INTERPRETERS))}")
        for arg in entry[2:]:
            if "\x00" in arg or len(arg) > MAX_ARG_CHARS:
                raise InvalidManifest(f"{MANIFEST}: entry arguments must be under "
                                      f"{MAX_ARG_CHARS} characters and contain no NUL")
        return (entry[0], _check_script(workspace, entry[1]), *entry[2:])
    raise InvalidManifest(f"{MANIFEST}: entry must be a file name or a list "
                          "[interpreter, script, args...]")


def _check_script(workspace: Path, rel: str) -> str:
    shown = repr(rel[:80])
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel:
        raise InvalidManifest(f"{MANIFEST}: entry {shown} must be a relative path inside the archive")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidManifest(f"{MANIFEST}: entry {shown} must not contain '..', '.' or empty parts")
    # Check every component with lstat: a link anywhere could point outside the workspace.
    here = workspace
    for i, part in enumerate(parts):
        here = here / part
        try:
            mode = os.lstat(here).st_mode
        except OSError:
            raise InvalidManifest(f"{MANIFEST}: entry {shown} does not exist in the archive") from None
        last = i == len(parts) - 1
        if (last and not stat.S_ISREG(mode)) or (not last and not stat.S_ISDIR(mode)):
            raise InvalidManifest(f"{MANIFEST}: entry {shown} must be a regular file (no links)")
    return rel
