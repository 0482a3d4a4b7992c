"""The relay: routes opaque frames between authenticated clients (I/O shell).

Modules: ``limits`` (configuration and token buckets), ``guard`` (budgets that
outlive a connection: admission, per-identity and per-network rate limits,
partial-frame memory), ``keyfile`` (the relay's own Noise key on disk), ``store``
(SQLite mailboxes, quotas and prekeys, one store thread doing group commit),
``router`` (who is online, where, and what waits for an acknowledgement),
``handlers`` (what each client frame does), ``worker`` (selector loops owning
connections), ``server`` (start-up, shutdown, command-line arguments).

The relay never imports the end-to-end core (keys, x3dh, ratchet, envelope):
it cannot read a message even by mistake.
"""
