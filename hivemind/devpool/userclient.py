"""A task author's calls to a pool (login, upload, status, output, result, stop), one class per
protocol generation, each with its own bindings. Used by `submit` and by the tests, so both run
against a pool of either generation.

2026-04: every call carries `authorization: Bearer`, and requests carry the token in a field too;
the token is renewed with RefreshToken shortly before it expires. 2025-10: no RefreshToken (log
in again), UploadTask names the user in `user_id`, output comes from PollTaskStatus.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from typing import Any

import grpc

from hivemind._proto.v2025_10 import nodepool_pb2 as pb25
from hivemind._proto.v2025_10 import nodepool_pb2_grpc as pb25_grpc
from hivemind._proto.v2026_04 import nodepool_pb2 as pb26
from hivemind._proto.v2026_04 import nodepool_pb2_grpc as pb26_grpc
from hivemind.devpool import jwt
from hivemind.errors import HivemindError

MAX_MESSAGE = 1024 * 1024 * 1024
CALL_TIMEOUT_S = 30.0
REFRESH_MARGIN_S = 300.0

_g26: Any = pb26_grpc   # untyped generated stubs
_g25: Any = pb25_grpc


class SubmitError(HivemindError):
    """Submitting or following a task failed; the message is safe to print."""


class UserClient(abc.ABC):
    """A logged-in channel to a pool as one user. `close()` ends it."""

    generation: str

    def __init__(self, address: str, username: str, password: str,
                 credentials: grpc.ChannelCredentials | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        options = [("grpc.max_send_message_length", MAX_MESSAGE),
                   ("grpc.max_receive_message_length", MAX_MESSAGE)]
        self.channel = (grpc.insecure_channel(address, options=options) if credentials is None
                        else grpc.secure_channel(address, credentials, options=options))
        self._username, self._password = username, password
        self._clock = clock
        self.token = ""
        self._exp = 0.0
        self._stubs()
        self._login()

    @abc.abstractmethod
    def _stubs(self) -> None: ...

    @abc.abstractmethod
    def _login_reply(self) -> Any: ...

    @abc.abstractmethod
    def _renew(self) -> None: ...

    @abc.abstractmethod
    def upload(self, task_id: str, archive: bytes, *, memory_gb: int = 1, cpu_score: int = 0,
               gpu_score: int = 0, gpu_memory_gb: int = 0, timeout: float = CALL_TIMEOUT_S) -> tuple[bool, str]: ...

    @abc.abstractmethod
    def status(self, task_id: str) -> tuple[str, str]:
        """(status, message); ("", "") when the pool doesn't know the task."""

    @abc.abstractmethod
    def log(self, task_id: str) -> str | None:
        """The output the pool keeps for the task (None if it can't be read)."""

    @abc.abstractmethod
    def result(self, task_id: str) -> tuple[bool, str, bytes]: ...

    @abc.abstractmethod
    def stop(self, task_id: str) -> tuple[bool, str]: ...

    def _login(self) -> None:
        reply = self._login_reply()
        if not reply.success:
            raise SubmitError(f"login as {self._username!r} failed: {reply.message}")
        self._adopt(reply.token)

    def _adopt(self, token: str) -> None:
        self.token = token
        try:
            self._exp = float(jwt.unverified_claims(token).get("exp", 0))
        except (jwt.InvalidToken, TypeError, ValueError):
            self._exp = 0.0  # unknown expiry: never renew early

    def _call(self, method: Any, request: Any, *, authenticated: bool = True,
              timeout: float = CALL_TIMEOUT_S) -> Any:
        if authenticated and self._exp and self._exp - self._clock() <= REFRESH_MARGIN_S:
            self._renew()
        metadata = [("authorization", f"Bearer {self.token}")] if authenticated else None
        try:
            return method(request, metadata=metadata, timeout=timeout)
        except grpc.RpcError as err:
            # details() of a pool error never holds our token; the code says what kind of failure.
            raise SubmitError(f"pool call failed: {err.code().name}: {err.details()}") from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> UserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UserClient2026(UserClient):
    generation = "2026-04"

    def _stubs(self) -> None:
        self._users = _g26.UserServiceStub(self.channel)
        self._master = _g26.MasterNodeServiceStub(self.channel)

    def _login_reply(self) -> Any:
        return self._call(self._users.Login, pb26.LoginRequest(
            username=self._username, password=self._password), authenticated=False)

    def _renew(self) -> None:
        self._exp = 0.0   # no renewal from inside the renewal call
        reply = self._call(self._users.RefreshToken, pb26.RefreshTokenRequest(old_token=self.token))
        if reply.success:
            self._adopt(reply.new_token)
        else:
            self._login()

    def upload(self, task_id: str, archive: bytes, *, memory_gb: int = 1, cpu_score: int = 0,
               gpu_score: int = 0, gpu_memory_gb: int = 0, timeout: float = CALL_TIMEOUT_S) -> tuple[bool, str]:
        reply = self._call(self._master.UploadTask, pb26.UploadTaskRequest(
            task_id=task_id, task_zip=archive, memory_gb=memory_gb, cpu_score=cpu_score,
            gpu_score=gpu_score, gpu_memory_gb=gpu_memory_gb, token=self.token), timeout=timeout)
        return bool(reply.success), str(reply.message)

    def status(self, task_id: str) -> tuple[str, str]:
        reply = self._call(self._master.GetAllUserTasks, pb26.GetAllUserTasksRequest(token=self.token))
        for info in reply.tasks:
            if info.task_id == task_id:
                return str(info.status), str(info.message)
        return "", ""

    def log(self, task_id: str) -> str | None:
        reply = self._call(self._master.GetTasklog, pb26.TasklogRequest(task_id=task_id, token=self.token))
        return str(reply.log) if reply.success else None

    def result(self, task_id: str) -> tuple[bool, str, bytes]:
        reply = self._call(self._master.GetTaskResult, pb26.GetTaskResultRequest(
            task_id=task_id, token=self.token), timeout=600.0)
        return bool(reply.success), str(reply.message), bytes(reply.result_zip)

    def stop(self, task_id: str) -> tuple[bool, str]:
        reply = self._call(self._master.StopTask, pb26.StopTaskRequest(task_id=task_id, token=self.token),
                           timeout=60.0)
        return bool(reply.success), str(reply.message)


