"""What the ``securechat`` command prints for an error, as the tests read it.

``cli.dispatch.main`` prints ``securechat: <what went wrong>`` and, when the error
carries one, a second line ``securechat: hint: <what to do>`` (as age does).
"""

from __future__ import annotations

HINT = "securechat: hint: "


def error_text(stderr: str, *, alone: bool = False) -> str:
    """The last error printed, with its hint on a second line if there is one.

    ``alone``: nothing else is on stderr (one error line, at most one hint line).
    """
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and "Traceback" not in stderr, stderr
    hint = lines.pop() if lines[-1].startswith(HINT) else None
    assert lines and lines[-1].startswith("securechat: "), stderr
    assert not lines[-1].startswith(HINT), f"two hint lines: {stderr}"
    if alone:
        assert len(lines) == 1, stderr
    return lines[-1] if hint is None else f"{lines[-1]}\n{hint}"
