"""The identity commands as a user runs them: real processes, real files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from cli_output import error_text
from relay_fixture import cli_env, run_cli


def _keygen(home: Path, name: str, *extra: str, **env: str) -> None:
    res = run_cli(home, "keygen", name, *extra, **env)
    assert res.returncode == 0, res.stderr


def _one_line_error(stderr: str) -> str:
    return error_text(stderr, alone=True)


def test_keygen_writes_files_with_modes_and_prints_fingerprint(sc_home: Path) -> None:
    res = run_cli(sc_home, "keygen", "alice", SECURECHAT_PASSPHRASE="s3cret")
    assert res.returncode == 0, res.stderr
    key, pub = sc_home / "alice.key", sc_home / "alice.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(sc_home.stat().st_mode) == 0o700
    assert "argon2id" in key.read_text()
    line = pub.read_text()
    assert line.count("\n") == 1 and line.startswith("scid1:") and line.endswith(" alice\n")
    fp = run_cli(sc_home, "fingerprint", "alice").stdout.split()[0]
    assert f"fingerprint {fp}" in res.stdout
    assert "s3cret" not in res.stdout + res.stderr


def test_keygen_refuses_overwrite_without_force(sc_home: Path) -> None:
    _keygen(sc_home, "bob", "--no-passphrase")
    before = (sc_home / "bob.pub").read_text()
    res = run_cli(sc_home, "keygen", "bob", "--no-passphrase")
    assert res.returncode == 3
    assert "already exists" in _one_line_error(res.stderr)
    assert (sc_home / "bob.pub").read_text() == before
    _keygen(sc_home, "bob", "--no-passphrase", "--force")
    assert (sc_home / "bob.pub").read_text() != before
    assert stat.S_IMODE((sc_home / "bob.key").stat().st_mode) == 0o600


def test_no_passphrase_warns(sc_home: Path) -> None:
    res = run_cli(sc_home, "keygen", "carol", "--no-passphrase")
    assert res.returncode == 0
    assert "NOT encrypted" in res.stderr
    assert "cipher: none" in (sc_home / "carol.key").read_text()


def test_noninteractive_without_passphrase_is_a_clear_error(sc_home: Path) -> None:
    res = run_cli(sc_home, "keygen", "dave")
    assert res.returncode == 3
    assert "SECURECHAT_PASSPHRASE" in _one_line_error(res.stderr)
    assert not (sc_home / "dave.key").exists()


def _keygen_on_a_tty(home: Path, name: str, first: str, second: str) -> tuple[int, str]:
    """``keygen NAME`` on a terminal, typing the passphrase twice; (exit status, output)."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "securechat", "keygen", name],
        env=cli_env(home),
        timeout=30,
        encoding="utf-8",
    )
    child.expect("Passphrase for")
    child.sendline(first)
    child.expect("Repeat passphrase")
    child.sendline(second)
    child.expect(pexpect.EOF)
    output = child.before or ""
    child.close()
    return child.exitstatus, output


def test_tty_prompts_twice_and_mismatch_writes_nothing(sc_home: Path) -> None:
    code, output = _keygen_on_a_tty(sc_home, "erin", "one", "two")
    assert code == 2 and "the two passphrases differ" in output
    assert not (sc_home / "erin.key").exists()

    code, output = _keygen_on_a_tty(sc_home, "erin", "same", "same")
    assert code == 0 and "fingerprint" in output
    res = run_cli(sc_home, "safety-number", "--peer", "erin", "--key", "erin")
    assert res.returncode == 0


