"""``securechat web``'s server: static assets and one WebSocket per page (shell).

The WebSocket carries the daemon's JSON-RPC unchanged, one JSON object per
message each way: this server is a proxy with guards, not a second API. Each
page gets its own connection to the daemon's socket (its own subscription).

The guards, against what a web page in the same browser could try:

* **Token.** 32 random bytes (``secrets``), in the URL's fragment, which the
  browser never sends in a request, a ``Referer`` or a log; the page reads it and
  sends it on the WebSocket request (``/ws?token=...``), where it is compared in
  constant time. Without it: 403, and nothing reaches the daemon. The static
  assets are the package's own files, the same for everyone, and carry no data:
  they are served without the token (a first navigation cannot carry a fragment).
* **Host.** Only ``127.0.0.1:PORT`` and ``localhost:PORT``: a DNS-rebinding page
  (``evil.example`` resolving to 127.0.0.1) sends its own name and gets 421.
* **Origin.** The WebSocket handshake must come from this origin: a page of
  another origin (which the browser names in ``Origin``) gets 403 (no
  cross-site WebSocket hijacking; WebSockets are not covered by CORS).
* **Only GET.** Every other method gets 405: no form on another site can POST.
* **Headers.** A strict Content-Security-Policy (``default-src 'none'``; scripts,
  styles and the WebSocket from this origin only; no inline script; no frames),
  ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer``,
  ``Cache-Control: no-store``.
* **Bounds.** A WebSocket message is at most the daemon's request size; the
  daemon bounds the rest (one request in flight, queued events per page).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import secrets
import socket
import threading
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Final
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection, serve

from securechat.daemon import rpc, server
from securechat.errors import InUseError

HOST: Final = "127.0.0.1"  # never another interface
TOKEN_BYTES: Final = 32
MAX_PAGES: Final = 8  # WebSockets at once (tabs)
CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
ASSETS: Final = {  # URL path -> (file in static/, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/rpc.js": ("rpc.js", "text/javascript; charset=utf-8"),
    "/view.js": ("view.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
_STATIC: Final = "static"


def _asset(name: str) -> bytes:
    return resources.files("securechat.ui.web").joinpath(_STATIC).joinpath(name).read_bytes()


class WebServer:
    """See the module docstring. ``url`` is what the user opens (token included)."""

    def __init__(self, daemon_socket: Path, port: int = 0) -> None:
        self.token = secrets.token_urlsafe(TOKEN_BYTES)
        self._daemon_socket = daemon_socket
        self._pages = threading.BoundedSemaphore(MAX_PAGES)
        try:
            self._server: Server = serve(
                self._page,
                HOST,
                port,
                process_request=self._check,
                server_header=None,
                compression=None,
                max_size=rpc.MAX_REQUEST_BYTES,
            )
        except OSError as exc:
            raise InUseError(
                f"cannot listen on {HOST}:{port}: {exc.strerror or exc}",
                hint="choose another --port, or leave it out for a free one",
            ) from exc
        self.port = int(self._server.socket.getsockname()[1])
        self._hosts = {f"127.0.0.1:{self.port}", f"localhost:{self.port}"}
        self._origins = {f"http://{host}" for host in self._hosts}
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="securechat-web", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/#token={self.token}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(2.0)

    # --- HTTP: every request passes here first -----------------------------------------------

    def _check(self, conn: ServerConnection, request: Request) -> Response | None:
        # websockets before 15 refuses every method but GET itself; later versions pass
        # them on with ``method``: no form on another site can POST to us either way.
        if getattr(request, "method", "GET") != "GET":
            return _plain(HTTPStatus.METHOD_NOT_ALLOWED, "only GET")
        if request.headers.get("Host") not in self._hosts:
            return _plain(HTTPStatus.MISDIRECTED_REQUEST, "wrong Host: open the printed URL")
        target = urlsplit(request.path)
        if target.path == "/ws":
            if request.headers.get("Origin") not in self._origins:
                return _plain(HTTPStatus.FORBIDDEN, "wrong Origin")
            token = parse_qs(target.query).get("token", [""])[0]
            if not hmac.compare_digest(token.encode(), self.token.encode()):
                return _plain(HTTPStatus.FORBIDDEN, "missing or wrong token")
            return None  # on to the WebSocket handshake
        asset = ASSETS.get(target.path)
        if asset is None:
            return _plain(HTTPStatus.NOT_FOUND, "not found")
        name, content_type = asset
        return _response(HTTPStatus.OK, _asset(name), content_type)

    # --- the WebSocket: a guarded pipe to the daemon ----------------------------------------

    def _page(self, ws: ServerConnection) -> None:
        if not self._pages.acquire(blocking=False):
            ws.close(1013, "too many pages open")
            return
        try:
            with contextlib.closing(server.connect(self._daemon_socket)) as daemon:
                back = threading.Thread(
                    target=_daemon_to_page,
                    args=(daemon, ws),
                    name="securechat-web-out",
                    daemon=True,
                )
                back.start()
                _page_to_daemon(ws, daemon)
                with contextlib.suppress(OSError):
                    daemon.shutdown(socket.SHUT_RDWR)
                back.join(2.0)
        except OSError:
            ws.close(1011, "the daemon is not running")
        finally:
            self._pages.release()


def _page_to_daemon(ws: ServerConnection, daemon: socket.socket) -> None:
    """Each page message, re-encoded as one line (it cannot smuggle a second request)."""
    try:
        for message in ws:
            try:
                value = json.loads(message)
            except ValueError:
                value = None
            if not isinstance(value, dict):
                ws.send(json.dumps(rpc.error(None, rpc.RpcError(rpc.PARSE_ERROR, "not JSON"))))
                continue
            daemon.sendall(rpc.encode(value))
    except (ConnectionClosed, OSError):
        pass


def _daemon_to_page(daemon: socket.socket, ws: ServerConnection) -> None:
    try:
        with daemon.makefile("rb") as lines:
            for line in lines:
                ws.send(line.decode().rstrip("\n"))
    except (ConnectionClosed, OSError, ValueError):
        pass
    with contextlib.suppress(ConnectionClosed, OSError):
        ws.close(1001, "the daemon closed the connection")


def _headers(content_type: str) -> Headers:
    return Headers(
        [
            ("Content-Type", content_type),
            ("Content-Security-Policy", CSP),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
            ("X-Frame-Options", "DENY"),
            ("Cache-Control", "no-store"),
            ("Cross-Origin-Opener-Policy", "same-origin"),
            ("Cross-Origin-Resource-Policy", "same-origin"),
        ]
    )


def _response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = _headers(content_type)
    headers["Content-Length"] = str(len(body))
    return Response(status.value, status.phrase, headers, body)


def _plain(status: HTTPStatus, text: str) -> Response:
    return _response(status, (text + "\n").encode(), "text/plain; charset=utf-8")
