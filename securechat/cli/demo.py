"""``securechat demo``: the whole product in one command, on an embedded relay (shell).

It starts a real relay process on a free loopback port in a temporary
directory, creates alice, bob and carol there, lets them exchange keys the way
people do (``securechat invite`` / ``securechat accept``: a short code, no file
changes hands), and plays a short conversation through the same client engine
``talk`` uses: two people, then a group of three, with one message sent while
its recipient is offline. Beside what each person sees it prints what the relay
handled: frame sizes and the first bytes of the ciphertext, never the text.
Everything is removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from securechat import files
from securechat.client import invite as client_invite
from securechat.client import keystore
from securechat.client.app import Client, known_relays, open_client, open_store
from securechat.client.events import Event, MessageEvent
from securechat.core import invite, keys, wire
from securechat.errors import DeliveryTimeoutError, SecureChatError, TransportError

RELAY_START_TIMEOUT: Final = 20.0
MESSAGE_TIMEOUT: Final = 15.0
_LISTENING: Final = re.compile(r"listening on (\S+):(\d+)")
_COLUMN: Final = 58
_BUSY: Final = "the machine may be very busy: run the demo again"
# Each client's link thread prints what the relay handled for it (the tap), while the
# main thread prints what people see: one lock keeps every line whole.
_PRINT_LOCK: Final = threading.Lock()


@contextlib.contextmanager
def embedded_relay(data_dir: Path) -> Iterator[str]:
    """A relay subprocess on a free loopback port; yields ``HOST:PORT``."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "securechat",
            "relay",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--data",
            str(data_dir),
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + RELAY_START_TIMEOUT
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise TransportError(
                    "the embedded relay exited during start-up",
                    hint="run 'securechat relay --port 0' to see why",
                )
            match = _LISTENING.search(line)
            if match:
                yield f"{match.group(1)}:{match.group(2)}"
                return
        raise TransportError("the embedded relay did not start in time", hint=_BUSY)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Person:
    """One demo participant: an identity, a client, and the messages it has shown."""

    def __init__(self, name: str, home: Path) -> None:
        self.name = name
        identity = keys.generate_identity(name, os.urandom(keys.SEED_SIZE))
        text = keys.encode_private_key(identity, None, None)
        files.write_new_file(home / f"{name}.key", text.encode(), mode=0o600)
        files.write_new_file(
            home / f"{name}.pub", (identity.public.to_line() + "\n").encode(), mode=0o644
        )
        self.identity = identity
        self.inbox: queue.Queue[MessageEvent] = queue.Queue()
        self.client: Client | None = None

    def on_event(self, event: Event) -> None:
        if isinstance(event, MessageEvent):
            self.inbox.put(event)


def _print(text: str = "") -> None:
    with _PRINT_LOCK:
        print(text)


def _side(left: str, right: str) -> None:
    _print(f"  {left:<{_COLUMN}} | {right}")


def _tap(owner: str) -> Callable[[str, wire.Frame], None]:
    def tap(direction: str, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Send):
            what = (
                f" ({owner}'s device confirms receipt, end to end)"
                if (direction == "receipt")
                else ""
            )
            _side(
                "",
                f"relay <- {owner}: Send {len(frame.payload)} B ciphertext "
                f"{frame.payload[:12].hex()}...{what}",
            )
        elif isinstance(frame, wire.SendMulti):
            sizes = ", ".join(str(len(p)) for _, p in frame.recipients)
            _side("", f"relay <- {owner}: SendMulti {len(frame.recipients)} copies ({sizes} B)")
        elif isinstance(frame, wire.Deliver):
            _side(
                "",
                f"relay -> {owner}: Deliver {len(frame.payload)} B ciphertext "
                f"{frame.payload[:12].hex()}...",
            )

    return tap


def _say(sender: _Person, peers: list[_Person], text: str) -> None:
    assert sender.client is not None
    conv = sender.client.conversation([p.identity.public for p in peers])
    _side(f"{sender.name} types: {text}", "")
    sender.client.messenger.send_text(conv, text)