def test_end_of_input_at_the_passphrase_prompt_is_one_line(sc_home: Path) -> None:
    """Ctrl-D at the prompt: a one-line error and the passphrase exit code, no traceback."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "securechat", "keygen", "erin"],
        env=cli_env(sc_home),
        timeout=30,
        encoding="utf-8",
    )
    child.expect("Passphrase for")
    child.sendeof()
    child.expect(pexpect.EOF)
    output = child.before or ""
    child.close()
    assert child.exitstatus == 3, output
    assert "no passphrase given (end of input)" in output
    assert "Traceback" not in output
    assert not (sc_home / "erin.key").exists()


def test_group_readable_private_key_refused_with_fix(sc_home: Path) -> None:
    _keygen(sc_home, "alice", "--no-passphrase")
    _keygen(sc_home, "bob", "--no-passphrase")
    os.chmod(sc_home / "alice.key", 0o640)
    res = run_cli(sc_home, "safety-number", "--peer", "bob", "--key", "alice")
    assert res.returncode == 3
    msg = _one_line_error(res.stderr)
    assert "0640" in msg and "chmod 600" in msg


def test_safety_number_same_on_both_sides(sc_home: Path) -> None:
    _keygen(sc_home, "alice", "--no-passphrase")
    _keygen(sc_home, "bob", "--no-passphrase")
    ab = run_cli(sc_home, "safety-number", "--peer", "bob", "--key", "alice")
    ba = run_cli(sc_home, "safety-number", "--peer", str(sc_home / "alice.pub"), "--key", "bob")
    assert ab.returncode == ba.returncode == 0
    assert ab.stdout.splitlines()[-1] == ba.stdout.splitlines()[-1]
    assert len(ab.stdout.splitlines()[-1].replace(" ", "")) == 60


def test_default_identity_when_only_one_key(sc_home: Path) -> None:
    _keygen(sc_home, "alice", "--no-passphrase")
    (sc_home / "bob.pub").write_text(
        run_cli(sc_home, "fingerprint", "alice").stdout and (sc_home / "alice.pub").read_text()
    )
    res = run_cli(sc_home, "safety-number", "--peer", "bob")
    assert res.returncode == 0, res.stderr
    _keygen(sc_home, "carol", "--no-passphrase")
    res = run_cli(sc_home, "safety-number", "--peer", "bob")
    assert res.returncode == 2
    assert "--key" in _one_line_error(res.stderr)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "truncated"),
        ("SECURECHAT PRIVATE KEY v1\nname: x\n", "truncated"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\n", "not a securechat private key"),
        ("\x00\xff\xfe binary", "not text"),
    ],
)
def test_corrupt_private_key_files(sc_home: Path, content: str, fragment: str) -> None:
    _keygen(sc_home, "bob", "--no-passphrase")
    sc_home.mkdir(exist_ok=True)
    bad = sc_home / "bad.key"
    bad.write_bytes(content.encode("latin-1"))
    os.chmod(bad, 0o600)
    res = run_cli(sc_home, "safety-number", "--peer", "bob", "--key", str(bad))
    assert res.returncode == 3
    assert fragment in _one_line_error(res.stderr)


def test_wrong_type_and_missing_files(sc_home: Path) -> None:
    _keygen(sc_home, "bob", "--no-passphrase")
    res = run_cli(sc_home, "fingerprint", "nobody")
    assert res.returncode == 3
    assert f"looked for {sc_home / 'nobody.pub'}" in _one_line_error(res.stderr)
    garbage = sc_home / "garbage.pub"
    garbage.write_text("scid1:notbase32!!\n")
    res = run_cli(sc_home, "fingerprint", str(garbage))
    assert res.returncode == 3
    _one_line_error(res.stderr)


def test_fingerprint_accepts_path_and_name(sc_home: Path) -> None:
    _keygen(sc_home, "bob", "--no-passphrase")
    by_name = run_cli(sc_home, "fingerprint", "bob").stdout
    by_path = run_cli(sc_home, "fingerprint", str(sc_home / "bob.pub")).stdout
    by_key = run_cli(sc_home, "fingerprint", str(sc_home / "bob.key")).stdout
    assert by_name == by_path == by_key
    assert by_name.split()[1] == "bob"


def test_help_for_every_command(sc_home: Path) -> None:
    top = run_cli(sc_home, "--help")
    assert top.returncode == 0
    for command in ("keygen", "fingerprint", "safety-number"):
        assert command in top.stdout
        sub = run_cli(sc_home, command, "--help")
        assert sub.returncode == 0 and "usage:" in sub.stdout


def test_unknown_command_is_usage_error(sc_home: Path) -> None:
    res = run_cli(sc_home, "frobnicate")
    assert res.returncode == 2
    _one_line_error(res.stderr)


def test_python_dash_m_and_console_script_agree(sc_home: Path) -> None:
    res = run_cli(sc_home, "--version")
    assert res.returncode == 0 and "securechat" in res.stdout


# Modules a command that needs neither the network nor the store must not pay for at start.
HEAVY = ("sqlite3", "securechat.relay", "securechat.client.messenger", "prompt_toolkit", "spake2")


@pytest.mark.parametrize(
    "args", [["--help"], ["--version"], ["keygen", "carol", "--no-passphrase"]], ids=str
)
def test_help_and_keygen_load_no_relay_store_or_messenger(sc_home: Path, args: list[str]) -> None:
    """``python -X importtime`` lists every module a command imported (issue 14)."""
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "securechat", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(sc_home),
        cwd=sc_home.parent,
    )
    assert res.returncode == 0, res.stderr
    loaded = [
        line.rsplit("|", 1)[1].strip()
        for line in res.stderr.splitlines()
        if line.startswith("import time:")
    ]
    assert "securechat.cli.dispatch" in loaded  # the listing is real
    assert not [m for m in loaded if m.startswith(HEAVY)], loaded
