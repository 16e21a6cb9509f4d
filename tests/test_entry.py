"""Entry discovery, the hivemind.yaml manifest, and task id validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hivemind.errors import ArchiveRejected, HivemindError
from hivemind.executors.base import Entry
from hivemind.tasks.entry import InvalidManifest, NoEntryFound, discover_entry, find_requirements
from hivemind.tasks.ids import InvalidTaskId, validate_task_id


def ws_with(tmp_path: Path, *names: str) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    for name in names:
        p = ws / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    return ws


def manifest(ws: Path, text: str) -> None:
    (ws / "hivemind.yaml").write_text(text)


# -- default order ---------------------------------------------------------------------------

@pytest.mark.parametrize(("files", "argv"), [
    (["run.sh", "run.py", "main.py"], ("bash", "run.sh")),
    (["run.py", "main.py", "app.py"], ("python", "run.py")),
    (["main.py", "app.py", "index.py"], ("python", "main.py")),
    (["app.py", "index.py", "start.py"], ("python", "app.py")),
    (["index.py", "start.py", "a.py"], ("python", "index.py")),
    (["start.py", "a.py"], ("python", "start.py")),
    (["zeta.py", "beta.py", "notes.txt"], ("python", "beta.py")),
])
def test_default_order(tmp_path: Path, files: list[str], argv: tuple[str, ...]) -> None:
    assert discover_entry(ws_with(tmp_path, *files)) == Entry(argv=argv)


def test_only_root_level_regular_files_count(tmp_path: Path) -> None:
    ws = ws_with(tmp_path, "sub/main.py", "zz.py")
    os.symlink("/etc/hostname", ws / "run.sh")
    os.symlink(ws / "zz.py", ws / "main.py")
    (ws / "aa.py").mkdir()
    assert discover_entry(ws).argv == ("python", "zz.py")


def test_no_entry_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NoEntryFound, match="no entry point: put run.sh"):
        discover_entry(ws_with(tmp_path, "data.csv", "lib/x.py"))
    assert issubclass(NoEntryFound, ArchiveRejected)


def test_find_requirements(tmp_path: Path) -> None:
    ws = ws_with(tmp_path, "main.py")
    assert find_requirements(ws) is None
    os.symlink("/etc/hostname", ws / "requirements.txt")
    assert find_requirements(ws) is None
    os.unlink(ws / "requirements.txt")
    (ws / "requirements.txt").write_text("numpy\n")
    assert find_requirements(ws) == ws / "requirements.txt"


# -- manifest --------------------------------------------------------------------------------

def test_manifest_entry_file_overrides_the_order(tmp_path: Path) -> None:
    ws = ws_with(tmp_path, "run.sh", "jobs/train.py")
    manifest(ws, "entry: jobs/train.py\ntimeout_s: 90\n")
    assert discover_entry(ws) == Entry(argv=("python", "jobs/train.py"), timeout_s=90.0)


def test_manifest_shell_entry(tmp_path: Path) -> None:
    ws = ws_with(tmp_path, "go.sh")
    manifest(ws, "entry: go.sh\n")
    assert discover_entry(ws).argv == ("bash", "go.sh")


def test_manifest_argv_list(tmp_path: Path) -> None:
    ws = ws_with(tmp_path, "train.py")
    manifest(ws, 'entry: [python3, train.py, --epochs, "3"]\n')
    assert discover_entry(ws).argv == ("python3", "train.py", "--epochs", "3")


def test_manifest_timeout_only_keeps_default_entry(tmp_path: Path) -> None:
    ws = ws_with(tmp_path, "main.py")
    manifest(ws, "timeout_s: 1.5\n")
    assert discover_entry(ws) == Entry(argv=("python", "main.py"), timeout_s=1.5)


def test_empty_manifest_is_no_manifest(tmp_path: Path) -> None:
    ws = ws_with(tmp_path, "main.py")
    manifest(ws, "")
    assert discover_entry(ws) == Entry(argv=("python", "main.py"))


@pytest.mark.parametrize(("text", "message"), [
    ("entry: /etc/passwd\n", "relative path"),
    ("entry: ../outside.py\n", "'..'"),
    ("entry: a/./b.py\n", "'..', '.' or empty"),
    ("entry: 'a\\\\b.py'\n", "relative path"),
    ("entry: missing.py\n", "does not exist"),
    ("entry: data\n", "must end in .py or .sh"),
    ("entry: [node, main.py]\n", "interpreter 'node'"),
    ("entry: [python]\n", "[interpreter, script, args...]"),
    ("entry: [python, main.py, 3]\n", "quote numbers"),
    ("entry: {a: 1}\n", "file name or a list"),
    ("timeout_s: true\n", "number of seconds"),
    ("timeout_s: -1\n", "> 0"),
    ("timeout_s: 1.0e+12\n", "> 0"),
    ("entrypoint: main.py\n", "unknown key 'entrypoint'"),
    ("- main.py\n", "must be a mapping"),
    ("entry: [unclosed\n", "not valid YAML at line"),
])
def test_bad_manifests_are_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    ws = ws_with(tmp_path, "main.py", "data/x.txt")
    (ws / "data").rename(ws / "data_dir")
    (ws / "data").write_text("not a script")
    manifest(ws, text)
    with pytest.raises(InvalidManifest) as exc:
        discover_entry(ws)
    assert message in str(exc.value)


def test_manifest_entry_through_a_link_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil.py").write_text("x")
    ws = ws_with(tmp_path, "main.py")
    os.symlink(outside, ws / "lib")
    os.symlink(outside / "evil.py", ws / "direct.py")
    manifest(ws, "entry: lib/evil.py\n")
    with pytest.raises(InvalidManifest, match="regular file"):
        discover_entry(ws)
    manifest(ws, "entry: direct.py\n")
    with pytest.raises(InvalidManifest, match="regular file"):
        discover_entry(ws)


def test_manifest_that_is_a_link_is_refused(tmp_path: Path) -> None:
    ws = ws_with(tmp_path, "main.py")
    os.symlink("/etc/hostname", ws / "hivemind.yaml")
    with pytest.raises(InvalidManifest, match="regular file"):
        discover_entry(ws)


def test_oversized_manifest_is_refused(tmp_path: Path) -> None:
    ws = ws_with(tmp_path, "main.py")
    manifest(ws, "# " + "x" * 70_000 + "\nentry: main.py\n")
    with pytest.raises(InvalidManifest, match="larger than"):
        discover_entry(ws)


# -- task ids --------------------------------------------------------------------------------

@pytest.mark.parametrize("good", ["a", "task-1", "T.2_x", "0" * 128, "abc.DEF-12_3"])
def test_valid_ids_pass_unchanged(good: str) -> None:
    assert validate_task_id(good) == good


@pytest.mark.parametrize("bad", ["", ".", "..", "-rf", "_x", "a/b", "../etc", "a b", "a\nb",
                                 "é", "a" * 129, "a\x00", "x;rm -rf /", "$(id)"])
def test_invalid_ids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidTaskId):
        validate_task_id(bad)
    assert issubclass(InvalidTaskId, HivemindError)


def test_invalid_id_message_is_bounded_and_escaped() -> None:
    with pytest.raises(InvalidTaskId) as exc:
        validate_task_id("evil\nFORGED LOG LINE" + "A" * 10_000)
    msg = str(exc.value)
    assert len(msg) < 200 and "\n" not in msg and "10020 chars" in msg
