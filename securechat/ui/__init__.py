"""User interfaces (I/O shell): the interactive ``talk`` screen and its pipe mode.

``format`` holds the pure text formatting (tested without a terminal),
``talk`` the command (arguments, pipe mode), ``screen`` the prompt_toolkit
application used when stdin and stdout are a terminal and ``lines`` what its
message area draws. ``script`` holds ``send``, ``receive``, ``history``, ``trust``.
"""
