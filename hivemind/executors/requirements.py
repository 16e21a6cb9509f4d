"""requirements.txt from a task archive: only requirement specifiers, checked line by line.

pip reads far more than package names from a requirements file: options (`-i`, `--extra-index-url`,
`-f`, `--trusted-host`, `-r other.txt`, `-e`), local paths (`./pkg`, which runs the archive's own
build backend), VCS and direct URLs (`pkg @ https://...`, `git+https://...`) and `${VAR}`
expansion. Each of those lets a task choose where pip connects or what code it runs, so
everything but `name[extras] specifiers ; marker` is refused, with the line number and the
reason. What pip then reads is `normalized()`, written by the worker, never the task's file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hivemind.errors import HivemindError

MAX_LINES = 1000
MAX_LINE_CHARS = 512

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_EXTRAS = rf"\[\s*(?:{_NAME}(?:\s*,\s*{_NAME})*)?\s*\]"
_VERSION = r"[A-Za-z0-9.*+!_-]+"
_SPEC = rf"(?:~=|===|==|!=|<=|>=|<|>)\s*{_VERSION}"
_SPECS = rf"{_SPEC}(?:\s*,\s*{_SPEC})*"
# Markers use a small vocabulary: PEP 508's variables, quoted literals, comparisons, and/or/in/not.
_MARKER_VARS = ("python_version", "python_full_version", "os_name", "sys_platform",
                "platform_release", "platform_system", "platform_version", "platform_machine",
                "platform_python_implementation", "implementation_name",
                "implementation_version", "extra", "and", "or", "not", "in")
_MARKER_TOKEN = r"""(?:(?:""" + "|".join(_MARKER_VARS) + r""")\b|'[A-Za-z0-9 ._*+!<>=~-]*'|"[A-Za-z0-9 ._*+!<>=~-]*"|===|==|!=|<=|>=|~=|<|>|\(|\))"""
_LINE = re.compile(
    rf"^(?P<name>{_NAME})\s*(?P<extras>{_EXTRAS})?\s*"
    rf"(?P<specs>{_SPECS}|\(\s*{_SPECS}\s*\))?\s*"
    rf"(?:;\s*(?P<marker>(?:{_MARKER_TOKEN}\s*)+))?$")


_ARCHIVE = re.compile(r"\.(whl|zip|tar|tar\.gz|tgz|tar\.bz2|tar\.xz)$", re.IGNORECASE)


class RequirementsRefused(HivemindError):
    """requirements.txt holds something other than requirement specifiers; one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class Requirements:
    lines: tuple[str, ...]             # one validated specifier each, comments and blanks gone

    def normalized(self) -> str:
        return "".join(line + "\n" for line in self.lines)

    def __bool__(self) -> bool:
        return bool(self.lines)


def _why(text: str) -> str:
    """The reason a line that doesn't parse is refused, as specific as we can tell."""
    if text.startswith("-"):
        opt = text.split()[0].split("=")[0]
        return f"pip option {opt!r} is not allowed (the index comes from the worker's config)"
    if "$" in text:
        return "environment variable references are not allowed"
    if "://" in text or re.match(r"^[A-Za-z0-9+]+:", text) or " @" in text or "@ " in text:
        return "URLs and VCS references are not allowed; name a package on the index"
    if text.startswith((".", "/", "~", "\\")) or "/" in text or "\\" in text \
            or text.endswith((".whl", ".zip", ".tar.gz", ".tgz")):
        return "local paths and archive files are not allowed; name a package on the index"
    if " -" in text or "\t-" in text:
        return "per-requirement pip options (such as --hash) are not allowed"
    return "not a requirement specifier (expected NAME[extras] SPECIFIERS ; MARKER)"


def parse_requirements(data: bytes) -> Requirements:
    """Validate a requirements.txt; raises RequirementsRefused naming each bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RequirementsRefused(["requirements.txt is not UTF-8 text"]) from None
    problems: list[str] = []
    out: list[str] = []
    raw_lines = text.splitlines()
    if len(raw_lines) > MAX_LINES:
        raise RequirementsRefused([f"requirements.txt has {len(raw_lines)} lines; at most {MAX_LINES}"])
    for no, raw in enumerate(raw_lines, start=1):
        if raw.rstrip().endswith("\\"):
            problems.append(f"requirements.txt line {no}: line continuations are not allowed")
            continue
        # pip treats '#' as a comment at the start of a line or after whitespace.
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        if len(line) > MAX_LINE_CHARS:
            problems.append(f"requirements.txt line {no}: longer than {MAX_LINE_CHARS} characters")
            continue
        if any(ord(c) < 32 for c in line):
            problems.append(f"requirements.txt line {no}: control characters are not allowed")
            continue
        if _LINE.match(line) is None or _ARCHIVE.search((line.split(";")[0].split() or [""])[0]):
            shown = line if len(line) <= 80 else line[:77] + "..."
            problems.append(f"requirements.txt line {no}: {shown!r}: {_why(line)}")
            continue
        out.append(line)
    if problems:
        raise RequirementsRefused(problems)
    return Requirements(tuple(out))

