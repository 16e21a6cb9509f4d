"""Archive directory bombs are refused from the end records, before zipfile lists members
(issue 14): a 106 MB zip whose central directory lists 2 million empty members used to cost
1.3 GiB and 12 s of a gRPC thread."""

from __future__ import annotations

import tracemalloc
import zipfile
from pathlib import Path

import pytest

from hivemind.archive import (
    ArchiveRules,
    check_directory,
    extract_task_archive,
    inspect_task_archive,
)
from hivemind.devpool.testing import directory_zip
from hivemind.errors import ArchiveRejected

MiB = 1024 * 1024
RULES = ArchiveRules(max_archive_bytes=512 * MiB, max_members=10000,
                     max_uncompressed_bytes=2048 * MiB, max_ratio=200)
MEMORY_LIMIT = 16 * MiB


@pytest.fixture(scope="session")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("directory-bombs")
    plain = directory_zip(d / "plain.zip", 2_000_000)
    return {
        "plain": plain,
        "zip64": directory_zip(d / "zip64.zip", 2_000_000, zip64=True),
        "lying count": directory_zip(d / "lying.zip", 2_000_000, declared=5),
    }


def test_the_generator_makes_zips_zipfile_reads() -> None:
    """The probe itself works: zipfile lists every member of a small one, plain and zip64."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for zip64 in (False, True):
            path = directory_zip(Path(tmp) / f"small-{zip64}.zip", 300, zip64=zip64)
            with zipfile.ZipFile(path) as zf:
                assert len(zf.infolist()) == 300
            assert inspect_task_archive(path, RULES).members == 300
            assert check_directory(path.read_bytes(), RULES).zip64 is zip64


@pytest.mark.parametrize("kind", ["plain", "zip64", "lying count"])
@pytest.mark.parametrize("as_bytes", [False, True], ids=["file", "bytes"])
def test_two_million_members_are_refused_with_little_memory(
        bombs: dict[str, Path], kind: str, as_bytes: bool, tmp_path: Path) -> None:
    path = bombs[kind]
    source: bytes | Path = path.read_bytes() if as_bytes else path
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveRejected, match="max_members"):
            inspect_task_archive(source, RULES)
        with pytest.raises(ArchiveRejected, match="max_members"):
            extract_task_archive(source, tmp_path / "ws", RULES)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"{kind}: {peak / MiB:.1f} MiB traced"
    assert not (tmp_path / "ws").exists()


def test_a_directory_within_the_declared_size_but_past_the_count_is_counted(tmp_path: Path) -> None:
    """The end record says 5 members and a directory small enough; the headers say 20000."""
    path = directory_zip(tmp_path / "counted.zip", 20000, declared=5)
    assert path.stat().st_size < RULES.max_directory_bytes
    with pytest.raises(ArchiveRejected, match="more than 10000 members"):
        inspect_task_archive(path, RULES)


def test_declared_directory_size_past_the_limit(tmp_path: Path) -> None:
    path = directory_zip(tmp_path / "big-dir.zip", 3, declared_bytes=RULES.max_directory_bytes + 1)
    with pytest.raises(ArchiveRejected, match="central directory of"):
        check_directory(path, RULES)


@pytest.mark.parametrize("data", [b"", b"not a zip at all", b"PK\x05\x06" + bytes(10),
                                  b"PK\x06\x07" + bytes(16) + b"PK\x05\x06" + bytes(18)])
def test_broken_end_records_are_refused(data: bytes) -> None:
    with pytest.raises(ArchiveRejected, match="not a zip"):
        check_directory(data, RULES)


def test_real_zips_pass(tmp_path: Path) -> None:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(50):
            zf.writestr(f"dir/file{i}.txt", "x" * i)
        zf.comment = b"a comment"
    info = check_directory(buf.getvalue(), RULES)
    assert info.members == 50 and not info.zip64
    buf64 = io.BytesIO()
    with zipfile.ZipFile(buf64, "w", allowZip64=True) as zf, \
            zf.open("big.txt", "w", force_zip64=True) as f:
        f.write(b"hello")
    assert check_directory(buf64.getvalue(), RULES).members == 1
    assert extract_task_archive(buf64.getvalue(), tmp_path / "ws", RULES).members == 1
