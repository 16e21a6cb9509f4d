"""Relay of the wheel fetch step, run inside its empty network namespace (stdlib only: it is
passed to the interpreter that runs pip as `python -c`, so it needs nothing importable).

    python -c RELAY UNIX_SOCKET ARGV...

Listens on 127.0.0.1 (the namespace's own loopback, which the caller brought up), replaces
`{proxy}` in ARGV with its address, runs ARGV, and forwards every connection to UNIX_SOCKET,
where the worker's filtering proxy (fetch_proxy.py) decides. Exits with ARGV's exit status.
"""

import contextlib
import os
import socket
import subprocess
import sys
import threading


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _serve(conn: socket.socket, path: str) -> None:
    up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        up.connect(path)
        t = threading.Thread(target=_pump, args=(up, conn), daemon=True)
        t.start()
        _pump(conn, up)
        t.join()
    except OSError:
        pass
    finally:
        conn.close()
        up.close()


def main(argv: list[str]) -> int:
    path, cmd = argv[1], argv[2:]
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    url = f"http://127.0.0.1:{srv.getsockname()[1]}"

    def accept() -> None:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=_serve, args=(conn, path), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    proc = subprocess.Popen([a.replace("{proxy}", url) for a in cmd])
    return proc.wait()


if __name__ == "__main__":
    sys.stdout.flush()
    os._exit(main(sys.argv))
