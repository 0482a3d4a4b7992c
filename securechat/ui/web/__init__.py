"""The browser UI: a small HTTP + WebSocket server on 127.0.0.1 in front of the daemon.

The page (``static/``: plain HTML, CSS and JavaScript modules, no build step,
nothing fetched from the network) is a view; keys and crypto stay in the daemon.
"""
