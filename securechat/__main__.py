"""``python -m securechat`` runs the same CLI as the ``securechat`` command."""

from securechat.cli import run

run()
