"""The `submit` client: upload a task to a pool, follow its output, save its result archive.

It speaks only the classic user calls of the pool's protocol generation (`userclient.py`:
2026-04 Login, UploadTask, GetAllUserTasks, GetTasklog, GetTaskResult, RefreshToken; 2025-10
Login, UploadTask, PollTaskStatus, GetTaskLogs, GetTaskResult), so it works against existing
pools of either generation as well as the dev pool.
The pool keeps only the last ~10 KiB of output; `new_output` finds what a poll added to that
sliding window, so a fast writer between two polls can lose lines, never duplicate them.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from hivemind.devpool.state import COMPLETED, FAILED
from hivemind.devpool.userclient import CALL_TIMEOUT_S, SubmitError, UserClient, user_client
from hivemind.secrets import Secret, read_secret

TERMINAL = (COMPLETED, FAILED)
__all__ = ["SubmitError", "SubmitResult", "submit_task"]


@dataclass(frozen=True)
class SubmitResult:
    task_id: str
    status: str
    result_path: Path | None
    message: str = ""


def new_task_id() -> str:
    return f"task-{uuid.uuid4().hex}"


def default_out_path(path: Path) -> Path:
    """NAME.result.zip next to the input (NAME: the directory, or the zip without .zip)."""
    name = path.stem if path.is_file() else path.resolve().name
    return path.resolve().parent / f"{name}.result.zip"


def zip_task(path: Path) -> bytes:
    """A directory zipped on the fly (regular files only, symlinks skipped), or a zip as is."""
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise SubmitError(f"{path} is not a zip archive; pass a task directory or a .zip")
        return path.read_bytes()
    if not path.is_dir():
        raise SubmitError(f"{path} does not exist")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(root, d)))
            for name in sorted(files):
                full = Path(root, name)
                if full.is_symlink() or not full.is_file():
                    continue
                zf.write(full, full.relative_to(path).as_posix())
    return buf.getvalue()


def new_output(previous: str, current: str) -> str:
    """What `current` (a tail window of the output) adds after `previous` (an earlier window)."""
    if current.startswith(previous):
        return current[len(previous):]
    # The window slid: find the longest suffix of `previous` that `current` starts with.
    for start in range(1, len(previous)):
        if current.startswith(previous[start:]):
            return current[len(previous) - start:]
    return current


def _stdout_writer(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def submit_task(pool_address: str, path: Path, username: str, password: str | Secret, *,
                memory_gb: int = 1, cpu_score: int = 0, gpu_score: int = 0,
                gpu_memory_gb: int = 0, follow: bool = True, out_path: Path | None = None,
                timeout_s: float = 3600.0, on_output: Callable[[str], None] | None = None,
                poll_interval_s: float = 1.0, task_id: str | None = None,
                channel_credentials: grpc.ChannelCredentials | None = None,
                protocol: str = "2026-04",
                clock: Callable[[], float] = time.monotonic,
                sleep: Callable[[float], None] = time.sleep) -> SubmitResult:
    """Upload `path` as a task; with `follow`, print its output until it ends and save the result.

    Raises SubmitError on a failed login or upload, an unreachable pool, or `timeout_s` passing
    before the task ends. A FAILED task is a result (status FAILED, no result_path), not an error.
    """
    archive = zip_task(path)
    task_id = task_id or new_task_id()
    emit = on_output or _stdout_writer
    secret = password.reveal() if isinstance(password, Secret) else password
    session = user_client(protocol, pool_address, username, secret, channel_credentials)
    try:
        upload_timeout = min(CALL_TIMEOUT_S + 2 * len(archive) / (1024 * 1024), 600.0)
        ok, message = session.upload(task_id, archive, memory_gb=memory_gb, cpu_score=cpu_score,
                                     gpu_score=gpu_score, gpu_memory_gb=gpu_memory_gb,
                                     timeout=upload_timeout)
        if not ok:
            raise SubmitError(f"upload refused: {message}")
        if not follow:
            return SubmitResult(task_id, "QUEUED", None)
        deadline = clock() + timeout_s
        seen = ""
        while True:
            # Status before log: when the status is final, the log read after it is complete.
            status, message = session.status(task_id)
            log = session.log(task_id)
            if log is not None and log != seen:
                added = new_output(seen, log)
                if added:
                    emit(added)
                seen = log
            if status in TERMINAL:
                break
            if clock() >= deadline:
                raise SubmitError(f"task {task_id} still {status or 'unknown'} after {timeout_s:g} s")
            sleep(poll_interval_s)
        if status == FAILED:
            return SubmitResult(task_id, status, None, message)
        return SubmitResult(task_id, status, _save_result(session, task_id, out_path or default_out_path(path)))
    finally:
        session.close()


def _save_result(session: UserClient, task_id: str, out_path: Path) -> Path:
    ok, message, data = session.result(task_id)
    if not ok:
        raise SubmitError(f"task {task_id} completed but its result can't be fetched: {message}")
    tmp = out_path.with_name(out_path.name + ".part")
    try:
        tmp.write_bytes(data)
        tmp.replace(out_path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        # The default lands next to the input, which may be read-only (a Nix store path).
        raise SubmitError(f"task {task_id} completed but its result can't be saved to {out_path}: "
                          f"{exc.strerror or exc}; pass --out PATH in a writable directory") from None
    return out_path


def main(args: Any) -> int:
    """Run `hivemind-worker submit` from parsed arguments with the attributes path, pool, user,
    password_file, memory_gb, cpu_score, out, timeout (as hivemind/cli.py defines them)."""
    from hivemind.devpool import DEV_PASSWORD

    password: str | Secret = (read_secret("--password-file", args.password_file)
                              if args.password_file else DEV_PASSWORD)
    result = submit_task(args.pool, Path(args.path), args.user, password,
                         memory_gb=args.memory_gb, cpu_score=args.cpu_score,
                         out_path=args.out, timeout_s=args.timeout,
                         protocol=getattr(args, "protocol", "2026-04"))
    where = f", result saved to {result.result_path}" if result.result_path else ""
    reason = f" ({result.message})" if result.message else ""
    print(f"task {result.task_id}: {result.status}{reason}{where}", file=sys.stderr)
    return 0 if result.status == COMPLETED else 1
