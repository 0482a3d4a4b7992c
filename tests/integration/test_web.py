"""securechat web's guards, without a browser: token, Host, Origin, methods, headers."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from daemon_fixture import Web
from relay_fixture import RelayProcess


@pytest.fixture
def web(home: Path, relay: RelayProcess) -> Iterator[Web]:
    w = Web.start(home, "alice", relay)
    yield w
    assert w.stop() == 0


def _get(web: Web, path: str, host: str | None = None, method: str = "GET") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True)
        conn.putheader("Host", host or f"127.0.0.1:{web.port}")
        conn.endheaders()
        response = conn.getresponse()
        response.read()
        return response.status, dict(response.getheaders())
    except (http.client.HTTPException, ConnectionError):
        return 0, {}
    finally:
        conn.close()


def _ws(web: Web, token: str | None, origin: str | None = "default") -> object:
    query = "" if token is None else f"?token={token}"
    origin_value = f"http://127.0.0.1:{web.port}" if origin == "default" else origin
    return connect(f"ws://127.0.0.1:{web.port}/ws{query}", origin=origin_value, open_timeout=10)  # type: ignore[arg-type]


def test_the_url_is_loopback_with_a_long_token(web: Web) -> None:
    assert web.url.startswith("http://127.0.0.1:") and "/#token=" in web.url
    assert len(web.token) >= 43  # 32 random bytes, base64url


def test_assets_have_a_strict_policy_and_no_inline_script(web: Web) -> None:
    status, headers = _get(web, "/")
    assert status == 200
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["Cache-Control"] == "no-store"
    for asset in ("/app.js", "/rpc.js", "/view.js", "/style.css"):
        assert _get(web, asset)[0] == 200
    assert _get(web, "/../pyproject.toml")[0] == 404
    assert _get(web, "/nope")[0] == 404
    from importlib import resources

    page = resources.files("securechat.ui.web").joinpath("static").joinpath("index.html")
    html = page.read_text()
    assert "<script>" not in html and "http" not in html.replace("http-equiv", "")
    scripts = "".join(
        resources.files("securechat.ui.web").joinpath("static").joinpath(n).read_text()
        for n in ("app.js", "view.js", "rpc.js")
    )
    assert ".innerHTML" not in scripts and "eval(" not in scripts


def test_dns_rebinding_is_refused_by_host(web: Web) -> None:
    assert _get(web, "/", host="evil.example")[0] == 421
    assert _get(web, "/", host=f"evil.example:{web.port}")[0] == 421
    assert _get(web, "/", host=f"localhost:{web.port}")[0] == 200


def test_only_get(web: Web) -> None:
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        assert _get(web, "/", method=method)[0] == 405
        assert _get(web, f"/ws?token={web.token}", method=method)[0] == 405


def test_the_websocket_needs_the_token_and_this_origin(web: Web) -> None:
    for token, origin in (
        (None, "default"),
        ("", "default"),
        ("x" * len(web.token), "default"),
        (web.token[:-1], "default"),
        (web.token, "http://evil.example"),
        (web.token, f"http://127.0.0.1:{web.port + 1}"),
        (web.token, None),
    ):
        with pytest.raises(InvalidStatus) as info:
            _ws(web, token, origin)
        assert info.value.response.status_code == 403, (token, origin)


def test_with_the_token_the_websocket_speaks_to_the_daemon(web: Web) -> None:
    with _ws(web, web.token) as ws:  # type: ignore[attr-defined]
        ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "version"}))
        reply = json.loads(ws.recv(timeout=10))
        assert reply["result"]["account"] == "alice"
        # Two requests smuggled in one message with a newline: re-encoded as one line,
        # so only the first object counts (the rest is not JSON: refused).
        ws.send('{"jsonrpc": "2.0", "id": 2, "method": "version"}\n{"jsonrpc": "2.0", "id": 3}')
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == -32700
        ws.send(json.dumps({"jsonrpc": "2.0", "id": 4, "method": "peers"}))
        assert "peers" in json.loads(ws.recv(timeout=10))["result"]
