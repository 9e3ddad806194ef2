"""Debian's headless Chromium through playwright, as the browser tests launch it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")  # `make browser` installs it
# Chromium's background connections (updates, sync, QUIC probes) are refused here.
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def chromium() -> Iterator:
    """A launched playwright `Browser` on Debian's Chromium, closed afterwards."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), "Debian chromium is missing: run `make browser`"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            yield browser
        finally:
            browser.close()
