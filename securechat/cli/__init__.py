"""The command line: ``dispatch`` (the one dispatcher and error printer) and one module
per command group (``identity``, ``relay``, ``chat``, ``scripts``, ``invite``, ``demo``),
each imported only when its command runs."""

from securechat.cli.dispatch import main, run

__all__ = ["main", "run"]
