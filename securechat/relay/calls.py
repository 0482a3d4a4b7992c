"""Work posted to a loop's thread: two queues, and a socketpair that wakes its selector.

Other threads (other workers, the store thread) never touch a connection: they
post ``fn(*args)`` to the loop that owns it. A post from another thread goes to
a shared deque (``append`` and ``popleft`` are atomic in CPython) and, once
until the loop runs its calls, writes one byte that wakes the loop's
``select``; a post from the loop's own thread goes to a local deque the loop
runs this turn, with no wake-up.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

Call = tuple[Callable[..., None], tuple[Any, ...]]


class Calls:
    """The calls posted to one loop (``owner``: its thread id, set when it starts)."""

    def __init__(self) -> None:
        self.wake, self._wake_w = socket.socketpair()  # the loop selects on ``wake``
        self.wake.setblocking(False)
        self._wake_w.setblocking(False)
        self._shared: deque[Call] = deque()
        self._local: deque[Call] = deque()
        self._signaled = False
        self.owner = 0

    def __bool__(self) -> bool:
        return bool(self._local or self._shared)

    def post(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        if threading.get_ident() == self.owner:
            self._local.append((fn, args))
            return
        self._shared.append((fn, args))
        if not self._signaled:
            self._signaled = True
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_w.send(b"\0")

    def woken(self) -> None:
        """The wake-up byte(s) arrived: read them (the calls run at the end of the turn)."""
        try:
            while self.wake.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def run(self, guard: Callable[[Callable[..., None], tuple[Any, ...]], None]) -> None:
        """Run every posted call, in posting order per queue, each through ``guard``
        (and the calls those post, one round more)."""
        self._signaled = False
        for _ in range(2):
            shared = self._shared
            while shared:
                fn, args = shared.popleft()
                guard(fn, args)
            local = self._local
            while local:
                fn, args = local.popleft()
                guard(fn, args)
