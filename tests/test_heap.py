"""The idle daemon hands its heap's holes back to the kernel (hivemind/heap.py): freed memory
below a live allocation stays resident until malloc_trim, which the daemon calls once it has
been quiet for an idle tick."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hivemind

ROOT = Path(hivemind.__file__).resolve().parent.parent

# 64 MiB in 4 KiB blocks (above pymalloc's 512 bytes: glibc's heap), then all freed but the last
# one, which pins the top of the heap so a plain free can't shrink it.
CODE = """
from hivemind.heap import release_free_heap
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024
blocks = [bytearray(4096) for _ in range(16384)]
pin = blocks[-1]
del blocks
held = anon()
returned = release_free_heap()
print(held, anon(), returned)
"""


def test_release_free_heap_returns_freed_memory_below_a_live_block() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True,
                         cwd=ROOT, timeout=60).stdout.split()
    held, after, returned = int(out[0]), int(out[1]), out[2] == "True"
    assert returned
    assert held - after >= 48, f"RssAnon {held} MiB -> {after} MiB: the holes stayed resident"
