"""Real users across a relay cluster: the CLI with one node's address, or the list of them."""

from __future__ import annotations

from pathlib import Path

import pytest
from securechat.client.app import relay_address
from securechat.client.relays import split_relays
from securechat.errors import UsageError

from relay_fixture import RelayProcess, cli_cmd, cli_env, run_cli
from test_cluster.nodes import Cluster

pytestmark = pytest.mark.timeout(120)


def addr(node: RelayProcess) -> str:
    return f"{node.host}:{node.port}"


def send(home: Path, relays: str, key: str, peer: str, *texts: str, **env: str) -> None:
    args = ["send", "--key", key, "--peer", peer, "--timeout", "20"]
    if relays:
        args += ["--relay", relays]
    res = run_cli(home, *args, input="".join(t + "\n" for t in texts), timeout=60)
    assert res.returncode == 0, res.stderr


def receive(home: Path, relays: str, key: str) -> list[str]:
    res = run_cli(home, "receive", "--key", key, "--relay", relays, "--timeout", "2", timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def test_users_on_different_nodes_talk_through_the_cli(home: Path, cluster: Cluster) -> None:
    n1, n2, n3 = cluster.nodes
    send(home, f"{addr(n1)},{addr(n2)}", "alice", "bob", "hello bob", "across nodes")
    assert receive(home, addr(n2), "bob") == ["alice: hello bob", "alice: across nodes"]
    send(home, addr(n3), "bob", "alice", "hi alice")
    assert receive(home, f"{addr(n1)},{addr(n3)}", "alice") == ["bob: hi alice"]
    assert receive(home, addr(n1), "bob") == []  # acknowledged once, on any node


def test_the_cli_fails_over_to_the_next_address(home: Path, cluster: Cluster) -> None:
    n1, n2, _ = cluster.nodes
    n1.kill()
    send(home, f"{addr(n1)},{addr(n2)}", "alice", "bob", "n1 is down")
    assert receive(home, f"{addr(n1)},{addr(n2)}", "bob") == ["alice: n1 is down"]


def test_the_list_in_securechat_relay(home: Path, cluster: Cluster) -> None:
    import subprocess

    n1, n2, n3 = cluster.nodes
    env = cli_env(home, SECURECHAT_RELAY=f"{addr(n2)},{addr(n3)}")
    done = subprocess.run(
        [*cli_cmd(), "send", "--key", "alice", "--peer", "bob", "--timeout", "20"],
        input="via the environment\n", capture_output=True, text=True, timeout=60, env=env,
        cwd=home.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert receive(home, addr(n1), "bob") == ["alice: via the environment"]


def test_address_lists_are_checked_before_anything_happens(home: Path) -> None:
    assert split_relays("a:1, b") == ["a:1", "b:5050"]
    assert relay_address("a:1,b:2") == "a:1,b:2"
    with pytest.raises(UsageError):
        split_relays("a:1,,b:2")
    res = run_cli(home, "send", "--key", "alice", "--peer", "bob", "--relay", "a:1,", input="x\n")
    assert res.returncode == 2
    assert res.stderr.strip().startswith("securechat: bad relay address list")
    # A pin belongs to one address: a list given to trust is refused, not pinned as a name.
    from securechat.relay import keyfile

    keyfile.load_or_create(home.parent / "relaykey")
    pub = home.parent / "relaykey" / keyfile.PUB_FILE
    res = run_cli(home, "trust", "--relay", "a:1,b:2", "--relay-key", str(pub))
    assert res.returncode == 2 and "bad relay address" in res.stderr
    assert not (home / "known_relays").exists()
