"""The pages the Bento serves to a browser, driven in a real headless Chromium (Debian's `chromium`).

The web page at `/` shows the served model, searches the gallery by text and by image and
classifies an uploaded image, at 1400 and at 400 px; every refusal of the server is shown as the
API answers it, and the API-key panel unfolds at a 401. What the page shows is checked against
the API's own answers. The API docs at `/docs` load with every request to another host blocked,
and the error schema they document is checked against real refusals. Screenshots are kept under
`test-artifacts/` (gitignored) for a person to look at.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import jsonschema
import pytest

from tests.support import REPO
from tests.support.browser import chromium
from tests.support.serving_fixtures import API_KEY, MAX_K, MAX_LABELS

ARTIFACTS = REPO / "test-artifacts"
LABELS = ["red circle", "blue square", "green star"]
QUERY = "a red circle"
K = 6
WIDE, NARROW = 1400, 400
TIMEOUT_MS = 120_000  # model calls on a busy two-core machine
# What Chromium logs by itself for every answer of 400 or more the page asked for.
REFUSED_LOAD = "Failed to load resource: the server responded with a status of 4"


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def uploads(packaged, tmp_path_factory) -> dict[str, Path]:
    """Files the page uploads: the first gallery image, bytes named .png that are no image, a text file."""
    from clipflow.data.shards import ShardIndex, split_shards

    folder = tmp_path_factory.mktemp("uploads")
    index = ShardIndex(split_shards(packaged["tmp"] / "data", "test"))
    files = {"image": folder / "shape.png", "broken": folder / "broken.png", "text": folder / "notes.txt"}
    files["image"].write_bytes(index.read(0, "png"))
    files["broken"].write_bytes(b"these bytes are not a PNG")
    files["text"].write_text("a red circle\n")
    return files


class Page:
    """A browser tab on the page, with the errors it logs and the API paths it calls."""

    def __init__(self, browser, url: str, width: int = WIDE) -> None:
        self.tab = browser.new_page(viewport={"width": width, "height": 1000})
        self.tab.set_default_timeout(TIMEOUT_MS)
        self.errors: list[str] = []
        self.calls: list[str] = []
        self.tab.on("pageerror", lambda error: self.errors.append(str(error)))
        self.tab.on("console", self._console)
        self.tab.on(
            "request", lambda request: request.method == "POST" and self.calls.append(urlsplit(request.url).path)
        )
        self.tab.goto(url)

    def _console(self, message) -> None:
        if message.type == "error" and not message.text.startswith(REFUSED_LOAD):
            self.errors.append(message.text)

    def text(self, selector: str) -> str:
        return self.tab.locator(selector).text_content()

    def header(self) -> dict[str, str]:
        self.tab.wait_for_function("() => !document.getElementById('info-model').textContent.includes('loading')")
        return {field: self.text(f"#info-{field}") for field in ("model", "version", "alias", "gallery")}

    def search(self, query: str = QUERY, k: str = str(K)) -> None:
        self.tab.get_by_label("Number of results").fill(k)
        self.tab.get_by_label("Describe an image").fill(query)
        self.tab.get_by_role("button", name="Search", exact=True).click()

    def search_by_image(self, image: Path, k: str = str(K)) -> None:
        self.tab.get_by_label("Number of results").fill(k)
        self.tab.get_by_label("Or find images like one of yours").set_input_files(str(image))
        self.tab.get_by_role("button", name="Search by image").click()

    def results(self, k: int = K) -> list[dict]:
        """The result cards, once all `k` thumbnails have loaded."""
        self.tab.wait_for_function(
            "k => [...document.querySelectorAll('#results img')].filter(i => i.complete && i.naturalWidth > 0)"
            ".length === k",
            arg=k,
        )
        return self.tab.eval_on_selector_all(
            "#results li.result",
            """items => items.map(item => ({
                caption: item.querySelector('.caption').textContent,
                alt: item.querySelector('img').alt,
                score: Number(item.querySelector('.score data').value),
                shown: item.querySelector('.score').textContent,
                caption_px: item.querySelector('.caption').getBoundingClientRect().width,
                score_lines: item.querySelector('.score').getBoundingClientRect().height
                    / parseFloat(getComputedStyle(item.querySelector('.score')).lineHeight),
            }))""",
        )

    def classify(self, image: Path, labels: list[str]) -> None:
        self.tab.get_by_label("Image", exact=True).set_input_files(str(image))
        self.tab.get_by_label("Labels, one per line").fill("\n".join(labels))
        self.tab.get_by_role("button", name="Classify").click()

    def classes(self) -> list[tuple[str, float, float]]:
        self.tab.wait_for_selector("#classes:not([hidden]) tr.class")
        rows = self.tab.eval_on_selector_all(
            "#classes tr.class", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
        )
        return [(label, float(percent.rstrip("%")), float(cosine)) for label, percent, cosine in rows]

    def refusal(self, status_id: str) -> str:
        """The error the page shows in its status line `status_id`."""
        return self.tab.locator(f"#{status_id}.error").text_content()

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.tab.screenshot(path=ARTIFACTS / name, full_page=True)
        assert (ARTIFACTS / name).stat().st_size > 10_000
        print(f"screenshot: {ARTIFACTS / name}")


def _post(url: str, path: str, headers: dict[str, str] | None = None, **request) -> httpx.Response:
    return httpx.post(f"{url}{path}", headers=headers or {}, timeout=120, **request)


def _classify_api(url: str, image: Path, labels: list[str], headers: dict[str, str] | None = None) -> httpx.Response:
    files = {"image": (image.name, image.read_bytes(), "image/png")}
    return _post(url, "/classify", headers, files=files, data={"labels": json.dumps(labels)})


def _refusal(response: httpx.Response, status: int) -> str:
    """The message of the API's refusal, which comes as one JSON object whatever the layer."""
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body, dict) and list(body) == ["error"], body
    return body["error"]


