"""Relays sharing mailboxes through Redis (issue 16): nodes, faults, the soak."""
