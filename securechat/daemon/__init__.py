"""One long-lived client per identity, and what talks to it (shell).

``securechat daemon --key NAME`` holds the identity's lock and drives its
session (:mod:`securechat.client.messenger`); everything else is its client
through JSON-RPC 2.0: on the Unix socket ``NAME.sock`` in the key directory,
or on stdin/stdout with ``--stdio``. ``docs/api.md`` is the contract.

* :mod:`.rpc`: the JSON-RPC framing and its limits, without I/O;
* :mod:`.api`: the events and method results as JSON (the names are a contract);
* :mod:`.service`: the daemon's methods and subscriptions (transport-agnostic);
* :mod:`.server`: the socket and stdio shells (threads, bounds, peer checks);
* :mod:`.remote`: the client side, used by ``talk``, ``send``, ``receive``,
  ``history`` and the web UI when a daemon runs.
"""