class UserClient2025(UserClient):
    generation = "2025-10"

    def _stubs(self) -> None:
        self._users = _g25.UserServiceStub(self.channel)
        self._master = _g25.MasterNodeServiceStub(self.channel)

    def _login_reply(self) -> Any:
        return self._call(self._users.Login, pb25.LoginRequest(
            username=self._username, password=self._password), authenticated=False)

    def _renew(self) -> None:
        self._exp = 0.0
        self._login()       # this generation has no RefreshToken

    def upload(self, task_id: str, archive: bytes, *, memory_gb: int = 1, cpu_score: int = 0,
               gpu_score: int = 0, gpu_memory_gb: int = 0, timeout: float = CALL_TIMEOUT_S) -> tuple[bool, str]:
        reply = self._call(self._master.UploadTask, pb25.UploadTaskRequest(
            task_id=task_id, task_zip=archive, memory_gb=memory_gb, cpu_score=cpu_score,
            gpu_score=gpu_score, gpu_memory_gb=gpu_memory_gb, user_id=self._username), timeout=timeout)
        return bool(reply.success), str(reply.message)

    def status(self, task_id: str) -> tuple[str, str]:
        reply = self._call(self._master.PollTaskStatus, pb25.PollTaskStatusRequest(task_id=task_id))
        return str(reply.status), str(reply.message)

    def log(self, task_id: str) -> str | None:
        reply = self._call(self._master.GetTaskLogs, pb25.GetTaskLogsRequest(task_id=task_id, token=self.token))
        return str(reply.logs) if reply.success else None

    def result(self, task_id: str) -> tuple[bool, str, bytes]:
        reply = self._call(self._master.GetTaskResult, pb25.GetTaskResultRequest(
            task_id=task_id, token=self.token), timeout=600.0)
        return bool(reply.success), str(reply.message), bytes(reply.result_zip)

    def stop(self, task_id: str) -> tuple[bool, str]:
        reply = self._call(self._master.StopTask, pb25.StopTaskRequest(task_id=task_id, token=self.token),
                           timeout=60.0)
        return bool(reply.success), str(reply.message)


def user_client(generation: str, address: str, username: str, password: str,
                credentials: grpc.ChannelCredentials | None = None) -> UserClient:
    cls: type[UserClient] = UserClient2025 if generation == "2025-10" else UserClient2026
    return cls(address, username, password, credentials)
