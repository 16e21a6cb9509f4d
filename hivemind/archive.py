"""Task archives in, result archives out. Both directions treat the other side as hostile.

In: `extract_task_archive` checks every central-directory entry before writing a byte (size,
count, ratio, names, types, encryption, duplicates), then extracts through directory file
descriptors with O_NOFOLLOW|O_EXCL, counting real bytes because declared sizes lie. Files are
0644, directories 0755, whatever the archive says. On rejection nothing of the archive is left.

Out: `pack_result` streams the workspace into a zip under a byte cap. It opens every path one
component at a time relative to a directory fd with O_NOFOLLOW, and only packs what fstat says is
a regular file, so a symlink planted by the task (or swapped in after the walk) yields nothing
from the host.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import stat
import struct
import time
import zipfile
import zlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hivemind.config import ArchiveConfig
from hivemind.errors import ArchiveRejected

MiB = 1024 * 1024
CHUNK = 1024 * 1024
# Small members compress absurdly well (a 10 KiB file of zeros: ~300:1); zip bombs are large.
RATIO_MIN_BYTES = 1 * MiB
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
_FLAG_ENCRYPTED = 0x1
_FLAG_UTF8 = 0x800
_DOS_DIR = 0x10

RESULT_META_DIR = "_hivemind"
DEFAULT_SKIP_ROOT = frozenset({".venv", ".cache", RESULT_META_DIR})
DEFAULT_SKIP_ANYWHERE = frozenset({"__pycache__"})
MAX_SKIPPED_LISTED = 1000
# Deflating these again costs CPU (while the task still holds its slot) and saves nothing.
STORED_SUFFIXES = frozenset({".zip", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".png",
                             ".jpg", ".jpeg", ".gif", ".webp", ".mp4", ".mkv", ".mp3", ".ogg"})
# Level 1 deflates text ~5x faster than the default 6 for ~15% more bytes (measured here).
DEFAULT_COMPRESSLEVEL = 1


# What the central directory of `max_members` entries may reasonably take: the fixed 46-byte
# header plus 1 KiB of name, extra field and comment each on average, plus slack.
DIRECTORY_BYTES_PER_MEMBER = 46 + 1024
DIRECTORY_SLACK_BYTES = 64 * 1024
_EOCD = struct.Struct("<4s4H2LH")                 # end of central directory record, 22 bytes
_EOCD_SIG = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sLQL")          # 20 bytes, right before the EOCD
_ZIP64_LOCATOR_SIG = b"PK\x06\x07"
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")         # 56 bytes, right before the locator
_ZIP64_EOCD_SIG = b"PK\x06\x06"
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")        # central directory file header, 46 bytes
_CENTRAL_SIG = b"PK\x01\x02"
_MAX_COMMENT = 0xFFFF


@dataclass(frozen=True)
class ArchiveRules:
    max_archive_bytes: int
    max_members: int
    max_uncompressed_bytes: int
    max_ratio: float

    @property
    def max_directory_bytes(self) -> int:
        return self.max_members * DIRECTORY_BYTES_PER_MEMBER + DIRECTORY_SLACK_BYTES

    @classmethod
    def from_config(cls, cfg: ArchiveConfig) -> ArchiveRules:
        return cls(max_archive_bytes=cfg.max_archive_mb * MiB, max_members=cfg.max_members,
                   max_uncompressed_bytes=cfg.max_uncompressed_mb * MiB, max_ratio=cfg.max_ratio)


@dataclass(frozen=True)
class ExtractSummary:
    members: int
    bytes: int


@dataclass(frozen=True)
class PackSummary:
    files: int
    bytes: int
    truncated: bool
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Member:
    info: zipfile.ZipInfo
    parts: tuple[str, ...]
    is_dir: bool


def _reject(rule: str, detail: str) -> ArchiveRejected:
    return ArchiveRejected(f"archive rejected ({rule}): {detail}")


def _show(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:80] + "...")


# -- extraction ------------------------------------------------------------------------------

def extract_task_archive(source: bytes | Path, dest: Path, rules: ArchiveRules) -> ExtractSummary:
    """Check and extract a task zip into `dest` (created; must not exist or be empty).

    Raises ArchiveRejected naming the broken rule; `dest` is then removed (or emptied, when it
    existed before)."""
    size = len(source) if isinstance(source, bytes) else os.stat(source).st_size
    if size > rules.max_archive_bytes:
        raise _reject("max_archive_bytes", f"{size} bytes, limit {rules.max_archive_bytes}")
    check_directory(source, rules)
    existed = _prepare_dest(dest)
    try:
        with _open_zip(source) as zf:
            members = _check_members(zf, rules)
            written = _extract_all(zf, members, dest, rules)
        return ExtractSummary(members=len(members), bytes=written)
    except BaseException:
        _clear_dest(dest, existed)
        raise


def inspect_task_archive(source: bytes | Path, rules: ArchiveRules) -> ExtractSummary:
    """Check the central directory against `rules` without extracting (fast, before admission).

    `bytes` is the declared total; `extract_task_archive` still counts the real bytes."""
    size = len(source) if isinstance(source, bytes) else os.stat(source).st_size
    if size > rules.max_archive_bytes:
        raise _reject("max_archive_bytes", f"{size} bytes, limit {rules.max_archive_bytes}")
    check_directory(source, rules)
    with _open_zip(source) as zf:
        members = _check_members(zf, rules)
    return ExtractSummary(members=len(members), bytes=sum(m.info.file_size for m in members))


@dataclass(frozen=True)
class DirectoryInfo:
    """What the end records say about the central directory (before zipfile reads it)."""

    members: int
    directory_bytes: int
    zip64: bool


def check_directory(source: bytes | Path, rules: ArchiveRules) -> DirectoryInfo:
    """Refuse an archive whose central directory breaks the limits, reading only its end records
    and at most `rules.max_directory_bytes` of directory: zipfile reads the whole directory and
    builds an object per entry before anyone can count them (2 million empty members: 1.3 GiB).

    The declared count and size come from the end-of-central-directory record and, when there
    is one, the zip64 record (the larger of each counts: zipfile believes the zip64 one). The
    headers in the directory are then counted, because a declared count can lie."""
    if isinstance(source, bytes):
        return _check_directory(memoryview(source), len(source), rules)
    with open(source, "rb") as f:
        size = os.fstat(f.fileno()).st_size

        def read_at(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)
        return _check_directory(read_at, size, rules)


def _check_directory(data: memoryview | Any, size: int, rules: ArchiveRules) -> DirectoryInfo:
    def read_at(offset: int, length: int) -> bytes | memoryview:
        if isinstance(data, memoryview):
            return data[offset:offset + length]
        return data(offset, length)  # type: ignore[no-any-return]

    tail_start = max(0, size - (_EOCD.size + _MAX_COMMENT))
    tail = bytes(read_at(tail_start, size - tail_start))
    at = tail.rfind(_EOCD_SIG)
    if at < 0 or len(tail) - at < _EOCD.size:
        raise _reject("not a zip", "no end of central directory record")
    (_sig, _disk, _cd_disk, _disk_entries, members, cd_bytes, cd_offset,
     _comment) = _EOCD.unpack_from(tail, at)
    eocd_pos = tail_start + at
    end_of_directory = eocd_pos
    zip64 = False
    locator_pos = eocd_pos - _ZIP64_LOCATOR.size
    if locator_pos >= 0:
        locator = bytes(read_at(locator_pos, _ZIP64_LOCATOR.size))
        if locator[:4] == _ZIP64_LOCATOR_SIG:
            record_pos = locator_pos - _ZIP64_EOCD.size
            record = bytes(read_at(record_pos, _ZIP64_EOCD.size)) if record_pos >= 0 else b""
            if len(record) < _ZIP64_EOCD.size or record[:4] != _ZIP64_EOCD_SIG:
                raise _reject("not a zip", "zip64 locator without a zip64 end record")
            fields = _ZIP64_EOCD.unpack(record)
            # 0xFFFF / 0xFFFFFFFF in the classic record mean "see the zip64 one".
            members = max(0 if members == 0xFFFF else members, fields[6], fields[7])
            cd_bytes = max(0 if cd_bytes == 0xFFFFFFFF else cd_bytes, fields[8])
            end_of_directory = record_pos
            zip64 = True
    if members > rules.max_members:
        raise _reject("max_members", f"{members} members declared, limit {rules.max_members}")
    if cd_bytes > rules.max_directory_bytes:
        raise _reject("max_members", f"central directory of {cd_bytes} bytes declared, limit "
                                     f"{rules.max_directory_bytes} for {rules.max_members} members")
    if cd_bytes > end_of_directory:
        raise _reject("not a zip", "central directory larger than the archive")
    # Count the headers where zipfile will look for them (just before the end records).
    directory = read_at(end_of_directory - cd_bytes, cd_bytes)
    counted, pos = 0, 0
    while pos + _CENTRAL.size <= len(directory):
        header = _CENTRAL.unpack_from(directory, pos)
        if header[0] != _CENTRAL_SIG:
            break      # zipfile reports the broken directory itself
        counted += 1
        if counted > rules.max_members:
            raise _reject("max_members", f"more than {rules.max_members} members in the "
                                         f"central directory (limit {rules.max_members})")
        pos += _CENTRAL.size + header[12] + header[13] + header[14]
    return DirectoryInfo(max(members, counted), cd_bytes, zip64)


def _prepare_dest(dest: Path) -> bool:
    try:
        os.mkdir(dest, 0o755)
        return False
    except FileExistsError:
        st = os.lstat(dest)
        if not stat.S_ISDIR(st.st_mode) or any(os.scandir(dest)):
            raise ArchiveRejected(f"destination {dest} exists and is not an empty directory") from None
        return True


def _clear_dest(dest: Path, existed: bool) -> None:
    if not existed:
        shutil.rmtree(dest, ignore_errors=True)
        return
    with os.scandir(dest) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


@contextlib.contextmanager
def _open_zip(source: bytes | Path) -> Iterator[zipfile.ZipFile]:
    fileobj: IO[bytes] = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    try:
        try:
            zf = zipfile.ZipFile(fileobj)
        except zipfile.BadZipFile as exc:
            raise _reject("not a zip", str(exc)) from None
        except UnicodeDecodeError:
            raise _reject("utf-8 names", "a member flagged UTF-8 has a name that isn't") from None
        except (OSError, ValueError, EOFError, NotImplementedError) as exc:
            raise _reject("not a zip", type(exc).__name__) from None
        with zf:
            yield zf
    finally:
        fileobj.close()


def _member_name(info: zipfile.ZipInfo) -> str:
    if info.flag_bits & _FLAG_UTF8:
        return info.filename
    # Without the UTF-8 flag zipfile decoded the raw bytes as cp437; many tools write UTF-8 without
    # setting the flag, so accept the bytes when they are valid UTF-8 and refuse anything else.
    raw = info.filename.encode("cp437")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _reject("utf-8 names", f"member {_show(info.filename)} has a name that isn't valid UTF-8") from None


def _split_name(name: str) -> tuple[tuple[str, ...], bool]:
    shown = _show(name)
    if not name:
        raise _reject("member names", "empty name")
    if "\\" in name:
        raise _reject("member names", f"{shown} contains a backslash")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise _reject("member names", f"{shown} contains a control character")
    if name.startswith("/") or (len(name) >= 2 and name[1] == ":" and name[0].isalpha()):
        raise _reject("absolute paths", f"{shown} is absolute")
    if len(name.encode()) > MAX_PATH_BYTES:
        raise _reject("member names", f"{shown} is longer than {MAX_PATH_BYTES} bytes")
    is_dir = name.endswith("/")
    parts = tuple(name[:-1].split("/") if is_dir else name.split("/"))
    for part in parts:
        if part == "..":
            raise _reject("'..' components", f"{shown} climbs out of the workspace")
        if part in ("", "."):
            raise _reject("member names", f"{shown} has an empty or '.' component")
        if len(part.encode()) > MAX_NAME_BYTES:
            raise _reject("member names", f"{shown} has a component over {MAX_NAME_BYTES} bytes")
    return parts, is_dir


def _check_members(zf: zipfile.ZipFile, rules: ArchiveRules) -> list[_Member]:
    infos = zf.infolist()
    if len(infos) > rules.max_members:
        raise _reject("max_members", f"{len(infos)} members, limit {rules.max_members}")
    members: list[_Member] = []
    seen: set[tuple[str, ...]] = set()
    files: set[tuple[str, ...]] = set()
    total = 0
    for info in infos:
        name = _member_name(info)
        parts, is_dir = _split_name(name)
        shown = _show(name)
        if info.flag_bits & _FLAG_ENCRYPTED:
            raise _reject("encrypted members", f"{shown} is encrypted")
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            raise _reject("symlinks", f"{shown} is a symbolic link")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _reject("special files", f"{shown} is a device, fifo or socket")
        is_dir = is_dir or kind == stat.S_IFDIR or bool(info.external_attr & _DOS_DIR)
        if is_dir and info.file_size:
            raise _reject("special files", f"{shown} is a directory with content")
        if parts in seen:
            raise _reject("duplicate names", f"{shown} appears twice")
        seen.add(parts)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED,
                                      zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
            raise _reject("compression", f"{shown} uses unsupported method {info.compress_type}")
        total += info.file_size
        if total > rules.max_uncompressed_bytes:
            raise _reject("max_uncompressed_bytes",
                          f"declared sizes exceed {rules.max_uncompressed_bytes} bytes")
        if info.file_size > RATIO_MIN_BYTES and info.file_size > rules.max_ratio * max(info.compress_size, 1):
            raise _reject("max_ratio", f"{shown} expands {info.file_size / max(info.compress_size, 1):.0f}:1, "
                                       f"limit {rules.max_ratio:g}:1")
        if not is_dir:
            files.add(parts)
        members.append(_Member(info, parts, is_dir))
    for m in members:
        for i in range(1, len(m.parts)):
            if m.parts[:i] in files:
                raise _reject("duplicate names", f"{_show('/'.join(m.parts[:i]))} is both a file and a directory")
    return members


def _extract_all(zf: zipfile.ZipFile, members: list[_Member], dest: Path,
                 rules: ArchiveRules) -> int:
    root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    written = 0
    try:
        for m in members:
            parent = _makedirs_at(root, m.parts if m.is_dir else m.parts[:-1])
            try:
                if not m.is_dir:
                    written = _write_member(zf, m, parent, written, rules)
            finally:
                if parent != root:
                    os.close(parent)
    finally:
        os.close(root)
    return written


def _makedirs_at(root: int, parts: tuple[str, ...]) -> int:
    """Open (creating 0755) the directory `parts` beneath `root` without following any link."""
    fd = root
    for part in parts:
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as exc:
            if fd != root:
                os.close(fd)
            code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            raise _reject("member paths", f"{_show(part)} is not a directory ({code})") from None
        if fd != root:
            os.close(fd)
        fd = nxt
        os.fchmod(fd, 0o755)
    return fd


def _write_member(zf: zipfile.ZipFile, m: _Member, dir_fd: int, written: int,
                  rules: ArchiveRules) -> int:
    shown = _show("/".join(m.parts))
    try:
        fd = os.open(m.parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                     dir_fd=dir_fd)
    except OSError:
        raise _reject("duplicate names", f"{shown} already exists") from None
    own = 0
    limit_ratio = rules.max_ratio * max(m.info.compress_size, 1)
    try:
        os.fchmod(fd, 0o644)
        with zf.open(m.info) as src:
            while True:
                chunk = src.read(CHUNK)
                if not chunk:
                    break
                own += len(chunk)
                if written + own > rules.max_uncompressed_bytes:
                    raise _reject("max_uncompressed_bytes",
                                  f"content exceeds {rules.max_uncompressed_bytes} bytes")
                if own > m.info.file_size:
                    raise _reject("declared sizes", f"{shown} is larger than it declares")
                if own > RATIO_MIN_BYTES and own > limit_ratio:
                    raise _reject("max_ratio", f"{shown} expands past {rules.max_ratio:g}:1")
                _write_all(fd, chunk)
        with contextlib.suppress(ValueError, OverflowError, OSError):
            mtime = time.mktime((*m.info.date_time, 0, 0, -1))
            os.utime(fd, (mtime, mtime))
    except zipfile.BadZipFile as exc:
        raise _reject("corrupt member", f"{shown}: {exc}") from None
    except (EOFError, zlib.error) as exc:
        raise _reject("corrupt member", f"{shown}: {type(exc).__name__}") from None
    except RuntimeError as exc:  # zipfile raises it for encrypted members it can't read
        raise _reject("corrupt member", f"{shown}: {exc}") from None
    finally:
        os.close(fd)
    return written + own


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# -- packing ---------------------------------------------------------------------------------

def pack_result(workspace: Path, dest_zip: Path, record: dict[str, Any],
                output_log: Path | None, max_bytes: int,
                skip_root: Collection[str] = DEFAULT_SKIP_ROOT,
                skip_anywhere: Collection[str] = DEFAULT_SKIP_ANYWHERE,
                compresslevel: int = DEFAULT_COMPRESSLEVEL) -> PackSummary:
    """Write the result zip: `_hivemind/output.log`, the workspace's regular files (sorted),
    then `_hivemind/execution.json` (`record` plus the truncation facts).

    `max_bytes` caps the uncompressed bytes packed; once the next file would pass it, no more
    files are added and the record says so. The zip is fsynced and renamed into place, so
    `dest_zip` is either complete or absent."""
    tmp = dest_zip.with_name(dest_zip.name + ".part")
    skipped: list[str] = []
    skipped_count = 0
    files = 0
    used = 0
    truncated = False
    log_truncated = False

    def skip(rel: str) -> None:
        nonlocal skipped_count
        skipped_count += 1
        if len(skipped) < MAX_SKIPPED_LISTED:
            skipped.append(rel)

    with open(tmp, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED,
                                                 compresslevel=compresslevel) as zf:
        if output_log is not None:
            used, log_truncated = _add_log(zf, output_log, max_bytes // 2, compresslevel)
        root = _open_root(workspace)
        if root is None:
            skip(".")
        else:
            try:
                names = sorted(_walk(root, (), skip_root, skip_anywhere, skip))
                for i, parts in enumerate(names):
                    rel = "/".join(parts)
                    fd = _open_beneath(root, parts)
                    if fd is None:
                        skip(rel)
                        continue
                    with os.fdopen(fd, "rb") as src:
                        st = os.fstat(src.fileno())
                        if used + st.st_size > max_bytes:
                            truncated = True
                            for rest in names[i:]:
                                skip("/".join(rest))
                            break
                        _add_file(zf, rel, src, st, compresslevel)
                        used += st.st_size
                        files += 1
            finally:
                os.close(root)
        meta = dict(record)
        meta.update({"truncated": truncated, "result_cap_bytes": max_bytes,
                     "files": files, "bytes": used, "skipped_count": skipped_count,
                     "output_log_truncated": log_truncated})
        info = _zinfo(f"{RESULT_META_DIR}/execution.json", time.time())
        zf.writestr(info, json.dumps(meta, sort_keys=True, indent=2, default=str) + "\n")
        zf.close()
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, dest_zip)
    dfd = os.open(dest_zip.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return PackSummary(files=files, bytes=used, truncated=truncated, skipped=skipped)


def _zinfo(name: str, mtime: float, level: int = DEFAULT_COMPRESSLEVEL) -> zipfile.ZipInfo:
    ts = time.localtime(max(mtime, 315532800 + 86400))  # zip dates start in 1980
    info = zipfile.ZipInfo(name, date_time=ts[:6])
    info.compress_type = (zipfile.ZIP_STORED if os.path.splitext(name)[1].lower() in STORED_SUFFIXES
                          else zipfile.ZIP_DEFLATED)
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    info.create_system = 3  # unix, so the mode bits above are honoured by readers
    # zf.open(ZipInfo) ignores the ZipFile's level and reads this private slot (public in 3.13).
    setattr(info, "compress_level" if hasattr(info, "compress_level") else "_compresslevel", level)
    return info


def _add_log(zf: zipfile.ZipFile, path: Path, budget: int, level: int) -> tuple[int, bool]:
    """Add the output log, keeping its tail when it exceeds `budget` (the end says how it ended)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return 0, False
    with os.fdopen(fd, "rb") as src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode):
            return 0, False
        cut = st.st_size > budget
        if cut:
            src.seek(st.st_size - budget)
        length = min(st.st_size, budget)
        with zf.open(_zinfo(f"{RESULT_META_DIR}/output.log", st.st_mtime, level), "w",
                     force_zip64=True) as dst:
            _copy(src, dst, length)
    return length, cut


