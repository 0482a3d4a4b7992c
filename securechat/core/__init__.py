"""The sans-I/O core: bytes, keys, randomness and time in; events and bytes out.

Nothing under ``securechat.core`` opens a socket or a file, starts a thread, reads
the clock or the environment: the shells (``relay``, ``client``, ``ui``, ``cli``)
do, and pass what they read in. ``tests/unit/test_architecture.py`` keeps it so.
"""
