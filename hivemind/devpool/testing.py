"""Small helpers for driving the development pool and a worker from scripts, tests and
benchmarks: a free loopback port, polling with a deadline, a task archive from strings, and a
central-directory bomb (a zip of millions of empty members, built cheaply)."""

from __future__ import annotations

import io
import socket
import struct
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `pred` until it returns something truthy (returned) or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def task_zip(files: dict[str, str]) -> bytes:
    """A task archive holding `files` (name → text)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return buf.getvalue()


_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")


def directory_zip(path: Path, members: int, *, declared: int | None = None,
                  declared_bytes: int | None = None, zip64: bool = False) -> Path:
    """A zip of `members` empty files, written as a central directory only (zipfile reads no
    local header before a member is opened). `declared`/`declared_bytes` make the end record lie."""
    with open(path, "wb") as f:
        size = 0
        batch: list[bytes] = []
        for i in range(members):
            name = b"%07d" % i
            batch.append(_CENTRAL.pack(b"PK\x01\x02", 20, 3, 20, 0, 0, 0, 0, 0x21, 0, 0, 0,
                                       len(name), 0, 0, 0, 0, 0o100644 << 16, 0) + name)
            if len(batch) == 65536:
                chunk = b"".join(batch)
                f.write(chunk)
                size += len(chunk)
                batch.clear()
        chunk = b"".join(batch)
        f.write(chunk)
        size += len(chunk)
        count = members if declared is None else declared
        cd_bytes = size if declared_bytes is None else declared_bytes
        if zip64:
            record_at = size
            f.write(struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count,
                                cd_bytes, 0))
            f.write(struct.pack("<4sLQL", b"PK\x06\x07", 0, record_at, 1))
            f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF,
                                0xFFFFFFFF, 0))
        else:
            f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, min(count, 0xFFFF),
                                min(count, 0xFFFF), min(cd_bytes, 0xFFFFFFFF), 0, 0))
    return path
