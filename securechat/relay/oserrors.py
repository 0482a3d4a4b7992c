"""Where the relay turns ``OSError`` (and SQLite's errors) into ours: one place.

httpcore maps the socket errors of a backend with one ``map_exceptions``
(``_backends/sync.py``); the relay does the same for what it touches at
start-up, its port, data folder, key file and store, so that every failure is
one line (``securechat: cannot open the relay store ...: Permission denied``)
with the exit code of its family, never a traceback.

The per-frame path does not use the context manager (it would cost a generator
per call): the worker catches ``OSError`` on a socket itself and closes that one
connection, with :func:`describe` as the reason in its log line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from securechat.errors import SecureChatError

ExceptionMapping = Mapping[type[Exception], type[SecureChatError]]


@contextlib.contextmanager
def map_exceptions(mapping: ExceptionMapping, what: str) -> Iterator[None]:
    """Re-raise an exception of a type in ``mapping`` as its error: ``"{what}: {why}"``."""
    try:
        yield
    except Exception as exc:
        for source, target in mapping.items():
            if isinstance(exc, source):
                raise target(f"{what}: {describe(exc)}") from exc
        raise


def describe(exc: BaseException) -> str:
    """What went wrong, for a person: an OSError's text without its errno and path
    (``Permission denied``), anything else as it prints."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
