"""The web UI in a real browser: alice in headless Chromium, bob on the command line.

Uses Debian's Chromium (``/usr/bin/chromium``; ``.ci/run`` installs it) through
Playwright's Python package pointed at that executable (never ``playwright
install``: nothing is downloaded). Without the browser the tests are skipped, with
a reason; CI sets SECURECHAT_REQUIRE_BROWSER=1 so that a missing browser fails.
SECURECHAT_SCREENSHOT=PATH also saves the screenshot there (README's image).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_fixture import Web
from relay_fixture import RelayProcess, run_cli

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = [
    "--no-sandbox",  # Chromium refuses to run as root with its sandbox
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STEP = 15_000  # ms: the longest any one expectation may take on a busy machine


def _playwright() -> object:
    required = os.environ.get("SECURECHAT_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            pytest.fail("SECURECHAT_REQUIRE_BROWSER=1 but the playwright package is missing")
        pytest.skip("the playwright package is not installed (pip install -e '.[test]')")
    if not Path(CHROMIUM).exists():
        if required:
            pytest.fail(f"SECURECHAT_REQUIRE_BROWSER=1 but {CHROMIUM} is missing")
        pytest.skip("no Chromium: apt-get install chromium (CI does, see .ci/run)")
    return sync_playwright


@pytest.fixture
def page(tmp_path: Path) -> Iterator[object]:
    sync_playwright = _playwright()
    with sync_playwright() as p:  # type: ignore[operator]
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS, timeout=STEP)
        try:
            context = browser.new_context(viewport={"width": 1100, "height": 640})
            tab = context.new_page()
            tab.set_default_timeout(STEP)
            yield tab
        finally:
            browser.close()


@pytest.fixture
def web(home: Path, relay: RelayProcess) -> Iterator[Web]:
    w = Web.start(home, "alice", relay)
    yield w
    w.stop()


def _cli(home: Path, relay: RelayProcess | None, *args: str) -> str:
    more = ("--relay", relay.address) if relay is not None else ()
    res = run_cli(home, *args, *more, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _message(page: object, text: str) -> object:
    return page.locator("li.message", has=page.locator("p.text", has_text=text))  # type: ignore[attr-defined]


def test_missing_or_wrong_token_is_refused(page: object, web: Web) -> None:
    from playwright.sync_api import expect

    page.goto(web.base)  # type: ignore[attr-defined]
    expect(page.locator("#refused")).to_contain_text("needs the link")  # type: ignore[attr-defined]
    page.goto(web.base + "#token=" + "A" * len(web.token))  # type: ignore[attr-defined]
    page.reload()  # type: ignore[attr-defined]
    expect(page.locator("#refused")).to_contain_text("token in this link is missing or wrong")  # type: ignore[attr-defined]
    expect(page.locator("#message")).to_be_disabled()  # type: ignore[attr-defined]


def test_alice_in_the_page_and_bob_on_the_cli(
    page: object, web: Web, home: Path, relay: RelayProcess, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    p = page
    p.goto(web.url)  # type: ignore[attr-defined]
    expect(p.locator("body")).to_have_attribute("data-ready", "true")  # type: ignore[attr-defined]
    expect(p.locator("#account")).to_contain_text("alice")  # type: ignore[attr-defined]

    # alice starts a chat with bob from her known peers and writes (Enter sends).
    _cli(home, relay, "send", "--key", "alice", "--peer", "bob", "-m", "first, from the CLI")
    p.reload()  # type: ignore[attr-defined]
    expect(p.locator("body")).to_have_attribute("data-ready", "true")  # type: ignore[attr-defined]
    p.locator("#peers input[value=bob]").check()  # type: ignore[attr-defined]
    p.locator("#start").click()  # type: ignore[attr-defined]
    box = p.get_by_role("textbox", name="Message")  # type: ignore[attr-defined]
    box.fill("hello <b>bob</b> & \x1b[31mred")
    box.press("Enter")
    sent = _message(p, "hello <b>bob</b>")
    expect(sent).to_have_count(1)
    expect(sent.locator(".sender")).to_have_text("alice")
    expect(sent.locator("p.text")).to_have_text("hello <b>bob</b> & \x1b[31mred")
    expect(sent.locator("p.text b")).to_have_count(0)  # shown as text, never as markup
    expect(sent).to_have_attribute("data-status", re.compile("accepted|delivered"))
    # Shift+Enter is a line break in the same message.
    box.fill("line one")
    box.press("Shift+Enter")
    box.type("line two")
    box.press("Enter")
    expect(_message(p, "line two")).to_have_count(1)
    expect(box).to_have_value("")

    # bob reads them on the command line: the marks become "delivered to the device".
    received = _cli(home, relay, "receive", "--key", "bob", "--timeout", "2")
    assert "alice: hello <b>bob</b> & " in received
    assert "alice: line one\\nline two" in received
    expect(sent).to_have_attribute("data-status", "delivered")
    expect(sent.locator(".mark")).to_have_text("✓✓")

    # bob answers; carol writes too: her conversation counts one unread.
    _cli(home, relay, "send", "--key", "bob", "--peer", "alice", "-m", "hi alice, from the CLI")
    answer = _message(p, "hi alice, from the CLI")
    expect(answer.locator(".sender")).to_have_text("bob")
    expect(answer.locator(".meta time")).not_to_be_empty()
    _cli(home, relay, "send", "--key", "carol", "--peer", "alice", "-m", "carol here")
    carol = p.locator("#conversations button", has_text="carol")  # type: ignore[attr-defined]
    expect(carol.locator(".unread")).to_have_text("1")

    # The safety number is the one the CLI prints.
    p.locator("#safety").click()  # type: ignore[attr-defined]
    number = _cli(home, None, "safety-number", "--key", "alice", "--peer", "bob")
    expect(p.locator("#safety-panel")).to_contain_text(number.splitlines()[1].strip())  # type: ignore[attr-defined]

    # A group from known peers: tick two, start, write.
    p.locator("#peers input[value=bob]").check()  # type: ignore[attr-defined]
    p.locator("#peers input[value=carol]").check()  # type: ignore[attr-defined]
    p.locator("#start").click()  # type: ignore[attr-defined]
    expect(p.locator("#conv-title")).to_have_text("Group: bob, carol")  # type: ignore[attr-defined]
    box.fill("hello group")
    box.press("Enter")
    expect(_message(p, "hello group")).to_have_attribute(
        "data-status", re.compile("accepted|delivered")
    )
    group = p.locator("#conversations button", has_text="group: bob, carol")  # type: ignore[attr-defined]
    expect(group).to_have_count(1)
    assert "alice: hello group" in _cli(home, relay, "receive", "--key", "carol", "--timeout", "2")

    # A reload keeps the history (it comes back from the daemon's log).
    p.reload()  # type: ignore[attr-defined]
    expect(p.locator("body")).to_have_attribute("data-ready", "true")  # type: ignore[attr-defined]
    p.locator("#conversations button", has_text=re.compile(r"^bob$")).click()  # type: ignore[attr-defined]
    for text in ("first, from the CLI", "hello <b>bob</b>", "line two", "hi alice, from the CLI"):
        expect(_message(p, text)).to_have_count(1)
    expect(_message(p, "hello <b>bob</b>")).to_have_attribute("data-status", "delivered")

    # bob's key changes (a new identity, a new bob.pub): a banner says so, with the action.
    _cli(home, None, "keygen", "bob", "--force", "--no-passphrase")  # bob's old state moves aside
    _cli(home, relay, "send", "--key", "bob", "--peer", "alice", "-m", "new phone, new key")
    banner = p.locator(".banner", has_text="bob's key has changed")  # type: ignore[attr-defined]
    expect(banner).to_be_visible()
    shot = tmp_path / "web-ui.png"
    p.screenshot(path=str(shot))  # type: ignore[attr-defined]
    assert shot.stat().st_size > 10_000
    if os.environ.get("SECURECHAT_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["SECURECHAT_SCREENSHOT"])
    banner.get_by_role("button").click()
    expect(banner).to_have_count(0)
    box.fill("trusting your new key")
    box.press("Enter")
    expect(_message(p, "trusting your new key")).to_have_attribute(
        "data-status", re.compile("accepted|delivered")
    )
    assert "alice: trusting your new key" in _cli(
        home, relay, "receive", "--key", "bob", "--timeout", "2"
    )