def _check_classes(page: Page, url: str, image: Path, headers: dict[str, str] | None = None) -> None:
    page.classify(image, LABELS)
    shown = page.classes()
    answer = _classify_api(url, image, LABELS, headers)
    assert answer.status_code == 200, answer.text
    expected = answer.json()
    assert [label for label, _, _ in shown] == [item["label"] for item in expected]
    assert [p for _, p, _ in shown] == pytest.approx([100 * item["probability"] for item in expected], abs=0.06)
    assert [c for _, _, c in shown] == pytest.approx([item["cosine"] for item in expected], abs=6e-4)
    assert math.isclose(sum(p for _, p, _ in shown), 100, abs_tol=0.2)
    assert page.text("#classify-status") == f"Most likely of these labels: {shown[0][0]}"
    assert "relative to the labels you typed" in page.text("#classes-note:not([hidden])")
    assert page.tab.locator("#preview").evaluate("img => img.naturalWidth") > 0


def _check_results(shown: list[dict], expected: list[dict]) -> None:
    assert [item["caption"] for item in shown] == [item["caption"] for item in expected]
    assert [item["score"] for item in shown] == pytest.approx([item["score"] for item in expected], abs=1e-6)
    for rank, item in enumerate(shown, start=1):
        assert item["alt"] == item["caption"]
        assert item["shown"] == f"#{rank} · cosine {item['score']:.3f}"
        # Readable cards: the caption has a column of its own, the score one line.
        assert item["caption_px"] >= 150, item
        assert item["score_lines"] < 1.5, item


def test_the_page_shows_the_model_searches_by_text_and_image_and_classifies(browser, server, packaged, uploads):
    page = Page(browser, server)
    assert page.tab.title() == "clipflow"
    info = _post(server, "/model_info", json={}).json()
    gallery = packaged["result"].gallery
    assert (info["version"], info["alias"], info["gallery_size"]) == (packaged["version"], "champion", gallery["size"])
    assert page.header() == {
        "model": f"{info['name']} ({info['architecture']}, {info['precision']})",
        "version": packaged["version"],
        "alias": "champion",
        "gallery": f"{gallery['size']} images (test split)",
    }
    assert page.tab.locator("#key-panel").evaluate("panel => panel.open") is False

    page.search()
    _check_results(page.results(), _post(server, "/search", json={"text": QUERY, "k": K}).json())
    assert page.text("#search-status") == f"{K} results for “{QUERY}”"

    image = uploads["image"]
    page.search_by_image(image)
    files = {"image": (image.name, image.read_bytes(), "image/png")}
    by_image = _post(server, "/search_image", files=files, data={"k": str(K)}).json()
    _check_results(page.results(), by_image)
    assert page.text("#search-status") == f"{K} results like “{image.name}”"
    assert page.results()[0]["caption"] == by_image[0]["caption"]

    _check_classes(page, server, image)
    page.screenshot("page.png")
    assert page.errors == []


