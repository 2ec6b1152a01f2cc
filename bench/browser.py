"""A real headless Chromium (Debian's `chromium`) driven by Playwright, for tests and benchmarks.

Playwright's own browser download is not available here, so it drives the
system's binary (`EDGEFLEET_CHROMIUM`, default /usr/bin/chromium), without any
of Chromium's background network traffic; every context is a fresh profile.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM = os.environ.get("EDGEFLEET_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--no-first-run",
        "--disable-component-update", "--disable-sync"]


def available() -> str | None:
    """Why a browser test cannot run here, or None when it can."""
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set EDGEFLEET_CHROMIUM)"
    return None


@contextmanager
def chromium() -> Iterator[Browser]:
    """The browser; each `new_context()` of it is a fresh profile of its own."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def sign_in(page: Page, hub_url: str, token: str) -> None:
    page.goto(f"{hub_url}/ui/fleet")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{hub_url}/ui/fleet")
