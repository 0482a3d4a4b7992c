"""The one place the client turns OS and library exceptions into ours (shell).

Like httpcore's ``map_exceptions``: a block that touches the world (a file, a
socket, SQLite) runs inside :func:`map_exceptions` with a table of exception
classes to our error classes and a phrase saying what was being done; whatever
it raises leaves as ``<what>: <the system's reason>`` in the error family the
user's exit code and advice depend on. Conditions that deserve their own
sentence (a refused connection, a key that does not exist) are caught by name
where they happen; everything else falls through to this table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from securechat.errors import SecureChatError

ExceptionMapping = Mapping[type[Exception], type[SecureChatError]]


@contextlib.contextmanager
def map_exceptions(
    mapping: ExceptionMapping, what: str, *, hint: str | None = None
) -> Iterator[None]:
    """Raise ``mapping[type](f"{what}: {reason}", hint=hint)`` for a listed exception.

    The first entry the exception is an instance of wins, so list subclasses
    (``FileNotFoundError``) before their bases (``OSError``). Our own errors and
    unlisted exceptions pass through unchanged.
    """
    try:
        yield
    except SecureChatError:
        raise
    except Exception as exc:
        for source, target in mapping.items():
            if isinstance(exc, source):
                raise target(f"{what}: {reason(exc)}", hint=hint) from exc
        raise


def reason(exc: BaseException) -> str:
    """The system's words for a failure: ``strerror`` of an OSError, else the message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
