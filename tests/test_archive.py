"""Task archive extraction and result packing, against real zips and a real filesystem."""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import threading
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import pytest

from hivemind import archive
from hivemind.archive import (
    ArchiveRules,
    extract_task_archive,
    inspect_task_archive,
    pack_result,
)
from hivemind.config import ArchiveConfig
from hivemind.errors import ArchiveRejected

RULES = ArchiveRules(max_archive_bytes=8 << 20, max_members=50,
                     max_uncompressed_bytes=16 << 20, max_ratio=200.0)


def make_zip(members: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on duplicate names, which we want to write
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members:
                zf.writestr(name, data)
    return buf.getvalue()


def info(name: str, mode: int) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name)
    zi.create_system = 3
    zi.external_attr = mode << 16
    return zi


def patch_all(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and data.count(old) == 2  # local header + central directory
    return data.replace(old, new)


def central_offsets(data: bytes) -> list[int]:
    out, i = [], data.find(b"PK\x01\x02")
    while i >= 0:
        out.append(i)
        i = data.find(b"PK\x01\x02", i + 4)
    return out


def rejected(data: bytes, dest: Path, rule: str, rules: ArchiveRules = RULES) -> None:
    with pytest.raises(ArchiveRejected) as exc:
        extract_task_archive(data, dest, rules)
    assert rule in str(exc.value)
    assert not dest.exists(), "a rejected archive must leave nothing behind"


# -- extraction: the happy path --------------------------------------------------------------

def test_extracts_files_and_dirs_with_safe_modes(tmp_path: Path) -> None:
    data = make_zip([
        ("run.py", b"print('hi')\n"),
        (info("bin/", stat.S_IFDIR | 0o7777), b""),
        (info("bin/tool", stat.S_IFREG | 0o6777), b"#!/bin/sh\n"),   # setuid+setgid+world-writable
        ("data/nested/deep.txt", b"x" * 1000),
    ])
    dest = tmp_path / "ws"
    summary = extract_task_archive(data, dest, RULES)
    assert summary.members == 4 and summary.bytes == 12 + 10 + 1000
    assert (dest / "run.py").read_bytes() == b"print('hi')\n"
    assert (dest / "data/nested/deep.txt").read_bytes() == b"x" * 1000
    assert stat.S_IMODE(os.stat(dest / "bin/tool").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(dest / "run.py").st_mode) == 0o644
    for d in ("bin", "data", "data/nested"):
        assert stat.S_IMODE(os.stat(dest / d).st_mode) == 0o755


def test_extracts_from_a_path_into_an_existing_empty_dir(tmp_path: Path) -> None:
    src = tmp_path / "task.zip"
    src.write_bytes(make_zip([("main.py", b"1")]))
    dest = tmp_path / "ws"
    dest.mkdir()
    extract_task_archive(src, dest, RULES)
    assert os.listdir(dest) == ["main.py"]


def test_rejection_empties_a_preexisting_dest_but_keeps_it(tmp_path: Path) -> None:
    dest = tmp_path / "ws"
    dest.mkdir()
    data = make_zip([("a.txt", b"a"), ("b/c.txt", b"c"), ("/etc/evil", b"x")])
    with pytest.raises(ArchiveRejected):
        extract_task_archive(data, dest, RULES)
    assert dest.is_dir() and os.listdir(dest) == []


def test_refuses_a_non_empty_dest(tmp_path: Path) -> None:
    dest = tmp_path / "ws"
    dest.mkdir()
    (dest / "keep").write_text("mine")
    with pytest.raises(ArchiveRejected, match="not an empty directory"):
        extract_task_archive(make_zip([("a", b"")]), dest, RULES)
    assert (dest / "keep").read_text() == "mine"


def test_small_very_compressible_files_are_fine(tmp_path: Path) -> None:
    # 512 KiB of zeros compresses ~1000:1; below RATIO_MIN_BYTES that is not a bomb.
    extract_task_archive(make_zip([("zeros.bin", bytes(512 * 1024))]), tmp_path / "ws", RULES)


def test_utf8_name_without_the_flag_is_accepted(tmp_path: Path) -> None:
    data = patch_all(make_zip([("aXXb.txt", b"ok")]), b"aXXb.txt", "aéb.txt".encode())
    extract_task_archive(data, tmp_path / "ws", RULES)
    assert (tmp_path / "ws" / "aéb.txt").read_bytes() == b"ok"


def test_rules_from_config() -> None:
    rules = ArchiveRules.from_config(ArchiveConfig(max_archive_mb=3, max_members=7,
                                                   max_uncompressed_mb=5, max_ratio=9.5))
    assert rules == ArchiveRules(3 << 20, 7, 5 << 20, 9.5)


# -- extraction: every rule ------------------------------------------------------------------

def test_rejects_an_archive_over_the_size_cap(tmp_path: Path) -> None:
    data = make_zip([("a", os.urandom(4096))])
    small = ArchiveRules(1024, 50, 1 << 20, 200)
    rejected(data, tmp_path / "ws", "max_archive_bytes", small)
    with pytest.raises(ArchiveRejected, match="max_archive_bytes"):
        inspect_task_archive(data, small)


def test_rejects_too_many_members(tmp_path: Path) -> None:
    data = make_zip([(f"f{i}", b"") for i in range(51)])
    rejected(data, tmp_path / "ws", "max_members")


def test_rejects_declared_total_over_the_cap(tmp_path: Path) -> None:
    rules = ArchiveRules(8 << 20, 50, 100_000, 1e9)
    data = make_zip([("a", os.urandom(60_000)), ("b", os.urandom(60_000))])
    rejected(data, tmp_path / "ws", "max_uncompressed_bytes", rules)


def test_rejects_a_member_that_lies_about_its_size(tmp_path: Path) -> None:
    # The central directory and local header claim 10 bytes; the stream holds 200 KB.
    data = bytearray(make_zip([("lie.bin", os.urandom(200_000))]))
    for off in central_offsets(bytes(data)):
        struct.pack_into("<I", data, off + 24, 10)
    local = bytes(data).find(b"PK\x03\x04")
    struct.pack_into("<I", data, local + 22, 10)
    rejected(bytes(data), tmp_path / "ws", "corrupt member")


def test_rejects_a_compression_bomb(tmp_path: Path) -> None:
    data = make_zip([("bomb.bin", bytes(4 << 20))])     # 4 MiB of zeros: ~1000:1
    rejected(data, tmp_path / "ws", "max_ratio")


@pytest.mark.parametrize("name", ["/etc/passwd", "C:/windows/x"])
def test_rejects_absolute_paths(tmp_path: Path, name: str) -> None:
    rejected(make_zip([(name, b"x")]), tmp_path / "ws", "absolute paths")


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "a/.."])
def test_rejects_dotdot(tmp_path: Path, name: str) -> None:
    rejected(make_zip([(name, b"x")]), tmp_path / "ws", "'..' components")
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize("name", ["a\\..\\..\\escape", "dir\\file"])
def test_rejects_backslashes(tmp_path: Path, name: str) -> None:
    rejected(make_zip([(name, b"x")]), tmp_path / "ws", "backslash")