def test_the_page_shows_each_refusal_of_the_server_as_the_api_answers_it(browser, server, uploads):
    page = Page(browser, server)
    page.header()
    image, broken = uploads["image"], uploads["broken"]
    too_many = [f"label {i}" for i in range(MAX_LABELS + 1)]
    cases = [
        ("a PNG that does not decode", broken, LABELS, 400),
        ("blank labels", image, ["", "  "], 400),
        ("too many labels", image, too_many, 400),
    ]
    for case, upload, labels, status in cases:
        page.classify(upload, labels)
        message = _refusal(_classify_api(server, upload, [label.strip() for label in labels if label.strip()]), status)
        assert page.refusal("classify-status") == f"{status}: {message}", case
    page.screenshot("page-refusal.png")

    # The page sends an empty box as null.
    for case, sent, status in [("an empty k", None, 422), ("k past serve.max_k", MAX_K + 1, 400)]:
        page.search(k="" if sent is None else str(sent))
        message = _refusal(_post(server, "/search", json={"text": QUERY, "k": sent}), status)
        assert page.refusal("search-status") == f"{status}: {message}", case

    page.search_by_image(broken)
    files = {"image": (broken.name, broken.read_bytes(), "image/png")}
    message = _refusal(_post(server, "/search_image", files=files, data={"k": str(K)}), 400)
    assert page.refusal("search-status") == f"400: {message}"

    # A file that is not an image at all is refused by the page itself, never uploaded.
    calls = len(page.calls)
    page.classify(uploads["text"], LABELS)
    assert (
        page.refusal("classify-status") == "“notes.txt” is not an image (text/plain): choose a PNG, JPEG or WebP file."
    )
    assert page.tab.locator("#preview").is_hidden()
    page.search_by_image(uploads["text"])
    assert page.refusal("search-status").startswith("“notes.txt” is not an image")
    assert page.calls[calls:] == []
    assert page.errors == []


def test_the_key_panel_unfolds_at_a_401_and_the_page_works_with_the_key(browser, keyed_server, packaged, uploads):
    page = Page(browser, keyed_server)
    message = _refusal(_post(keyed_server, "/model_info", json={}), 401)
    page.tab.wait_for_selector("#key-panel[open]")
    assert page.refusal("key-status") == f"The server answered 401: {message}"
    assert page.text("#info-model") == "enter the API key to see it"
    assert page.tab.locator("#preview").is_hidden()
    assert page.tab.evaluate("document.activeElement.id") == "key"
    page.screenshot("page-key-asked.png")

    page.tab.get_by_label("Key", exact=True).fill("not-the-key")
    page.tab.get_by_role("button", name="Use this key").click()
    wrong = _refusal(_post(keyed_server, "/model_info", {"X-API-Key": "not-the-key"}, json={}), 401)
    page.tab.wait_for_function("m => document.getElementById('key-status').textContent.endsWith(m)", arg=wrong)

    page.tab.get_by_label("Key", exact=True).fill(API_KEY)
    page.tab.get_by_role("button", name="Use this key").click()
    page.tab.wait_for_function(
        "v => document.getElementById('info-version').textContent === v", arg=packaged["version"]
    )
    assert page.header()["gallery"] == "none: search is unavailable"
    assert page.text("#key-status") == "The key is sent with each request."

    headers = {"X-API-Key": API_KEY}
    _check_classes(page, keyed_server, uploads["image"], headers)
    page.search()
    message = _refusal(_post(keyed_server, "/search", headers, json={"text": QUERY, "k": K}), 404)
    assert page.refusal("search-status") == f"404: {message}"
    page.screenshot("page-with-key.png")
    assert page.errors == []


