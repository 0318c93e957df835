"""Headless Chromium for the dashboard tests: Debian's ``/usr/bin/chromium`` (installed by
``scripts/setup``) driven by Playwright for Python -- never ``playwright install``.  A missing
browser fails the test: a skip would hide a set-up bug."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@contextmanager
def chromium(extra_args: Sequence[str] = ()) -> Iterator:
    """A launched headless browser, closed on exit."""
    import playwright.sync_api as sync_api

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + list(extra_args))
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def watched_page(browser, width: int = 1400, height: int = 1000) -> Iterator[tuple]:
    """A page in a fresh context, with the script errors (uncaught exceptions and console
    errors) and the URLs it requested collected as it runs: ``(page, errors, requests)``."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    errors: list[str] = []
    requests: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("request", lambda req: requests.append(req.url))
    try:
        yield page, errors, requests
    finally:
        context.close()
