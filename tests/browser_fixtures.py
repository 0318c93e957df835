"""For the dashboard tests and benchmark: the app on a real uvicorn server (:class:`Served`) and
headless Chromium -- Debian's ``/usr/bin/chromium`` (installed by ``scripts/setup``) driven by
Playwright for Python, never ``playwright install``.  A missing browser fails the test: a skip
would hide a set-up bug."""

from __future__ import annotations

import threading
import time
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


class Served:
    """An app on a real uvicorn server on a free loopback port, in a thread."""

    def __init__(self, app, host: str = "127.0.0.1"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("dashboard server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