@pytest.mark.parametrize("name", ["a//b", "./a", "a/./b", "new\nline"])
def test_rejects_odd_names(tmp_path: Path, name: str) -> None:
    rejected(make_zip([(name, b"x")]), tmp_path / "ws", "member names")


def test_rejects_symlink_members(tmp_path: Path) -> None:
    data = make_zip([(info("leak", stat.S_IFLNK | 0o777), b"/etc/shadow")])
    rejected(data, tmp_path / "ws", "symlinks")


@pytest.mark.parametrize("kind", [stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK])
def test_rejects_special_members(tmp_path: Path, kind: int) -> None:
    rejected(make_zip([(info("dev", kind | 0o666), b"")]), tmp_path / "ws", "special files")


def test_rejects_names_that_are_not_utf8(tmp_path: Path) -> None:
    data = patch_all(make_zip([("aXb.txt", b"x")]), b"aXb.txt", b"a\xffb.txt")
    rejected(data, tmp_path / "ws", "utf-8 names")


def test_rejects_utf8_flagged_names_that_are_not_utf8(tmp_path: Path) -> None:
    data = bytearray(patch_all(make_zip([("aXb.txt", b"x")]), b"aXb.txt", b"a\xffb.txt"))
    for off in central_offsets(bytes(data)):
        struct.pack_into("<H", data, off + 8, struct.unpack_from("<H", data, off + 8)[0] | 0x800)
    rejected(bytes(data), tmp_path / "ws", "utf-8 names")


def test_rejects_duplicates(tmp_path: Path) -> None:
    rejected(make_zip([("a.txt", b"1"), ("a.txt", b"2")]), tmp_path / "ws", "duplicate names")


def test_rejects_a_name_that_is_both_file_and_directory(tmp_path: Path) -> None:
    rejected(make_zip([("a", b"1"), ("a/b", b"2")]), tmp_path / "ws", "both a file and a directory")


def test_rejects_encrypted_members(tmp_path: Path) -> None:
    data = bytearray(make_zip([("secret.txt", b"x")]))
    for off in central_offsets(bytes(data)):
        struct.pack_into("<H", data, off + 8, struct.unpack_from("<H", data, off + 8)[0] | 0x1)
    rejected(bytes(data), tmp_path / "ws", "encrypted")