def _add_file(zf: zipfile.ZipFile, rel: str, src: IO[bytes], st: os.stat_result,
              level: int) -> None:
    with zf.open(_zinfo(rel, st.st_mtime, level), "w", force_zip64=st.st_size > 1 << 30) as dst:
        # Copy only the size seen at open: a file still growing can't break the cap.
        _copy(src, dst, st.st_size)


def _copy(src: IO[bytes], dst: IO[bytes], length: int) -> None:
    left = length
    while left > 0:
        chunk = src.read(min(CHUNK, left))
        if not chunk:
            break
        dst.write(chunk)
        left -= len(chunk)


def _open_root(workspace: Path) -> int | None:
    try:
        return os.open(workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None


def _walk(dir_fd: int, prefix: tuple[str, ...], skip_root: Collection[str],
          skip_anywhere: Collection[str], skip: Any) -> Iterator[tuple[str, ...]]:
    with os.scandir(dir_fd) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        parts = (*prefix, entry.name)
        if (not prefix and entry.name in skip_root) or entry.name in skip_anywhere:
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                try:
                    sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                  dir_fd=dir_fd)
                except OSError:
                    skip("/".join(parts))
                    continue
                try:
                    yield from _walk(sub, parts, skip_root, skip_anywhere, skip)
                finally:
                    os.close(sub)
            elif entry.is_file(follow_symlinks=False):
                yield parts
            else:
                skip("/".join(parts))
        except OSError:
            skip("/".join(parts))


def _open_beneath(root: int, parts: tuple[str, ...]) -> int | None:
    """Open a regular file beneath `root` refusing links at every component (they may have been
    swapped in since the walk); None when it is anything but a regular file now."""
    fd = root
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            if fd != root:
                os.close(fd)
            fd = nxt
        # O_NONBLOCK: a fifo swapped in must not hang the packer.
        out = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    except OSError:
        return None
    finally:
        if fd != root:
            os.close(fd)
    if not stat.S_ISREG(os.fstat(out).st_mode):
        os.close(out)
        return None
    os.set_blocking(out, True)
    return out