def _shows(person: _Person) -> None:
    try:
        event = person.inbox.get(timeout=MESSAGE_TIMEOUT)
    except queue.Empty as exc:
        raise DeliveryTimeoutError(
            f"demo: {person.name} did not receive a message in time", hint=_BUSY
        ) from exc
    where = " (group)" if event.group else ""
    trust = "" if event.verified else " (unverified)"
    _side(f"{person.name} sees{where}  {event.sender_name}{trust}: {event.text}", "")


@contextlib.contextmanager
def _online(person: _Person, relay: str) -> Iterator[None]:
    with open_client(
        None, relay, None, person.on_event, identity=person.identity, tap=_tap(person.name)
    ) as client:
        person.client = client
        if not client.messenger.wait_connected(MESSAGE_TIMEOUT):
            raise TransportError(f"demo: {person.name} could not connect to the relay", hint=_BUSY)
        try:
            yield
            client.messenger.wait_all_accepted(MESSAGE_TIMEOUT)
        finally:
            person.client = None


def run_demo(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="securechat-demo-"))
    old_home = os.environ.get(keystore.ENV_HOME)
    os.environ[keystore.ENV_HOME] = str(workdir / "home")
    try:
        keystore.ensure_home()
        with embedded_relay(workdir / "relay") as relay:
            _print(f"securechat demo: relay on {relay}, everything in {workdir} (removed after)")
            _play(relay, workdir / "home")
        _print("\ndemo finished: every message arrived once, the relay only ever held ciphertext.")
        return 0
    finally:
        if old_home is None:
            os.environ.pop(keystore.ENV_HOME, None)
        else:
            os.environ[keystore.ENV_HOME] = old_home
        shutil.rmtree(workdir, ignore_errors=True)


_INVITE_KINDS: Final = {1: "PAKE message", 2: "sealed public key"}


def _invite_tap(owner: str, other: str, verbose: bool) -> client_invite.Tap:
    """What the relay handles of an invite: frames, sizes, never a code or a key."""

    def tap(direction: str, frame: wire.Frame) -> None:
        if not verbose:
            return
        if isinstance(frame, wire.InviteOpened):
            _side("", f"relay -> {owner}: InviteOpened {frame.nameplate} (a free nameplate)")
        if direction != "sent":
            return
        if isinstance(frame, wire.InviteOpen):
            _side("", f"relay <- {owner}: InviteOpen")
        elif isinstance(frame, wire.InviteJoin):
            _side("", f"relay <- {owner}: InviteJoin {frame.nameplate}")
        elif isinstance(frame, wire.InviteData):
            what = _INVITE_KINDS.get(frame.payload[1], "?")
            _side("", f"relay <- {owner}: InviteData {len(frame.payload)} B ({what}) -> {other}")

    return tap


def _run_side(
    person: _Person,
    other: _Person,
    relay: str,
    session: invite.InviteSession,
    verbose: bool,
    on_event: Callable[[invite.Event], None] = lambda event: None,
) -> keys.PublicIdentity:
    link = client_invite.connect(relay, known_relays(), None)
    try:
        return client_invite.exchange(
            session,
            link,
            timeout=MESSAGE_TIMEOUT,
            on_event=on_event,
            tap=_invite_tap(person.name, other.name, verbose),
        )
    finally:
        link.close()


def _record(person: _Person, peer: keys.PublicIdentity) -> client_invite.Recorded:
    store = open_store(person.identity)
    try:
        return client_invite.record_peer(store, person.identity.public, peer, name=None)
    finally:
        store.close()


def _invite(opener: _Person, joiner: _Person, relay: str, *, verbose: bool) -> None:
    """``opener`` runs ``securechat invite``, ``joiner`` accepts its code: the real exchange
    (SPAKE2 through the relay), each then trusting the other's verified key."""
    codes: queue.Queue[invite.Code] = queue.Queue()
    result: list[keys.PublicIdentity | SecureChatError] = []

    def on_event(event: invite.Event) -> None:
        if isinstance(event, invite.CodeReady):
            codes.put(event.code)

    def open_side() -> None:
        session = invite.InviteSession.opener(opener.identity.public, os.urandom)
        try:
            result.append(_run_side(opener, joiner, relay, session, verbose, on_event))
        except SecureChatError as exc:
            result.append(exc)

    if verbose:
        _side(f"{opener.name} runs: securechat invite", "")
    thread = threading.Thread(target=open_side, name=f"demo-invite-{opener.name}", daemon=True)
    thread.start()
    try:
        code = codes.get(timeout=MESSAGE_TIMEOUT)
    except queue.Empty as exc:
        raise DeliveryTimeoutError(
            "demo: the invite got no code from the relay", hint=_BUSY
        ) from exc
    if verbose:
        _side(f"{opener.name} sees the code {code} and reads it to {joiner.name}", "")
        _side(f"{joiner.name} runs: securechat accept {code}", "")
    session = invite.InviteSession.joiner(code, joiner.identity.public, os.urandom)
    opener_key = _run_side(joiner, opener, relay, session, verbose)
    thread.join(MESSAGE_TIMEOUT)
    if not result:
        raise DeliveryTimeoutError("demo: the invite did not finish", hint=_BUSY)
    joiner_key = result[0]
    if isinstance(joiner_key, SecureChatError):
        raise joiner_key
    for person, peer in ((joiner, opener_key), (opener, joiner_key)):
        recorded = _record(person, peer)
        if verbose:
            _side(
                f"{person.name}: verified {recorded.peer.name} "
                f"({recorded.peer.fingerprint[:14]}...)",
                "",
            )
    if not verbose:
        _side(f"{opener.name} invites {joiner.name} (code {code}): both verified", "")


def _play(relay: str, home: Path) -> None:
    people = [_Person(n, home) for n in ("alice", "bob", "carol")]
    alice, bob, carol = people
    for p in people:
        _print(f"  created {p.name:<6} fingerprint {p.identity.public.fingerprint}")
    _print()
    _side("WHAT THE PEOPLE SEE", "WHAT THE RELAY HANDLED")
    _print("\n-- 0. exchanging keys: one short code each, no file changes hands")
    _invite(alice, bob, relay, verbose=True)
    _invite(alice, carol, relay, verbose=False)
    _invite(bob, carol, relay, verbose=False)
    _print("\n-- 1. alice and bob, both online")
    with _online(alice, relay), _online(bob, relay):
        _say(alice, [bob], "Hi Bob! Is this thing really end-to-end?")
        _shows(bob)
        _say(bob, [alice], "It is. The relay only sees the bytes on the right.")
        _shows(alice)
        _print("\n-- 2. a group of three; carol is offline, the relay keeps her copy")
        _say(alice, [bob, carol], "Carol, when you're back: lunch at noon?")
        _shows(bob)
    _print("\n-- 3. carol comes online and gets what she missed")
    with _online(carol, relay), _online(alice, relay), _online(bob, relay):
        _shows(carol)
        _say(carol, [alice, bob], "Noon works. Sorry, I was offline!")
        _shows(alice)
        _shows(bob)
    _print(
        "\n  safety number alice/bob (compare out of band): "
        f"{keys.safety_number(alice.identity.public, bob.identity.public)}"
    )


def configure(command: str, p: argparse.ArgumentParser) -> None:
    assert command == "demo"
    p.description = (
        "Start a relay on a free loopback port in a temporary directory, create "
        "alice, bob and carol, let them exchange keys with invite codes, play a conversation "
        "(two people, then a group of three, one message sent while its recipient is offline), "
        "print what each person sees beside what "
        "the relay handled (sizes and ciphertext prefixes, never the text), clean up."
    )
    p.set_defaults(handler=run_demo)