@pytest.mark.parametrize("data", [b"", b"hello, not a zip", b"PK\x03\x04" + bytes(100)])
def test_rejects_non_zips(tmp_path: Path, data: bytes) -> None:
    rejected(data, tmp_path / "ws", "not a zip")


def test_inspect_checks_without_writing(tmp_path: Path) -> None:
    summary = inspect_task_archive(make_zip([("a", b"12"), ("b/c", b"345")]), RULES)
    assert (summary.members, summary.bytes) == (2, 5)
    with pytest.raises(ArchiveRejected, match="symlinks"):
        inspect_task_archive(make_zip([(info("l", stat.S_IFLNK | 0o777), b"/")]), RULES)


def test_directory_creation_never_follows_a_planted_link(tmp_path: Path) -> None:
    # Defense in depth for a dest that gains a link behind our back: the walk refuses it.
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "ws"
    dest.mkdir()
    os.symlink(outside, dest / "sub")
    root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(ArchiveRejected, match="not a directory"):
            archive._makedirs_at(root, ("sub", "deeper"))
    finally:
        os.close(root)
    assert os.listdir(outside) == []


# -- packing ---------------------------------------------------------------------------------

RECORD = {"task_id": "t1", "status": "succeeded", "exit_code": 0, "reason": "exited",
          "node": "n1", "started_at": 1.0, "finished_at": 2.0}


def names_of(zip_path: Path) -> list[str]:
    with zipfile.ZipFile(zip_path) as zf:
        return zf.namelist()


def meta_of(zip_path: Path) -> dict[str, object]:
    with zipfile.ZipFile(zip_path) as zf:
        result: dict[str, object] = json.loads(zf.read("_hivemind/execution.json"))
        return result


def test_packs_regular_files_sorted_with_record_and_log(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "out" / "sub").mkdir(parents=True)
    (ws / "b.txt").write_text("b")
    (ws / "a.txt").write_text("a")
    (ws / "out" / "sub" / "r.csv").write_text("1,2\n")
    (ws / ".venv" / "lib").mkdir(parents=True)
    (ws / ".venv" / "lib" / "x.py").write_text("skip")
    (ws / "out" / "__pycache__").mkdir()
    (ws / "out" / "__pycache__" / "m.pyc").write_bytes(b"skip")
    log = tmp_path / "output.log"
    log.write_text("line 1\nline 2\n")
    dest = tmp_path / "result.zip"
    summary = pack_result(ws, dest, RECORD, log, 1 << 20)
    assert summary.files == 3 and not summary.truncated
    assert names_of(dest) == ["_hivemind/output.log", "a.txt", "b.txt", "out/sub/r.csv",
                              "_hivemind/execution.json"]
    with zipfile.ZipFile(dest) as zf:
        assert zf.read("_hivemind/output.log") == b"line 1\nline 2\n"
        assert zf.read("out/sub/r.csv") == b"1,2\n"
        assert all(stat.S_IMODE(i.external_attr >> 16) == 0o644 for i in zf.infolist())
    meta = meta_of(dest)
    assert meta["status"] == "succeeded" and meta["truncated"] is False
    assert meta["result_cap_bytes"] == 1 << 20
    assert not (tmp_path / "result.zip.part").exists()


