"""Status API, monitor page and Prometheus metrics (Falcon app served by waitress)."""

from hivemind.status.app import create_app
from hivemind.status.prom import WorkerMetrics
from hivemind.status.server import StatusServer, reads_need_token
from hivemind.status.view import StatusDict, StatusView, TaskDict

__all__ = ["StatusDict", "StatusServer", "StatusView", "TaskDict", "WorkerMetrics", "create_app",
           "reads_need_token"]
