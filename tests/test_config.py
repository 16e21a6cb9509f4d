"""Configuration: defaults, validation messages that name key, value and fix, secrets from files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hivemind.config import check_daemon_config, describe_defaults, load_config, parse_config
from hivemind.errors import ConfigError
from hivemind.secrets import Secret, read_secret


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "worker.yaml"
    p.write_text(text)
    return p


def problems_of(data: object, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(data, environ or {})
    return exc.value.problems


def test_empty_file_gives_documented_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""), {})
    assert cfg.pool.heartbeat_interval_s <= 10
    assert cfg.executor.podman.mode == "rootless"
    assert cfg.status.listen_host == "127.0.0.1"
    assert cfg.node_id == cfg.pool.username


def test_every_key_has_a_doc() -> None:
    text = describe_defaults()
    for line in text.splitlines():
        assert "#" in line and line.split("#", 1)[1].strip(), line


def test_unknown_key_named_with_known_keys() -> None:
    (p,) = problems_of({"pool": {"adress": "x:1"}})
    assert p.startswith("pool.adress: unknown key") and "address" in p


def test_wrong_types_and_ranges_all_reported() -> None:
    probs = problems_of({"pool": {"heartbeat_interval_s": "fast", "call_timeout_s": 0},
                         "executor": {"slots": -1, "kind": "docker"},
                         "status": {"enabled": "yes"}})
    text = "\n".join(probs)
    assert "pool.heartbeat_interval_s: got 'fast'; expected a number" in text
    assert "pool.call_timeout_s: 0 is out of range" in text
    assert "executor.slots: -1 is out of range" in text
    assert "executor.kind: 'docker' is not allowed; choose one of auto, podman, venv" in text
    assert "status.enabled: got 'yes'; expected true or false" in text
    assert len(probs) == 5


def test_section_must_be_mapping() -> None:
    (p,) = problems_of({"pool": [1, 2]})
    assert p.startswith("pool: got [1, 2]; expected a mapping")


def test_list_items_checked() -> None:
    (p,) = problems_of({"server": {"auth": {"legacy_allowed_peers": ["127.0.0.1", 5]}}})
    assert p.startswith("server.auth.legacy_allowed_peers[1]: got 5")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "nope.yaml")
    assert "does not exist" in exc.value.problems[0]


def test_malformed_yaml_names_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, "pool:\n  address: [unclosed\n"))
    assert "not valid YAML at line" in exc.value.problems[0]


def test_secret_file_missing_and_unreadable(tmp_path: Path) -> None:
    (p,) = problems_of({"pool": {"password_file": str(tmp_path / "pw")}})
    assert p.startswith("pool.password_file: secret file") and "does not exist" in p


def test_secret_from_credentials_directory(tmp_path: Path) -> None:
    (tmp_path / "pool-password").write_text("s3cret-value\n")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    cfg = parse_config({"pool": {"password_file": "pool-password"}}, env)
    secret = read_secret("pool.password_file", cfg.pool.password_file, env)
    assert secret.reveal() == "s3cret-value"
    assert "s3cret" not in repr(secret) and "s3cret" not in str(secret)


def test_secret_errors_never_contain_the_secret(tmp_path: Path) -> None:
    f = tmp_path / "empty"
    f.write_text("")
    with pytest.raises(ConfigError) as exc:
        read_secret("pool.password_file", str(f))
    assert "is empty" in str(exc.value)
    assert isinstance(Secret("x"), Secret)


def test_cross_checks() -> None:
    probs = problems_of({"server": {"advertise_host": "127.0.0.1"},
                         "status": {"listen_host": "0.0.0.0"}})
    text = "\n".join(probs)
    assert "server.advertise_host: '127.0.0.1' is skipped by the pool" in text
    assert "status.listen_host: '0.0.0.0' is not loopback; set status.token_file" in text


def test_daemon_needs_a_password_and_a_way_to_authenticate_the_pool(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        check_daemon_config(parse_config({}, {}))
    text = "\n".join(exc.value.problems)
    assert "pool.password_file: not set" in text
    assert "legacy_allowed_peers is empty" in text
    with pytest.raises(ConfigError) as exc:
        check_daemon_config(parse_config({"server": {"auth": {"mode": "token",
                                                              "legacy_allowed_peers": ["nope"]}}}, {}))
    text = "\n".join(exc.value.problems)
    assert "'token' needs server.auth.cert_file" in text and "'nope' is not an IP" in text
    pw = tmp_path / "pw"
    pw.write_text("x")
    check_daemon_config(parse_config({"pool": {"password_file": str(pw)},
                                      "server": {"auth": {"legacy_allowed_peers": ["10.0.0.5"]}}}, {}))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hivemind", *args], capture_output=True, text=True, timeout=60)


def test_cli_check_config_exit_codes(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("secret\n")
    good = write(tmp_path, f"node:\n  location: lab\npool:\n  password_file: {tmp_path / 'pw'}\n"
                           "server:\n  auth: {legacy_allowed_peers: [192.0.2.10]}\n")
    r = run_cli("check-config", "--config", str(good))
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("pool:\n  heartbeat_interval_s: 60\n  bogus: 1\n")
    r = run_cli("check-config", "--config", str(bad))
    assert r.returncode == 2
    assert "pool.heartbeat_interval_s: 60 is out of range" in r.stderr
    assert "pool.bogus: unknown key" in r.stderr
    r = run_cli("check-config", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_cli("check-config", "--config", str(write(tmp_path, "node: {location: lab}\n")))
    assert r.returncode == 2 and "pool.password_file: not set" in r.stderr


def test_cli_run_refuses_bad_config_without_starting(tmp_path: Path) -> None:
    bad = write(tmp_path, "executor: {kind: nope}\n")
    r = run_cli("run", "--config", str(bad))
    assert r.returncode == 2 and "executor.kind" in r.stderr


def test_cli_version_and_help() -> None:
    r = run_cli("--version")
    assert r.returncode == 0 and "hivemind-worker" in r.stdout
    for cmd in ("run", "check-config", "dev", "submit", "run-task"):
        r = run_cli(cmd, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout, cmd
    r = run_cli("frobnicate")
    assert r.returncode == 2


def test_advertised_host_is_never_127_0_0_1() -> None:
    from hivemind.daemon import advertised_host

    assert advertised_host(parse_config({"server": {"advertise_host": "10.1.2.3"}}, {})) == "10.1.2.3"
    assert advertised_host(parse_config({"server": {"listen_host": "127.0.0.2"}}, {})) == "127.0.0.2"
    assert advertised_host(parse_config({}, {})) != "127.0.0.1"
    assert advertised_host(parse_config({"server": {"listen_host": "127.0.0.1"}}, {})) != "127.0.0.1"


def test_requirements_and_task_uid_keys_are_checked() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"executor": {"slots": 8, "venv": {"uid_range_size": 4},
                                   "requirements": {"index_url": "ftp://x/simple",
                                                    "proxy": "socks5://127.0.0.1:1"}}}, environ={})
    text = str(err.value)
    assert "executor.requirements.index_url: 'ftp://x/simple'" in text
    assert "executor.requirements.proxy: 'socks5://127.0.0.1:1'" in text
    assert "executor.venv.uid_range_size: 4 is less than executor.slots (8)" in text
    ok = parse_config({"executor": {"requirements": {"index_url": "https://pypi.example/simple",
                                                     "proxy": "http://proxy:3128"}}}, environ={})
    assert ok.executor.requirements.index_url == "https://pypi.example/simple"
