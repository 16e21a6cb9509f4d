"""A worker gRPC server in its own process, so a test (or bench) can measure the server's memory
apart from the client's: `python abuse_server.py CONFIG.json` prints the bound port, then serves
until its stdin closes. The acceptor accepts and forgets (nothing is executed).

CONFIG.json: {"auth": {ServerAuthConfig fields}, "server": {other ServerConfig fields},
              "max_archive_mb": int or null, "environ": {...}}
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import fields
from typing import Any

from hivemind.config import ServerAuthConfig, ServerConfig
from hivemind.server import Decision, ExecuteRequest, start_worker_server


class ForgetfulAcceptor:
    def execute(self, request: ExecuteRequest) -> Decision:
        return Decision(True, "accepted")

    def stop(self, task_id: str, peer: str) -> Decision:
        return Decision(True, "stopping")


def main(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        conf: dict[str, Any] = json.load(f)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    auth = ServerAuthConfig(**conf.get("auth", {}))
    known = {f.name for f in fields(ServerConfig)}
    extra = {k: v for k, v in conf.get("server", {}).items() if k in known}
    cfg = ServerConfig(listen_host="127.0.0.1", port=0, auth=auth, **extra)
    kw: dict[str, Any] = {}
    if conf.get("max_archive_mb") is not None:
        kw["max_archive_mb"] = conf["max_archive_mb"]
    running = start_worker_server(cfg, ForgetfulAcceptor(), logger=logging.getLogger("abuse"),
                                  environ=conf.get("environ") or None, **kw)
    print(running.port, flush=True)
    sys.stdin.read()
    running.stop(None)


if __name__ == "__main__":
    main(sys.argv[1])
