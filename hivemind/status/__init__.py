"""Status API, monitor page and Prometheus metrics (Falcon app served by waitress).

The names below load on first use: the daemon always keeps metrics (hivemind.status.prom), but
Falcon and waitress are only imported when status.enabled starts the server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hivemind.status.app import create_app
    from hivemind.status.prom import WorkerMetrics
    from hivemind.status.server import StatusServer, reads_need_token
    from hivemind.status.view import StatusDict, StatusView, TaskDict

_HOME = {"create_app": "app", "WorkerMetrics": "prom", "StatusServer": "server",
         "reads_need_token": "server", "StatusDict": "view", "StatusView": "view", "TaskDict": "view"}

__all__ = ["StatusDict", "StatusServer", "StatusView", "TaskDict", "WorkerMetrics", "create_app",
           "reads_need_token"]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
