"""The OpenAPI 3.1 document of the status API, served at /api/v1/openapi.json.

Schemas are derived from the TypedDicts in view.py, so the document can't drift from the shapes
the daemon fills; the paths are listed here and a test checks them against the app's routes.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from hivemind.status import view

JSON = "application/json"


def _schema(tp: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    if typing.is_typeddict(tp):
        name = tp.__name__
        if name not in schemas:
            schemas[name] = {}  # placeholder first: guards against recursion
            hints = typing.get_type_hints(tp)
            schemas[name] = {
                "type": "object",
                "properties": {k: _schema(v, schemas) for k, v in hints.items()},
                "required": sorted(tp.__required_keys__),
            }
            if tp.__doc__ and not tp.__doc__.startswith(name + "("):
                schemas[name]["description"] = tp.__doc__.strip()
        return {"$ref": f"#/components/schemas/{name}"}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_schema(a, schemas) for a in typing.get_args(tp)]}
    if origin is list:
        (item,) = typing.get_args(tp)
        return {"type": "array", "items": _schema(item, schemas)}
    simple = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
    if tp in simple:
        return {"type": simple[tp]}
    raise TypeError(f"no OpenAPI schema for {tp!r}")


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(description: str, ref: str) -> dict[str, Any]:
    return {"description": description,
            "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def _op(summary: str, responses: dict[str, Any], *, public: bool = False,
        write: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": dict(responses)}
    if public:
        op["security"] = []
    else:
        op["responses"]["401"] = _error("Missing or wrong bearer token")
    if write:
        op["responses"]["403"] = _error("No token configured on the worker")
        op["description"] = "Always needs the bearer token."
    return op


TASK_ID = {"name": "task_id", "in": "path", "required": True,
           "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"}}


def openapi_document(version: str) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    _schema(view.StatusDict, schemas)
    _schema(view.TaskDict, schemas)
    schemas["TaskList"] = {"type": "object", "required": ["tasks"],
                           "properties": {"tasks": {"type": "array",
                                                    "items": {"$ref": "#/components/schemas/TaskDict"}}}}
    schemas["Error"] = {"type": "object", "required": ["error", "status", "detail"],
                        "properties": {"error": {"type": "string"}, "status": {"type": "integer"},
                                       "detail": {"type": "string"}}}
    schemas["Ready"] = {"type": "object", "required": ["ready"],
                        "properties": {"ready": {"type": "boolean"}, "reason": {"type": "string"}}}
    text = {"description": "OK"}
    paths: dict[str, Any] = {
        "/": {"get": _op("Monitor page (HTML; carries no data, asks for the token itself)",
                         {"200": {**text, "content": {"text/html": {}}}}, public=True)},
        "/static/{name}": {"get": {**_op("Script and style of the monitor page",
                                         {"200": text, "404": _error("No such file")}, public=True),
                                   "parameters": [{"name": "name", "in": "path", "required": True,
                                                   "schema": {"type": "string",
                                                              "enum": ["monitor.js", "monitor.css"]}}]}},
        "/healthz": {"get": _op("Process is alive (never needs a token)",
                                {"200": {"description": "Alive", "content": {JSON: {}}}}, public=True)},
        "/readyz": {"get": _op("Registered with the pool and an executor usable",
                               {"200": _json("Ready", "Ready"), "503": _json("Not ready", "Ready")})},
        "/metrics": {"get": _op("Prometheus text exposition",
                                {"200": {**text, "content": {"text/plain": {}}}})},
        "/api/v1/status": {"get": _op("Node, pool, executor, resources, slots, warnings",
                                      {"200": _json("Status", "StatusDict")})},
        "/api/v1/tasks": {"get": _op("Known tasks, newest first", {"200": _json("Tasks", "TaskList")})},
        "/api/v1/tasks/{task_id}": {"get": {**_op("One task with its output tail",
                                                  {"200": _json("Task", "TaskDict"),
                                                   "404": _error("Unknown task")}),
                                            "parameters": [TASK_ID]}},
        "/api/v1/tasks/{task_id}/stop": {"post": {**_op("Ask a task to stop",
                                                        {"202": {"description": "Stop requested"},
                                                         "404": _error("Unknown task")}, write=True),
                                                  "parameters": [TASK_ID]}},
        "/api/v1/drain": {"post": _op("Take no new tasks; running ones finish",
                                      {"202": {"description": "Draining"}}, write=True)},
        "/api/v1/openapi.json": {"get": _op("This document", {"200": {**text, "content": {JSON: {}}}})},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "hivemind-worker status API", "version": version or "0"},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }
