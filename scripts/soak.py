"""The soak: real client processes and a relay, SIGKILLed at random, and nothing is lost.

    python scripts/soak.py [--messages 2000] [--kills 30] [--seed 1] [--json soak.json]

Two sender/receiver pairs and a group of three. Every identity is one *driver*
process (``soak.py driver ...``, built on the client engine ``Messenger``, with
its own encrypted state store and outbox) that sends numbered messages
(``SENDER|CONV|SEQ``) at a steady pace and records what it sees in an
append-only JSON-lines file: ``sending`` before each message is sealed,
``queued`` (message id and text) once it is committed to the outbox,
``accepted`` when the relay's Accepted/Delivered status arrives, ``shown`` for
every message displayed. Meanwhile the relay and the drivers are SIGKILLed at
random moments and restarted (same port and data; a driver resumes after its
last numbered message, and its outbox resends whatever was not accepted).
After the kills a final drain runs every driver until its outbox is empty and
nothing new arrives.

Then the checks: every message a sender saw accepted is shown exactly once to
every recipient (lost = 0, duplicates = 0), in per-sender order (order
violations = 0), and every message committed to an outbox was accepted in the
end (forgotten = 0). Exit status 1 if any check fails. Figures go to stdout and,
with ``--json``, to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

PAIRS: Final = (("p1", ("ann", "ben")), ("p2", ("cat", "dan")))
GROUP: Final = ("g", ("eve", "fay", "gus"))
QUIET_S: Final = 3.0  # drain: no new message for this long (and outbox empty) = done
DRAIN_TIMEOUT_S: Final = 120.0
STOP_FILE: Final = "stop"


def streams() -> dict[str, list[tuple[str, list[str]]]]:
    """Per identity: the conversations it sends to, as (label, peers)."""
    plan: dict[str, list[tuple[str, list[str]]]] = defaultdict(list)
    for label, members in (*PAIRS, GROUP):
        for me in members:
            plan[me].append((label, [m for m in members if m != me]))
    return plan


# --- the driver process ------------------------------------------------------------------------


class EventLog:
    """Append-only JSON lines; each line one write(2), so a SIGKILL never tears a line."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def write(self, **record: Any) -> None:
        os.write(self.fd, (json.dumps(record) + "\n").encode())


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # cannot happen with one write per line, but never trust a crash
    return out


def run_driver(args: argparse.Namespace) -> int:
    from securechat.client import keystore
    from securechat.client.app import open_client
    from securechat.client.events import Event, MessageEvent, NoticeEvent, StatusEvent

    work = Path(args.work)
    log_path = work / f"events-{args.name}.jsonl"
    earlier = read_events(log_path)
    log = EventLog(log_path)
    last_shown = [time.monotonic()]

    def on_event(event: Event) -> None:
        if isinstance(event, MessageEvent):
            log.write(ev="shown", text=event.text, sender=event.sender_name)
            last_shown[0] = time.monotonic()
        elif isinstance(event, StatusEvent) and event.status >= 1:
            log.write(ev="accepted", id=event.msg_id.hex())
        elif isinstance(event, NoticeEvent) and event.error:
            log.write(ev="notice", text=event.text)

    plan = streams()[args.name]
    with open_client(args.name, args.relay, args.relay_key, on_event) as client:
        m = client.messenger
        convs = {
            label: client.conversation([keystore.load_public(p) for p in peers])
            for label, peers in plan
        }
        next_seq = {label: 1 for label in convs}
        for e in earlier:
            if e["ev"] == "sending":
                next_seq[e["label"]] = max(next_seq[e["label"]], e["seq"] + 1)
        _log_history(m, convs, log)  # ids -> texts for messages an earlier run committed
        log.write(ev="started", mode=args.mode)
        if args.mode == "send":
            _send_all(m, convs, next_seq, log, args)
            while not (work / STOP_FILE).exists():
                time.sleep(0.1)
        else:
            m.wait_connected(30)
            m.synced.wait(30)
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while time.monotonic() < deadline:
                if m.pending() == 0 and time.monotonic() - last_shown[0] > QUIET_S:
                    break
                time.sleep(0.1)
            _log_history(m, convs, log)
            log.write(ev="drained", pending=m.pending())
    return 0


def _log_history(m: Any, convs: dict[str, Any], log: EventLog) -> None:
    for conv in convs.values():
        for entry in m.history(conv.conv_id, 1_000_000):
            if not entry.get("out"):
                # committed (and acknowledged) but maybe never displayed: killed in between
                log.write(ev="stored_in", text=entry["text"])
            else:
                log.write(ev="queued", id=entry["msg_id"], text=entry["text"])
                # the status is committed with the outbox removal, so a kill between that
                # commit and the StatusEvent's log line cannot hide an acceptance
                if int(entry.get("status", 0)) >= 1:
                    log.write(ev="accepted", id=entry["msg_id"])


def _send_all(
    m: Any, convs: dict[str, Any], next_seq: dict[str, int], log: EventLog, args: argparse.Namespace
) -> None:
    interval = 1.0 / args.rate
    while True:
        todo = [label for label in convs if next_seq[label] <= args.count]
        if not todo:
            break
        for label in todo:
            seq = next_seq[label]
            text = f"{args.name}|{label}|{seq}"
            log.write(ev="sending", label=label, seq=seq)
            next_seq[label] = seq + 1
            msg_id = m.send_text(convs[label], text)
            log.write(ev="queued", id=msg_id.hex(), text=text)
            time.sleep(interval)
    log.write(ev="sent_all")


# --- the orchestrator --------------------------------------------------------------------------


@dataclass
class Figures:
    messages_sent: int = 0  # committed to a sender's outbox (sealed, "queued")
    aborted_before_commit: int = 0  # sender killed while sealing: never promised, never sent
    acknowledged: int = 0  # the sender saw the relay's Accepted
    deliveries_expected: int = 0  # acknowledged messages x recipients
    delivered: int = 0  # shown, or committed to the recipient's history
    in_history_not_shown: int = 0  # recipient killed between commit and display
    duplicates_shown: int = 0
    lost: int = 0
    order_violations: int = 0
    forgotten: int = 0  # committed but never accepted even after the final drain
    notices: int = 0  # errors the clients reported (rejected messages and the like)
    relay_kills: int = 0
    client_kills: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.duplicates_shown
            or self.problems
            or self.order_violations
            or self.forgotten
            or self.delivered < self.deliveries_expected
        )


class Driver:
    def __init__(
        self,
        name: str,
        work: Path,
        env: dict[str, str],
        relay: str,
        key: str,
        count: int,
        rate: float,
    ) -> None:
        self.name, self.work, self.env = name, work, env
        self.base = [
            sys.executable,
            str(Path(__file__).resolve()),
            "driver",
            "--name",
            name,
            "--work",
            str(work),
            "--relay",
            relay,
            "--relay-key",
            key,
            "--count",
            str(count),
            "--rate",
            str(rate),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, mode: str = "send") -> None:
        err = open(self.work / f"stderr-{self.name}.txt", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.base, "--mode", mode],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=self.work,
        )
        err.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    def sent_all(self) -> bool:
        events = read_events(self.work / f"events-{self.name}.jsonl")
        return any(e["ev"] == "sent_all" for e in events)


def run_soak(
    messages: int, kills: int, seed: int, rate: float, work: Path, log: Any = print
) -> Figures:
    from relay_fixture import (  # type: ignore[import-not-found]
        RelayProcess,  # type: ignore[import-not-found]
        cli_env,
        keygen,
    )

    rnd = random.Random(seed)
    plan = streams()
    n_streams = sum(len(v) for v in plan.values())
    count = max(messages // n_streams, 1)
    home = work / "home"
    keygen(home, *plan)
    relay = RelayProcess.start(work / "relay", "--ack-timeout", "1", "--log-level", "WARNING")
    env = cli_env(home)
    address = f"{relay.host}:{relay.port}"
    drivers = {
        n: Driver(n, work, env, address, str(work / "relay" / "relay.pub"), count, rate)
        for n in plan
    }
    fig = Figures()
    start = time.monotonic()
    for d in drivers.values():
        d.start()
    expected_s = count / rate
    pause = (max(expected_s * 0.8, 2.0) / max(kills, 1)) if kills else 1.0
    deadline = start + expected_s * 4 + 120
    log(
        f"soak: {len(plan)} clients, {n_streams} streams x {count} messages, {kills} kills, "
        f"work dir {work}"
    )
    while time.monotonic() < deadline:
        kills_done = fig.relay_kills + fig.client_kills
        if all(d.sent_all() for d in drivers.values()) and kills_done >= kills:
            break
        time.sleep(rnd.uniform(pause * 0.5, pause * 1.5))
        if fig.relay_kills + fig.client_kills >= kills:
            continue
        if rnd.random() < 0.4:
            relay.kill()
            time.sleep(rnd.uniform(0.05, 0.6))
            relay = relay.restart()
            fig.relay_kills += 1
        else:
            d = drivers[rnd.choice(sorted(drivers))]
            d.kill()
            time.sleep(rnd.uniform(0.0, 0.4))
            d.start()
            fig.client_kills += 1
    else:
        fig.problems.append("sending phase hit its deadline")
    (work / STOP_FILE).touch()
    for d in drivers.values():
        d.wait(30)
    log(f"soak: sending done after {time.monotonic() - start:.1f}s; draining")
    for d in drivers.values():
        d.start("drain")
    for d in drivers.values():
        if d.wait(DRAIN_TIMEOUT_S + 60) != 0:
            fig.problems.append(f"driver {d.name} drain exited abnormally")
    _, relay_log = relay.stop()
    if "Traceback" in relay_log:
        fig.problems.append("relay log has a Traceback")
    fig.seconds = round(time.monotonic() - start, 1)
    for err in sorted(work.glob("stderr-*.txt")):
        if "Traceback" in err.read_text(errors="replace"):
            fig.problems.append(f"{err.name} has a Traceback")
    analyse(work, plan, fig)
    return fig


def analyse(work: Path, plan: dict[str, list[tuple[str, list[str]]]], fig: Figures) -> None:
    shown: dict[str, list[str]] = {}
    stored_in: dict[str, set[str]] = {}
    id2text: dict[str, str] = {}
    accepted_ids: set[str] = set()
    attempted: set[tuple[str, str, int]] = set()
    for name in plan:
        events = read_events(work / f"events-{name}.jsonl")
        shown[name] = [e["text"] for e in events if e["ev"] == "shown"]
        stored_in[name] = {e["text"] for e in events if e["ev"] == "stored_in"}
        for e in events:
            if e["ev"] == "queued":
                id2text[e["id"]] = e["text"]
            elif e["ev"] == "accepted":
                accepted_ids.add(e["id"])
            elif e["ev"] == "sending":
                attempted.add((name, e["label"], e["seq"]))
            elif e["ev"] == "notice":
                fig.notices += 1
                if len(fig.problems) < 20 and "rejected" in e["text"]:
                    fig.problems.append(f"notice at {name}: {e['text']}")
    queued = set(id2text.values())
    acked = {id2text[i] for i in accepted_ids if i in id2text}
    fig.messages_sent = len(queued)
    fig.aborted_before_commit = len({f"{n}|{lbl}|{s}" for n, lbl, s in attempted} - queued)
    fig.acknowledged = len(acked)
    fig.forgotten = len(queued - acked)
    recipients = {(me, label): peers for me, convs in plan.items() for label, peers in convs}
    counts = {name: Counter(texts) for name, texts in shown.items()}
    for text in sorted(queued):
        sender, label, _ = text.split("|")
        for r in recipients[(sender, label)]:
            n = counts[r][text]
            if n == 0 and text in stored_in[r]:
                fig.in_history_not_shown += 1
            fig.delivered += 1 if n or text in stored_in[r] else 0
            fig.duplicates_shown += max(n - 1, 0)
            if text in acked:
                fig.deliveries_expected += 1
                if n == 0 and text not in stored_in[r]:
                    fig.lost += 1
                    if len(fig.problems) < 20:
                        fig.problems.append(f"lost: {text} never shown to {r}")
    for name, texts in shown.items():
        last: dict[tuple[str, str], int] = {}
        for text in texts:
            sender, label, seq = text.split("|")
            key = (sender, label)
            if int(seq) <= last.get(key, 0):
                fig.order_violations += 1
                if len(fig.problems) < 20:
                    fig.problems.append(f"order: {name} saw {text} after seq {last[key]}")
            last[key] = max(last.get(key, 0), int(seq))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")
    d = sub.add_parser("driver")
    for a in ("--name", "--work", "--relay", "--relay-key", "--mode"):
        d.add_argument(a, required=True)
    d.add_argument("--count", type=int, required=True)
    d.add_argument("--rate", type=float, required=True)
    p.add_argument("--messages", type=int, default=2000, help="total messages (all senders)")
    p.add_argument("--kills", type=int, default=30, help="SIGKILLs (relay and clients)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, default=20.0, help="messages/s per conversation sender")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--work", help="work directory (default: a temporary one, removed if ok)")
    args = p.parse_args(argv)
    if args.cmd == "driver":
        return run_driver(args)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="securechat-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    fig = run_soak(args.messages, args.kills, args.seed, args.rate, work)
    report = {**asdict(fig), "ok": fig.ok, "seed": args.seed}
    for key, value in report.items():
        if key != "problems":
            print(f"{key:>24}: {value}")
    for problem in fig.problems:
        print(f"  problem: {problem}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if fig.ok and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    elif not fig.ok:
        print(f"work directory kept for inspection: {work}")
    return 0 if fig.ok else 1


if __name__ == "__main__":
    sys.exit(main())