def test_the_page_holds_at_400_px(browser, server, uploads):
    page = Page(browser, server, width=NARROW)
    page.header()
    page.search()
    _check_results(page.results(), _post(server, "/search", json={"text": QUERY, "k": K}).json())
    page.classify(uploads["image"], [*LABELS, "a label long enough to need more than one line at this width"])
    page.classes()
    layout = page.tab.evaluate(
        """() => ({
            width: window.innerWidth,
            scroll: document.documentElement.scrollWidth,
            outside: [...document.querySelectorAll('body *')].filter(e => {
                const box = e.getBoundingClientRect();
                return box.width > 0 && (box.left < 0 || box.right > window.innerWidth + 0.5);
            }).map(e => e.tagName + '#' + e.id + '.' + e.className),
            cards: [...document.querySelectorAll('#results li.result')].map(e => e.getBoundingClientRect().toJSON()),
        })"""
    )
    assert layout["width"] == NARROW
    assert layout["scroll"] <= layout["width"]
    assert layout["outside"] == []
    assert len(layout["cards"]) == K
    assert all(card["left"] >= 0 and card["right"] <= NARROW for card in layout["cards"])
    page.screenshot("page-400px.png")
    assert page.errors == []


def test_the_api_docs_load_nothing_from_other_hosts_and_document_the_real_errors(
    browser, server, keyed_server, uploads
):
    tab = browser.new_page(viewport={"width": WIDE, "height": 1000})
    tab.set_default_timeout(TIMEOUT_MS)
    elsewhere: list[str] = []
    console: list[str] = []

    def only_this_host(route) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    tab.route("**/*", only_this_host)
    tab.on("console", lambda message: message.type in ("error", "warning") and console.append(message.text))
    tab.goto(f"{server}/docs")
    tab.wait_for_selector(".swagger-ui .info .title")
    assert tab.title() == "clipflow API"
    assert tab.locator(".swagger-ui .info .title").text_content().startswith("clipflow API")
    assert "BentoML Team" not in tab.content()
    classify = tab.locator("#operations-Service_APIs-clipflow__classify")
    classify.locator(".opblock-summary").click()
    description = classify.locator(".opblock-description")
    description.wait_for()
    # Every paragraph of the docstring is text, not an indented code block.
    assert description.locator("p").count() >= 2 and description.locator("pre").count() == 0
    assert "is the cosine similarity between the image" in description.text_content()
    tab.wait_for_load_state("networkidle")
    ARTIFACTS.mkdir(exist_ok=True)
    tab.screenshot(path=ARTIFACTS / "docs.png", full_page=True)
    print(f"screenshot: {ARTIFACTS / 'docs.png'}")
    assert elsewhere == []
    assert console == []
    tab.close()

    spec = httpx.get(f"{server}/docs.json", timeout=60).json()
    error_schema = spec["components"]["schemas"]["Error"]
    broken = uploads["broken"]
    refusals = {
        400: _classify_api(server, broken, LABELS),
        404: _post(server, "/gallery_image", json={"id": "no-such-item"}),
        415: _post(server, "/search", content=b"a red circle", headers={"content-type": "text/plain"}),
        422: _post(server, "/classify", files={"image": (broken.name, broken.read_bytes(), "image/png")}),
        401: _post(keyed_server, "/classify", json={}),
    }
    for status, response in refusals.items():
        assert response.status_code == status, response.text
        documented = spec["paths"]["/classify" if status != 404 else "/gallery_image"]["post"]["responses"]
        assert documented[str(status)]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"
        }
        jsonschema.validate(response.json(), error_schema)
    # The documented examples are requests the server answers.
    for path in ("/search", "/encode_text", "/gallery_image"):
        properties = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
        example = {name: field["example"] for name, field in properties.items()}
        assert _post(server, path, json=example).status_code == 200, (path, example)
