"""The `submit` client: upload a task to a pool, follow its output, save its result archive.

It speaks only the classic user calls (Login, UploadTask, GetAllUserTasks, GetTasklog,
GetTaskResult, RefreshToken), so it works against the existing pool as well as the dev pool.
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

from hivemind._proto import nodepool_pb2, nodepool_pb2_grpc
from hivemind.devpool import jwt
from hivemind.devpool.state import COMPLETED, FAILED
from hivemind.errors import HivemindError
from hivemind.secrets import Secret, read_secret

_grpc: Any = nodepool_pb2_grpc  # untyped generated stubs
MAX_MESSAGE = 1024 * 1024 * 1024
CALL_TIMEOUT_S = 30.0
REFRESH_MARGIN_S = 300.0
TERMINAL = (COMPLETED, FAILED)


class SubmitError(HivemindError):
    """Submitting or following a task failed; the message is safe to print."""


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


class _Session:
    """A logged-in channel that renews its token shortly before it expires."""

    def __init__(self, address: str, username: str, password: str,
                 credentials: grpc.ChannelCredentials | None) -> None:
        options = [("grpc.max_send_message_length", MAX_MESSAGE),
                   ("grpc.max_receive_message_length", MAX_MESSAGE)]
        self.channel = (grpc.insecure_channel(address, options=options) if credentials is None
                        else grpc.secure_channel(address, credentials, options=options))
        self.users = _grpc.UserServiceStub(self.channel)
        self.master = _grpc.MasterNodeServiceStub(self.channel)
        self._username, self._password = username, password
        self.token = ""
        self._exp = 0.0
        self._login()

    def _login(self) -> None:
        reply = self._call(self.users.Login, nodepool_pb2.LoginRequest(
            username=self._username, password=self._password), authenticated=False)
        if not reply.success:
            raise SubmitError(f"login as {self._username!r} failed: {reply.message}")
        self._adopt(reply.token)

    def _adopt(self, token: str) -> None:
        self.token = token
        try:
            self._exp = float(jwt.unverified_claims(token).get("exp", 0))
        except (jwt.InvalidToken, TypeError, ValueError):
            self._exp = 0.0  # unknown expiry: never refresh early, log in again on rejection

    def _renew_if_due(self) -> None:
        if not self._exp or self._exp - time.time() > REFRESH_MARGIN_S:
            return
        reply = self._call(self.users.RefreshToken,
                           nodepool_pb2.RefreshTokenRequest(old_token=self.token))
        if reply.success:
            self._adopt(reply.new_token)
        else:
            self._login()

    def call(self, method: Any, request: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        self._renew_if_due()
        return self._call(method, request, timeout=timeout)

    def _call(self, method: Any, request: Any, *, authenticated: bool = True,
              timeout: float = CALL_TIMEOUT_S) -> Any:
        metadata = [("authorization", f"Bearer {self.token}")] if authenticated else None
        try:
            return method(request, metadata=metadata, timeout=timeout)
        except grpc.RpcError as err:
            # details() of a pool error never holds our token; the code says what kind of failure.
            raise SubmitError(f"pool call failed: {err.code().name}: {err.details()}") from None

    def close(self) -> None:
        self.channel.close()


def _task_status(session: _Session, task_id: str) -> tuple[str, str]:
    reply = session.call(session.master.GetAllUserTasks,
                         nodepool_pb2.GetAllUserTasksRequest(token=session.token))
    for info in reply.tasks:
        if info.task_id == task_id:
            return str(info.status), str(info.message)
    return "", ""


def _stdout_writer(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def submit_task(pool_address: str, path: Path, username: str, password: str | Secret, *,
                memory_gb: int = 1, cpu_score: int = 0, gpu_score: int = 0,
                gpu_memory_gb: int = 0, follow: bool = True, out_path: Path | None = None,
                timeout_s: float = 3600.0, on_output: Callable[[str], None] | None = None,
                poll_interval_s: float = 1.0, task_id: str | None = None,
                channel_credentials: grpc.ChannelCredentials | None = None,
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
    session = _Session(pool_address, username, secret, channel_credentials)
    try:
        upload_timeout = min(CALL_TIMEOUT_S + 2 * len(archive) / (1024 * 1024), 600.0)
        reply = session.call(session.master.UploadTask, nodepool_pb2.UploadTaskRequest(
            task_id=task_id, task_zip=archive, memory_gb=memory_gb, cpu_score=cpu_score,
            gpu_score=gpu_score, gpu_memory_gb=gpu_memory_gb, token=session.token),
            timeout=upload_timeout)
        if not reply.success:
            raise SubmitError(f"upload refused: {reply.message}")
        if not follow:
            return SubmitResult(task_id, "QUEUED", None)
        deadline = clock() + timeout_s
        seen = ""
        while True:
            # Status before log: when the status is final, the log read after it is complete.
            status, message = _task_status(session, task_id)
            log = session.call(session.master.GetTasklog,
                               nodepool_pb2.TasklogRequest(task_id=task_id, token=session.token))
            if log.success and log.log != seen:
                added = new_output(seen, log.log)
                if added:
                    emit(added)
                seen = log.log
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


def _save_result(session: _Session, task_id: str, out_path: Path) -> Path:
    reply = session.call(session.master.GetTaskResult,
                         nodepool_pb2.GetTaskResultRequest(task_id=task_id, token=session.token),
                         timeout=600.0)
    if not reply.success:
        raise SubmitError(f"task {task_id} completed but its result can't be fetched: {reply.message}")
    tmp = out_path.with_name(out_path.name + ".part")
    try:
        tmp.write_bytes(reply.result_zip)
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
                         out_path=args.out, timeout_s=args.timeout)
    where = f", result saved to {result.result_path}" if result.result_path else ""
    reason = f" ({result.message})" if result.message else ""
    print(f"task {result.task_id}: {result.status}{reason}{where}", file=sys.stderr)
    return 0 if result.status == COMPLETED else 1