def test_pack_order_is_deterministic(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in ["z", "a", "m", "B", "a0"]:
        (ws / name).write_text(name)
    pack_result(ws, tmp_path / "1.zip", RECORD, None, 1 << 20)
    pack_result(ws, tmp_path / "2.zip", RECORD, None, 1 << 20)
    assert names_of(tmp_path / "1.zip") == names_of(tmp_path / "2.zip")
    assert names_of(tmp_path / "1.zip")[:-1] == sorted(["z", "a", "m", "B", "a0"])


def test_links_give_nothing_from_the_host(tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text("HOST SECRET")
    secret_dir = tmp_path / "host-dir"
    secret_dir.mkdir()
    (secret_dir / "inner").write_text("HOST SECRET")
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "ok.txt").write_text("fine")
    os.symlink("/etc/hostname", ws / "leak")
    os.symlink(secret, ws / "leak2")
    os.symlink(secret_dir, ws / "leakdir")
    os.mkfifo(ws / "fifo")
    os.link(secret, ws / "hardlink") if os.stat(tmp_path).st_dev == os.stat(ws).st_dev else None
    summary = pack_result(ws, tmp_path / "r.zip", RECORD, None, 1 << 20)
    names = names_of(tmp_path / "r.zip")
    assert "leak" not in names and "leak2" not in names and "fifo" not in names
    assert not any(n.startswith("leakdir") for n in names)
    assert {"leak", "leak2", "leakdir", "fifo"} <= set(summary.skipped)
    # A hard link is a regular file the task could already read; packing it is no leak.
    with zipfile.ZipFile(tmp_path / "r.zip") as zf:
        for n in names:
            if n not in ("hardlink", "_hivemind/execution.json"):
                assert b"HOST SECRET" not in zf.read(n)


def test_a_file_swapped_for_a_link_after_the_walk_is_not_followed(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text("HOST SECRET")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f.txt").write_text("HOST SECRET")
    ws = tmp_path / "ws"
    (ws / "d").mkdir(parents=True)
    (ws / "d" / "f.txt").write_text("task data")
    (ws / "x.txt").write_text("task data")
    real_walk = archive._walk

    def walk_then_swap(*args, **kwargs):  # type: ignore[no-untyped-def]
        found = list(real_walk(*args, **kwargs))
        if not args[1]:   # top level: swap after the whole tree was listed
            os.unlink(ws / "x.txt")
            os.symlink(secret, ws / "x.txt")
            os.rename(ws / "d", ws / "d-old")
            os.symlink(outside, ws / "d")
        return iter(found)

    monkeypatch.setattr(archive, "_walk", walk_then_swap)
    summary = pack_result(ws, tmp_path / "r.zip", RECORD, None, 1 << 20)
    assert summary.files == 0
    assert set(summary.skipped) == {"d/f.txt", "x.txt"}
    assert names_of(tmp_path / "r.zip") == ["_hivemind/execution.json"]


def test_cap_stops_adding_files_and_says_so(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    for i in range(5):
        (ws / f"f{i}.bin").write_bytes(os.urandom(1000))
    summary = pack_result(ws, tmp_path / "r.zip", RECORD, None, 2500)
    assert summary.truncated and summary.files == 2 and summary.bytes == 2000
    assert summary.skipped == ["f2.bin", "f3.bin", "f4.bin"]
    assert names_of(tmp_path / "r.zip") == ["f0.bin", "f1.bin", "_hivemind/execution.json"]
    meta = meta_of(tmp_path / "r.zip")
    assert meta["truncated"] is True and meta["result_cap_bytes"] == 2500
    assert meta["status"] == "succeeded"


def test_a_huge_log_keeps_its_tail(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    log = tmp_path / "output.log"
    log.write_bytes(b"old\n" * 1000 + b"THE END\n")
    pack_result(ws, tmp_path / "r.zip", RECORD, log, 200)
    with zipfile.ZipFile(tmp_path / "r.zip") as zf:
        kept = zf.read("_hivemind/output.log")
    assert len(kept) == 100 and kept.endswith(b"THE END\n")
    assert meta_of(tmp_path / "r.zip")["output_log_truncated"] is True


def test_a_workspace_that_is_a_link_packs_only_the_record(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "secret").write_text("x")
    os.symlink(tmp_path / "real", tmp_path / "ws")
    summary = pack_result(tmp_path / "ws", tmp_path / "r.zip", RECORD, None, 1 << 20)
    assert summary.files == 0 and summary.skipped == ["."]
    assert names_of(tmp_path / "r.zip") == ["_hivemind/execution.json"]


def test_packing_streams_instead_of_buffering(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    chunk = os.urandom(64 * 1024)
    with open(ws / "big.bin", "wb") as f:
        for _ in range(32 * 16):              # 32 MiB
            f.write(chunk)
    tracemalloc.start()
    try:
        summary = pack_result(ws, tmp_path / "r.zip", RECORD, None, 1 << 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.bytes == 32 << 20
    assert peak < 8 << 20, f"peak Python allocation {peak} bytes while packing 32 MiB"


def test_concurrent_packs_of_one_workspace_do_not_interfere(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "a").write_text("a")
    errors: list[BaseException] = []

    def pack(i: int) -> None:
        try:
            pack_result(ws, tmp_path / f"r{i}.zip", RECORD, None, 1 << 20)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=pack, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(names_of(tmp_path / f"r{i}.zip") == ["a", "_hivemind/execution.json"] for i in range(4))


def test_compressed_formats_are_stored_and_the_level_is_honoured(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "photo.PNG").write_bytes(os.urandom(2000))
    text = b"".join(f"{i},{i * 3.7:.3f},value-{i % 97}\n".encode() for i in range(20000))
    (ws / "data.csv").write_bytes(text)
    sizes = {}
    for level in (1, 9):
        pack_result(ws, tmp_path / f"r{level}.zip", RECORD, None, 1 << 30, compresslevel=level)
        with zipfile.ZipFile(tmp_path / f"r{level}.zip") as zf:
            assert zf.getinfo("photo.PNG").compress_type == zipfile.ZIP_STORED
            csv = zf.getinfo("data.csv")
            assert csv.compress_type == zipfile.ZIP_DEFLATED and zf.read("data.csv") == text
            sizes[level] = csv.compress_size
    assert sizes[9] < sizes[1], sizes
