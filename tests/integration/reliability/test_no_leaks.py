"""Secrets never leak: a unique marker sent in messages, and the private keys, must be
absent from the wire, the relay's store and logs, client output, and every file on disk
except in encrypted form; private key and state files are 0600.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from securechat.core import keys

from relay_fixture import RelayProcess, cli_env
from reliability.proxy import RecordingProxy

pytestmark = pytest.mark.timeout(120)
PASSPHRASE = "correct horse battery staple for the leak test"


def _cli(home: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "securechat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(home, SECURECHAT_PASSPHRASE=PASSPHRASE),
        cwd=home.parent,
    )


def _forms(secret: bytes) -> list[bytes]:
    """The ways a secret could appear in a file: raw, hex, base64 (std and url), base32."""
    return [
        secret,
        secret.hex().encode(),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
        base64.b32encode(secret).rstrip(b"="),
        base64.b32encode(secret).rstrip(b"=").lower(),
    ]


def _files(root: Path) -> Iterator[Path]:
    return (p for p in root.rglob("*") if p.is_file())


def _assert_absent(needles: dict[str, list[bytes]], where: str, data: bytes) -> None:
    for label, forms in needles.items():
        for form in forms:
            assert form not in data, f"{label} found in {where}"


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[RelayProcess, RecordingProxy, Path]]:
    relay = RelayProcess.start(tmp_path / "relay-data", "--log-level", "DEBUG")
    proxy = RecordingProxy((relay.host, relay.port))
    home = tmp_path / "home"
    try:
        yield relay, proxy, home
    finally:
        proxy.close()
        relay.stop()


def test_marker_and_keys_never_leak(setup: tuple[RelayProcess, RecordingProxy, Path]) -> None:
    relay, proxy, home = setup
    for name in ("alice", "bob", "carol"):
        assert _cli(home, "keygen", name).returncode == 0
    marker = "MARKER-" + os.urandom(12).hex()
    relay_pub = str(relay.data_dir / "relay.pub")
    common = ["--relay", proxy.address, "--relay-key", relay_pub]
    lines = [f"{marker} line {i} {'x' * (i * 37)}" for i in range(8)]
    outputs: list[subprocess.CompletedProcess[str]] = []
    # a direct conversation, a group message, and a reply (so both ratchets turn)
    outputs.append(
        _cli(
            home,
            "send",
            "--key",
            "alice",
            "--peer",
            "bob",
            *common,
            stdin="".join(line + "\n" for line in lines),
        )
    )
    outputs.append(
        _cli(
            home,
            "send",
            "--key",
            "carol",
            "--peer",
            "alice",
            "--peer",
            "bob",
            *common,
            "-m",
            f"group {marker}",
        )
    )
    outputs.append(_cli(home, "receive", "--key", "bob", "--json", "--timeout", "2", *common))
    outputs.append(
        _cli(home, "send", "--key", "bob", "--peer", "alice", *common, "-m", f"reply {marker}")
    )
    outputs.append(_cli(home, "receive", "--key", "alice", "--timeout", "2", *common))
    for out in outputs:
        assert out.returncode == 0, out.stderr
    received = [json.loads(x)["text"] for x in outputs[2].stdout.splitlines()]
    assert sorted(received) == sorted([*lines, f"group {marker}"])  # it really went through
    assert f"reply {marker}" in outputs[4].stdout

    identities = {
        n: keys.decrypt_private_key(
            keys.parse_private_key((home / f"{n}.key").read_text()), PASSPHRASE.encode()
        )
        for n in ("alice", "bob", "carol")
    }
    needles = {"the marker": [marker.encode(), marker.encode("utf-16-le")]}
    for n, ident in identities.items():
        needles[f"{n}'s X25519 private key"] = _forms(ident.dh_private)
        needles[f"{n}'s Ed25519 seed"] = _forms(ident.sign_seed)

    assert proxy.connections >= len(outputs)
    assert len(proxy.upstream) > 1000 and len(proxy.downstream) > 1000
    _assert_absent(needles, "bytes on the wire", proxy.captured())
    for out in outputs:
        _assert_absent(
            {k: v for k, v in needles.items() if k != "the marker"},
            "client stdout",
            out.stdout.encode(),
        )
        _assert_absent(needles, "client stderr", out.stderr.encode())

    # relay files while it runs (WAL not yet checkpointed), then after a clean stop
    for path in _files(relay.data_dir):
        _assert_absent(needles, f"relay file {path.name}", path.read_bytes())
    code, log = relay.stop()
    assert code == 0
    assert "DEBUG" in log or "INFO" in log  # the log really was written
    _assert_absent(needles, "relay log", log.encode())
    for path in _files(relay.data_dir):
        _assert_absent(needles, f"relay file {path.name}", path.read_bytes())

    # client files: history and state only sealed; key files only encrypted
    client_files = list(_files(home))
    assert any(p.name.endswith(".state.db") for p in client_files)
    for path in client_files:
        _assert_absent(needles, f"client file {path.name}", path.read_bytes())
    for path in client_files:
        if path.suffix == ".pub":
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path.name} has mode {mode:o}"
    assert stat.S_IMODE(home.stat().st_mode) & 0o077 == 0

    # the history is readable by its owner only through the CLI (decrypted on the fly)
    hist = _cli(home, "history", "--key", "bob", "--peer", "alice")
    assert hist.returncode == 0 and marker in hist.stdout


def test_relay_key_file_is_private(tmp_path: Path) -> None:
    relay = RelayProcess.start(tmp_path / "relay-data")
    try:
        for name, private in (("relay.key", True), ("relay.pub", False)):
            mode = stat.S_IMODE((relay.data_dir / name).stat().st_mode)
            assert (mode & 0o077 == 0) == private, f"{name} {mode:o}"
        assert stat.S_IMODE(relay.data_dir.stat().st_mode) & 0o077 == 0
    finally:
        relay.stop()
