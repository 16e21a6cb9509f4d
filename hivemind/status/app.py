"""The status API, monitor page and /metrics as one Falcon WSGI app.

Resources are thin: they read the injected StatusView / WorkerMetrics and serialise. Access rules
live in one middleware so no route can forget them:
- /healthz and the monitor's static shell (/, /static/*: no data in them) are always open; the
  page asks for the token itself and sends it as a header.
- /readyz, /metrics, /api/v1/status and the OpenAPI document need `Authorization: Bearer <token>`
  only when `reads_need_token` (non-loopback bind): they say nothing about any task's data.
- Task data (`private` resources: task lists, a task's output tail) always needs the token: any
  local user can reach a loopback port, and output tails are the tasks' own data.
- Writes (POST) always need the token; without a configured token they (and task data) answer 403.
Every error is JSON. A body that would contain the token is replaced by a 500 (belt and braces:
nothing the app serves should ever hold it).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from importlib import resources as pkg_resources
from typing import Any

import falcon

from hivemind.secrets import Secret
from hivemind.status.prom import CONTENT_TYPE, WorkerMetrics
from hivemind.status.view import StatusView

TASK_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# The static files the monitor is made of: a fixed list, so no request path reaches the disk.
STATIC_TYPES = {"monitor.js": "text/javascript; charset=utf-8",
                "monitor.css": "text/css; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _send_json(resp: falcon.Response, obj: Any, status: int = 200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _read_static(name: str) -> bytes:
    return (pkg_resources.files("hivemind.status") / "static" / name).read_bytes()


class _Health:
    public = True

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _send_json(resp, {"alive": True})


class _Ready:
    def __init__(self, view: StatusView) -> None:
        self._view = view

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        ok, reason = self._view.ready()
        if ok:
            _send_json(resp, {"ready": True})
        else:
            _send_json(resp, {"ready": False, "reason": reason}, 503)


class _Status:
    def __init__(self, view: StatusView) -> None:
        self._view = view

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _send_json(resp, self._view.status())


class _Tasks:
    private = True

    def __init__(self, view: StatusView) -> None:
        self._view = view

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _send_json(resp, {"tasks": self._view.tasks()})


def _unknown_task(task_id: str) -> falcon.HTTPNotFound:
    # Echo the id only when it is a well-formed one: never reflect arbitrary input.
    shown = f" {task_id!r}" if TASK_ID_RE.match(task_id) else ""
    return falcon.HTTPNotFound(title="unknown task", description=f"no task{shown} is known")


class _Task:
    private = True

    def __init__(self, view: StatusView) -> None:
        self._view = view

    def on_get(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        task = self._view.task(task_id) if TASK_ID_RE.match(task_id) else None
        if task is None:
            raise _unknown_task(task_id)
        _send_json(resp, task)


class _StopTask:
    def __init__(self, view: StatusView, logger: logging.Logger) -> None:
        self._view = view
        self._log = logger

    def on_post(self, req: falcon.Request, resp: falcon.Response, task_id: str) -> None:
        if not (TASK_ID_RE.match(task_id) and self._view.stop_task(task_id)):
            raise _unknown_task(task_id)
        self._log.info("status API: stop of task %s requested by %s", task_id, req.remote_addr)
        _send_json(resp, {"task_id": task_id, "stopping": True}, 202)


class _Drain:
    def __init__(self, view: StatusView, logger: logging.Logger) -> None:
        self._view = view
        self._log = logger

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._view.drain()
        self._log.info("status API: drain requested by %s", req.remote_addr)
        _send_json(resp, {"draining": True}, 202)


class _Metrics:
    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = CONTENT_TYPE
        resp.data = self._metrics.render()


class _OpenAPI:
    """Built on the first request: the document and the package metadata lookup behind its
    version would otherwise stay resident in every daemon, and few clients ever ask."""

    def __init__(self, version: str) -> None:
        self._version = version
        self._doc: dict[str, Any] | None = None

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self._doc is None:
            from hivemind.status.openapi import openapi_document

            self._doc = openapi_document(self._version or _package_version())
        _send_json(resp, self._doc)


class _Monitor:
    public = True

    def __init__(self) -> None:
        self._html = _read_static("monitor.html")

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "text/html; charset=utf-8"
        resp.data = self._html


class _Static:
    public = True

    def __init__(self) -> None:
        self._files = {name: _read_static(name) for name in STATIC_TYPES}

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        if name not in self._files:
            raise falcon.HTTPNotFound(title="not found", description="no such static file")
        resp.content_type = STATIC_TYPES[name]
        resp.data = self._files[name]


class _Guard:
    """Access rules, security headers and the no-secret-in-body check, for every route."""

    def __init__(self, token: Secret | None, reads_need_token: bool, logger: logging.Logger) -> None:
        self._token = token.reveal().encode() if token else None
        self._reads_need_token = reads_need_token
        self._log = logger

    def process_resource(self, req: falcon.Request, resp: falcon.Response,
                         resource: object, params: dict[str, Any]) -> None:
        if getattr(resource, "public", False):
            return
        # A method the route lacks is a 405 from Falcon, not a write: only real writes need it.
        is_write = (req.method not in SAFE_METHODS
                    and hasattr(resource, "on_" + req.method.lower()))
        private = getattr(resource, "private", False)
        if (is_write or private) and self._token is None:
            self._reject(req, "no token configured")
            raise falcon.HTTPForbidden(title="no token configured",
                                       description="operator actions and task data need status.token_file to be set")
        if is_write or private or self._reads_need_token:
            problem = self._check(req.get_header("Authorization"))
            if problem:
                self._reject(req, problem)
                raise falcon.HTTPUnauthorized(title="unauthorized",
                                              description="send Authorization: Bearer <token>",
                                              challenges=["Bearer"])

    def _check(self, header: str | None) -> str:
        """'' when the header carries the right token, else why not (never the token itself)."""
        assert self._token is not None
        if not header:
            return "missing token"
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return "malformed Authorization header"
        if not hmac.compare_digest(value.strip().encode(), self._token):
            return "wrong token"
        return ""

    def _reject(self, req: falcon.Request, why: str) -> None:
        self._log.warning("status API: refused %s %s from %s: %s",
                          req.method, req.path, req.remote_addr, why)

    def process_response(self, req: falcon.Request, resp: falcon.Response,
                         resource: object, req_succeeded: bool) -> None:
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("Referrer-Policy", "no-referrer")
        resp.set_header("Cache-Control", "no-store")
        if (resp.content_type or "").startswith("text/html"):
            resp.set_header("Content-Security-Policy", CSP)
            resp.set_header("X-Frame-Options", "DENY")
        if self._token and self._token in _body_bytes(resp):
            self._log.error("status API: withheld the response to %s %s: it contained the token",
                            req.method, req.path)
            _send_json(resp, {"error": "response withheld", "status": 500,
                              "detail": "the response contained a secret"}, 500)


def _body_bytes(resp: falcon.Response) -> bytes:
    if resp.data is not None:
        return bytes(resp.data)
    if resp.text is not None:
        return resp.text.encode()
    return b""


def _serialize_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    code = falcon.http_status_to_code(exc.status)
    _send_json(resp, {"error": exc.title or str(code), "status": code, "detail": exc.description or ""},
               code)


def _package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("hivemind-worker")
    except metadata.PackageNotFoundError:
        return "0"


def create_app(view: StatusView, *, metrics: WorkerMetrics, token: Secret | None,
               reads_need_token: bool, logger: logging.Logger, version: str = "") -> falcon.App[falcon.Request, falcon.Response]:
    """The WSGI app. `reads_need_token` must be True for any non-loopback bind."""
    if not token:
        token = None
    if reads_need_token and token is None:
        raise ValueError("reads_need_token needs a token (set status.token_file)")

    def on_unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception,
                      params: dict[str, Any]) -> None:
        # The type only: an exception's text may quote data we must not echo or log.
        logger.error("status API: %s %s failed: %s", req.method, req.path, type(exc).__name__)
        _send_json(resp, {"error": "internal error", "status": 500,
                          "detail": "the worker could not answer; see its log"}, 500)

    app = falcon.App(middleware=[_Guard(token, reads_need_token, logger)])
    app.set_error_serializer(_serialize_error)
    app.add_error_handler(Exception, on_unexpected)
    app.req_options.strip_url_path_trailing_slash = True
    for template, resource in routes(view, metrics, logger, version):
        app.add_route(template, resource)
    return app


def routes(view: StatusView, metrics: WorkerMetrics, logger: logging.Logger,
           version: str) -> list[tuple[str, object]]:
    return [
        ("/", _Monitor()),
        ("/static/{name}", _Static()),
        ("/healthz", _Health()),
        ("/readyz", _Ready(view)),
        ("/metrics", _Metrics(metrics)),
        ("/api/v1/status", _Status(view)),
        ("/api/v1/tasks", _Tasks(view)),
        ("/api/v1/tasks/{task_id}", _Task(view)),
        ("/api/v1/tasks/{task_id}/stop", _StopTask(view, logger)),
        ("/api/v1/drain", _Drain(view, logger)),
        ("/api/v1/openapi.json", _OpenAPI(version)),
    ]
