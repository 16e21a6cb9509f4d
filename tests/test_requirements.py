"""requirements.txt validation: specifiers pass (normalized), everything else is refused by line."""

from __future__ import annotations

import pytest

from hivemind.executors.requirements import RequirementsRefused, parse_requirements

GOOD = [
    "six", "six==1.16.0", "numpy>=1.20,<2", "requests[socks,security] ~= 2.31",
    "pandas (>=2.0)", 'tomli; python_version < "3.11"', "pkg-name.with_dots===1.0",
    "torch==2.1.0+cpu", "foo!=1.*",
    "bar; sys_platform == 'linux' and platform_machine == 'x86_64'",
]

BAD = {
    "-i http://127.0.0.1:8080/simple": "option '-i'",
    "--index-url=http://10.0.0.1/simple": "option '--index-url'",
    "--extra-index-url http://192.168.1.1/": "option '--extra-index-url'",
    "-f /tmp/wheels": "option '-f'",
    "--trusted-host evil": "option '--trusted-host'",
    "-r other.txt": "option '-r'",
    "-e .": "option '-e'",
    "./localpkg": "local paths",
    "/abs/path/pkg": "local paths",
    "localpkg/": "local paths",
    "pkg.whl": "local paths",
    "file:///workspace/pkg": "URLs",
    "pkg @ https://127.0.0.1:8080/pkg.whl": "URLs",
    "pkg@file:///workspace/pkg": "URLs",
    "git+https://example.org/x.git": "URLs",
    "six --hash=sha256:abc": "per-requirement pip options",
    "${HOME}/pkg": "environment variable",
    "six \\": "line continuations",
    "six; os.system('x')": "not a requirement specifier",
}


@pytest.mark.parametrize("line", GOOD)
def test_specifiers_pass(line: str) -> None:
    reqs = parse_requirements(f"# header\n\n{line}  # why\n".encode())
    assert reqs.lines == (line,)
    assert reqs.normalized() == line + "\n"


@pytest.mark.parametrize(("line", "why"), sorted(BAD.items()))
def test_everything_else_is_refused_naming_the_line(line: str, why: str) -> None:
    with pytest.raises(RequirementsRefused) as err:
        parse_requirements(f"six\n{line}\n".encode())
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith("requirements.txt line 2:")
    assert why in err.value.problems[0]


def test_every_bad_line_is_named_and_bytes_are_checked() -> None:
    with pytest.raises(RequirementsRefused) as err:
        parse_requirements(b"-i x\nok\n./p\n")
    assert [p.split(":")[0] for p in err.value.problems] == ["requirements.txt line 1",
                                                              "requirements.txt line 3"]
    with pytest.raises(RequirementsRefused, match="UTF-8"):
        parse_requirements(b"\xff\xfe")
    with pytest.raises(RequirementsRefused, match="control characters"):
        parse_requirements(b"six\x1b[2J\n")
    assert not parse_requirements(b"# only comments\n\n")
