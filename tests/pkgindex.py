"""A package index on 127.0.0.1 for tests: hand-made wheels and sdists, PEP 503 simple pages.

No build backend is needed to make them: a wheel is a zip with METADATA, WHEEL and RECORD, an
sdist a tar.gz with PKG-INFO and whatever setup.py / pyproject.toml the test wants in it.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import re
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def make_wheel(dest: Path, name: str, version: str, files: dict[str, str],
               requires: tuple[str, ...] = ()) -> Path:
    """A py3-none-any wheel holding `files` (path in site-packages -> text)."""
    dist = f"{name.replace('-', '_')}-{version}"
    info = f"{dist}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    entries = {**files, f"{info}/METADATA": meta,
               f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hivemind-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    out = dest / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as zf:
        for path, text in entries.items():
            zf.writestr(path, text)
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return out


def make_sdist(dest: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """An sdist (tar.gz) with `files` at its root (setup.py, pyproject.toml, a backend...)."""
    base = f"{name}-{version}"
    out = dest / f"{base}.tar.gz"
    entries = {"PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", **files}
    with tarfile.open(out, "w:gz") as tf:
        for path, text in entries.items():
            data = text.encode()
            ti = tarfile.TarInfo(f"{base}/{path}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return out


class _Handler(http.server.BaseHTTPRequestHandler):
    root: Path
    hits: list[str]

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.hits.append(self.path)
        parts = [p for p in self.path.split("?")[0].split("/") if p]
        files = sorted(self.root.iterdir())
        if parts[:1] == ["simple"] and len(parts) == 2:
            links = [f for f in files if _norm(f.name.split("-")[0]) == _norm(parts[1])]
            if not links:
                self.send_error(404)
                return
            body = "<html><body>" + "".join(
                f'<a href="/files/{f.name}">{f.name}</a><br>' for f in links) + "</body></html>"
            self._send(body.encode(), "text/html")
        elif parts[:1] == ["files"] and len(parts) == 2 and (self.root / parts[1]).is_file():
            self._send((self.root / parts[1]).read_bytes(), "application/octet-stream")
        else:
            self.send_error(404)

    def _send(self, data: bytes, ctype: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class Index:
    def __init__(self, root: Path, url: str, hits: list[str]) -> None:
        self.root = root
        self.url = url                 # http://127.0.0.1:PORT/simple
        self.hits = hits               # request paths, in order


@contextmanager
def serve_index(root: Path) -> Iterator[Index]:
    hits: list[str] = []
    handler = type("H", (_Handler,), {"root": root, "hits": hits})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield Index(root, f"http://127.0.0.1:{srv.server_address[1]}/simple", hits)
    finally:
        srv.shutdown()
        srv.server_close()
