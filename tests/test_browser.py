"""The live page in headless Chromium (Debian's `chromium`, driven by Playwright): it loads
the snapshot, follows the stream, shows a posted score's new rank, and reconnects by itself.

They are `system` tests (`make test-system`, which CI runs): without a Chromium they fail and
say what to install."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from shutil import which
from typing import Any, NoReturn

import httpx
import pytest
from live_support import running
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright
from support import cannot_run

pytestmark = [pytest.mark.browser, pytest.mark.system]

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# The system's Chromium (`.ci/run` installs Debian's). Nothing downloads one: a browser build
# from outside the package registries is not something `make test` may fetch.
CHROMIUM = next((path for name in BROWSERS if (path := which(name))), None)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 15_000


def no_browser(why: str) -> NoReturn:
    cannot_run("the browser tests", why)


def chromium(playwright: Playwright) -> str:
    """The Chromium to drive: the system's, else one Playwright already has (never fetched)."""
    if CHROMIUM is not None:
        return CHROMIUM
    own = Path(playwright.chromium.executable_path)
    if own.exists():
        return str(own)
    no_browser(
        f"no Chromium on this machine (looked for {', '.join(BROWSERS)} on PATH and for "
        f"Playwright's at {own}); install one, e.g. Debian's `apt-get install chromium`"
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium(playwright), args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(locale="en-US")
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    context.close()


def post(base: str, token: str, user_id: str, increase: int) -> None:
    r = httpx.post(
        base + "/api/v1/score",
        json={"user_id": user_id, "score_increase": increase},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 200, r.text


def test_the_page_shows_a_posted_score_and_its_new_rank(service, add_users, token, page) -> None:
    alice, bob, carol = add_users(count=3)
    post(service.base, token(bob), bob, 50)
    post(service.base, token(carol), carol, 30)

    page.goto(service.base + "/")
    board = page.locator("score-leaderboard")
    expect(board).to_have_attribute("data-state", "live")
    expect(page.locator(f'li[data-user="{bob}"] .rank')).to_have_text("1")
    expect(page.locator(f'li[data-user="{carol}"] .rank')).to_have_text("2")

    post(service.base, token(alice), alice, 1234)
    alice_row = page.locator(f'li[data-user="{alice}"]')
    expect(alice_row.locator(".rank")).to_have_text("1")
    expect(alice_row.locator(".score")).to_have_text("1,234")
    expect(page.locator("li").first).to_have_attribute("data-user", alice)
    expect(page.locator(f'li[data-user="{bob}"] .rank')).to_have_text("2")
    version = httpx.get(service.base + "/api/v1/leaderboard").json()["version"]
    expect(board).to_have_attribute("data-version", version)


def test_the_page_reconnects_by_itself(service, add_users, token, page) -> None:
    (player,) = add_users(count=1)
    page.goto(service.base + "/")
    board = page.locator("score-leaderboard")
    expect(board).to_have_attribute("data-state", "live")
    # the connection drops; a score lands meanwhile; the page comes back whole
    page.evaluate("document.querySelector('score-leaderboard').conn.close()")
    post(service.base, token(player), player, 77)
    expect(page.locator(f'li[data-user="{player}"] .score')).to_have_text("77")
    expect(board).to_have_attribute("data-state", "live")


def test_the_embeddable_view_takes_its_options_from_the_query(
    service, add_users, token, page
) -> None:
    players = add_users(count=4)
    for i, player in enumerate(players):
        post(service.base, token(player), player, 10 * (i + 1))

    response = page.goto(service.base + "/embed?limit=2&heading=Top%20two&theme=light")
    assert response is not None
    assert "frame-ancestors *" in response.headers["content-security-policy"]
    board = page.locator("score-leaderboard")
    expect(board.locator("h2")).to_have_text("Top two")
    expect(page.locator("li")).to_have_count(2)
    expect(page.locator("li").first).to_have_attribute("data-user", players[3])
    expect(board).to_have_attribute("theme", "light")


GAME_PAGE = b"<!doctype html><title>a game on another origin</title>"
# What a browser game does: post the player's score with its bearer token, read the reply.
POST_SCORE = """async ([url, token, userId]) => {
  try {
    const response = await fetch(url, {
      method: "POST",
      headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json"},
      body: JSON.stringify({user_id: userId, score_increase: 5}),
    });
    return {status: response.status, body: await response.json(),
            rateLimit: response.headers.get("RateLimit")};
  } catch (error) {
    return {error: String(error)};
  }
}"""


@contextlib.contextmanager
def game_origin() -> Iterator[str]:
    """A page served from another origin than the service's: http://127.0.0.1:<its port>."""

    class Game(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(GAME_PAGE)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Game)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_game_on_an_allowed_origin_posts_scores_and_another_cannot(
    env, add_users, token, page, tmp_path
) -> None:
    (player,) = add_users(count=1)
    with game_origin() as allowed, game_origin() as other:
        cors = {**env, "SCORE_CORS_ORIGINS": allowed}
        with running(cors, tmp_path / "serve.log") as service:
            # the service by name, the game by address: two origins for the browser
            url = service.base.replace("127.0.0.1", "localhost") + "/api/v1/score"
            page.goto(allowed + "/")
            posted = page.evaluate(POST_SCORE, [url, token(player), player])
            assert posted["status"] == 200, posted
            assert posted["body"]["new_score"] == 5
            assert posted["rateLimit"]  # an exposed header

            page.goto(other + "/")
            refused = page.evaluate(POST_SCORE, [url, token(player), player])
            assert "error" in refused, refused  # the browser hides the answer (a TypeError)
            # the preflight was refused: nothing was posted
            board = httpx.get(service.base + f"/api/v1/users/{player}").json()
            assert board["score"] == 5
