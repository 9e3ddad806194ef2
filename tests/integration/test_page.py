"""The web page the Bento serves at `/`, driven in a real headless Chromium (Debian's `chromium`).

The page searches the gallery and classifies an uploaded image, with the API key on and off;
what it shows is checked against the API's own answers. Screenshots are kept under
`test-artifacts/` (gitignored) for a person to look at.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

from tests.support import REPO
from tests.support.serving_fixtures import API_KEY, serve_bento

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
ARTIFACTS = REPO / "test-artifacts"
LABELS = ["red circle", "blue square", "green star"]
QUERY = "a red circle"
K = 6
TIMEOUT_MS = 120_000  # model calls on a busy two-core machine


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), "Debian chromium is missing: run `make browser`"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def open_server(packaged):
    with serve_bento(packaged["result"].bento_tag, packaged["tmp"]) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_gallery_server(packaged):
    with serve_bento(packaged["result"].bento_tag, packaged["tmp"], CLIPFLOW_API_KEY=API_KEY) as url:
        yield url


@pytest.fixture(scope="module")
def image_file(packaged) -> Path:
    """The first gallery image, as a file the page uploads."""
    from clipflow.data.shards import ShardIndex, split_shards

    index = ShardIndex(split_shards(packaged["tmp"] / "data", "test"))
    path = packaged["tmp"] / "page-upload.png"
    path.write_bytes(index.read(0, "png"))
    return path


def _page(browser, url: str):
    page = browser.new_page(viewport={"width": 1100, "height": 1400})
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.goto(url)
    return page, errors


def _search(page) -> list[dict]:
    page.get_by_label("Describe an image").fill(QUERY)
    page.get_by_label("Number of results").fill(str(K))
    page.get_by_role("button", name="Search").click()
    page.wait_for_function(
        "k => [...document.querySelectorAll('#results img')].filter(i => i.complete && i.naturalWidth > 0).length"
        " === k",
        arg=K,
    )
    return page.eval_on_selector_all(
        "#results li.result",
        """items => items.map(item => ({
            caption: item.querySelector('img').alt,
            text: item.querySelector('figcaption').textContent,
            score: Number(item.querySelector('.score').textContent),
            width: item.querySelector('img').naturalWidth,
        }))""",
    )


def _classify(page, image: Path) -> list[tuple[str, float]]:
    page.get_by_label("Image", exact=True).set_input_files(str(image))
    page.get_by_label("Labels, one per line").fill("\n".join(LABELS))
    page.get_by_role("button", name="Classify").click()
    page.wait_for_selector("#classes:not([hidden]) tr.class")
    rows = page.eval_on_selector_all(
        "#classes tr.class", "rows => rows.map(r => [r.cells[0].textContent, r.cells[1].textContent])"
    )
    return [(label, float(percent.rstrip("%"))) for label, percent in rows]


def _check(page, errors, url: str, headers: dict[str, str], image: Path, screenshot: str) -> None:
    shown = _search(page)
    expected = httpx.post(f"{url}/search", json={"text": QUERY, "k": K}, headers=headers, timeout=120).json()
    assert [item["caption"] for item in shown] == [item["caption"] for item in expected]
    assert [item["score"] for item in shown] == pytest.approx([item["score"] for item in expected], abs=1e-3)
    assert all(item["caption"] in item["text"] and item["width"] > 0 for item in shown)
    assert page.get_by_role("status").first.text_content() == f"{K} results for “{QUERY}”"

    classes = _classify(page, image)
    files = {"image": (image.name, image.read_bytes(), "image/png")}
    answer = httpx.post(
        f"{url}/classify", files=files, data={"labels": json.dumps(LABELS)}, headers=headers, timeout=120
    )
    assert answer.status_code == 200, answer.text
    assert [label for label, _ in classes] == [item["label"] for item in answer.json()]
    assert [p for _, p in classes] == pytest.approx([100 * item["probability"] for item in answer.json()], abs=0.06)
    assert math.isclose(sum(p for _, p in classes), 100, abs_tol=0.2)
    assert page.locator("#classify-status").text_content() == f"Most likely: {classes[0][0]}"
    assert page.locator("#preview").evaluate("img => img.naturalWidth") > 0

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / screenshot, full_page=True)
    assert (ARTIFACTS / screenshot).stat().st_size > 10_000
    assert errors == []


def test_page_searches_and_classifies_without_a_key(browser, open_server, image_file):
    page, errors = _page(browser, open_server)
    assert page.title() == "clipflow"
    _check(page, errors, open_server, {}, image_file, "page.png")


def test_page_asks_for_the_key_then_works_with_it(browser, keyed_gallery_server, image_file):
    page, errors = _page(browser, keyed_gallery_server)
    page.get_by_label("Describe an image").fill(QUERY)
    page.get_by_role("button", name="Search").click()
    status = page.locator("#search-status.error")
    status.wait_for()
    assert status.text_content().startswith("401: API key required")
    assert "enter the API key above" in status.text_content()
    errors.clear()  # the browser logs the refused request itself

    page.get_by_label("Key (leave empty when the server needs none)").fill(API_KEY)
    _check(page, errors, keyed_gallery_server, {"X-API-Key": API_KEY}, image_file, "page-with-key.png")
