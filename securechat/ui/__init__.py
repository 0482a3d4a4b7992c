"""User interfaces (I/O shell): the interactive ``talk`` screen and its pipe mode.

``format`` holds the pure text formatting and ``chatlog`` what the screen shows
(both tested without a terminal), ``screen`` the prompt_toolkit application used
when stdin and stdout are a terminal, ``lines`` how its message area draws,
``status`` its status line, and ``pipe`` the line filter used otherwise. The
commands themselves (arguments, exit codes) are in :mod:`securechat.cli`.
"""
