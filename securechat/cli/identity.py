"""``securechat keygen``, ``fingerprint`` and ``safety-number``: identities on disk (shell).

Loaded only for these commands; it needs the key code and the key directory,
nothing of the network, the store or the chat screen, so ``keygen`` starts fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from securechat import files
from securechat.client import keystore
from securechat.core import keys
from securechat.errors import KeyExistsError


def configure(command: str, p: argparse.ArgumentParser) -> None:
    {"keygen": _keygen, "fingerprint": _fingerprint, "safety-number": _safety_number}[command](p)


def _keygen(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Create an identity (X25519 + Ed25519 key pairs) as NAME.key (private, 0600, "
        "encrypted with a passphrase: prompted twice on a terminal, or taken from "
        "$SECURECHAT_PASSPHRASE) and NAME.pub (one line to share). The key directory is "
        "$SECURECHAT_HOME, default ./keys. Prints the fingerprint."
    )
    p.add_argument("name", metavar="NAME", help="identity name (letters, digits, _ - .)")
    p.add_argument("--no-passphrase", action="store_true", help="store the key unencrypted")
    p.add_argument("--force", action="store_true", help="overwrite an existing key of that name")
    p.set_defaults(handler=cmd_keygen)


def _fingerprint(p: argparse.ArgumentParser) -> None:
    p.description = "Print the fingerprint of a .pub or .key file, or of NAME in the key dir."
    p.add_argument("key", metavar="FILE|NAME")
    p.set_defaults(handler=cmd_fingerprint)


def _safety_number(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Print the 60-digit safety number for your identity and a peer's: the same on both "
        "sides. Compare it out of band (in person, by phone) to rule out a swapped key."
    )
    p.add_argument("--peer", required=True, metavar="FILE|NAME", help="the peer's .pub or name")
    p.add_argument("--key", metavar="FILE|NAME", help="your identity (default: the only key)")
    p.set_defaults(handler=cmd_safety_number)


def cmd_keygen(args: argparse.Namespace) -> int:
    name = keys.check_name(args.name)
    identity = keys.generate_identity(name, os.urandom(keys.SEED_SIZE))
    directory = keystore.ensure_home()
    private_path = directory / f"{name}{keystore.PRIVATE_SUFFIX}"
    public_path = directory / f"{name}{keystore.PUBLIC_SUFFIX}"
    replacing = private_path.exists()
    for path in (private_path, public_path):
        if path.exists() and not args.force:
            raise KeyExistsError(
                f"{path} already exists", hint="use --force to overwrite it, or pick another NAME"
            )
    text = _private_key_text(identity, private_path, encrypt=not args.no_passphrase)
    # The old state is sealed under the old key: the new key could never open it.
    # Hold the identity's lock (no client may be running) while the key is replaced
    # and the state moved aside, so nothing opens the old state with the new key.
    has_state = (directory / f"{name}{keystore.STATE_SUFFIX}").exists()
    with keystore.identity_lock(name) if has_state else contextlib.nullcontext():
        files.write_new_file(private_path, text.encode(), mode=0o600, force=args.force)
        line = identity.public.to_line() + "\n"
        files.write_new_file(public_path, line.encode(), mode=0o644, force=args.force)
        archived = keystore.archive_state(name) if has_state else None
    print(f"wrote {private_path} (private, keep it secret) and {public_path} (share this)")
    print(f"fingerprint {identity.public.fingerprint}")
    if archived is not None:
        print(
            f"moved the old identity's state (sessions, history, known peers) to {archived}; "
            "it opens only with the old key"
        )
    if replacing:
        print(
            f"this is a NEW key for {name}: peers will see that {name}'s key changed. Send them "
            f"the new {public_path}; they check it (securechat safety-number) and accept it "
            f"with 'securechat trust {name}'"
        )
    return 0


def _private_key_text(identity: keys.Identity, path: Path, *, encrypt: bool) -> str:
    if not encrypt:
        print(
            f"securechat: warning: {path} is NOT encrypted; anyone who can read it "
            "can read your messages",
            file=sys.stderr,
        )
        return keys.encode_private_key(identity, None, None)
    passphrase = keystore.passphrase_from_env_or_tty(f"Passphrase for {path}: ", confirm=True)
    params = keys.KdfParams(salt=os.urandom(keys.SALT_SIZE), nonce=os.urandom(keys.NONCE_SIZE))
    return keys.encode_private_key(identity, passphrase, params)


def cmd_fingerprint(args: argparse.Namespace) -> int:
    public = keystore.load_public(args.key)
    print(f"{public.fingerprint}  {public.name}".rstrip())
    return 0


def cmd_safety_number(args: argparse.Namespace) -> int:
    ours = _own_public(args.key)
    peer = keystore.load_public(args.peer, peer=True)
    print(f"safety number for {ours.name} and {peer.name}:")
    print(keys.safety_number(ours, peer))
    return 0


def _own_public(arg: str | None) -> keys.PublicIdentity:
    """Our public identity without asking for the passphrase (it is in the key file)."""
    if arg:
        path = keystore.resolve(arg, keystore.PRIVATE_SUFFIX)
    else:
        path = keystore.default_private_path()
    return keystore.load_public(str(path))
