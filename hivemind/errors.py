"""Errors that carry intent: whether the caller may retry, and a message safe to show anyone."""


class HivemindError(Exception):
    """Base class. `recoverable` tells a caller whether retrying the same thing can succeed."""

    recoverable: bool = False


class ConfigError(HivemindError):
    """The configuration is invalid; `problems` holds one line per problem (key, value, fix)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class SecretError(ConfigError):
    """A secret file is missing or unreadable. Never carries the secret itself."""


class StartupError(HivemindError):
    """The machine keeps the worker from starting (a state directory it can't create, a port
    already taken); nothing was started. The message names what and where."""


class ArchiveRejected(HivemindError):
    """A task archive broke one of the archive rules; the message names the rule."""


class AdmissionRefused(HivemindError):
    """A task can't be taken now (resources, slots); the pool may retry later."""

    recoverable = True


class ExecutorUnavailable(HivemindError):
    """An executor can't run tasks on this machine; the message says why."""


class TaskNotFound(HivemindError):
    """No task (or container, or process) with that id is known."""
