"""The validation report page in a real headless Chromium with the network cut off.

Every request to anything but the report's own files is recorded and refused, as on a machine
without internet access. The page must ask for nothing and still show the verdict, the counts per
split, each expectation with its threshold, and the quarantined rows (bounded, with a count of
the rest). Great Expectations' own data docs, loaded the same way, show that the blocking works:
they ask the CDNs for their styles. Screenshots go to `test-artifacts/` (gitignored).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pandas as pd
import pytest

from clipflow.data.ingest import ingest
from clipflow.params import Params
from clipflow.validate.page import QUARANTINE_SHOWN, report_page
from clipflow.validate.suite import validate
from tests.support import REPO, bad_inputs
from tests.support.browser import chromium

ARTIFACTS = REPO / "test-artifacts"
TALL = 110  # metadata rows given an impossible height: with ingest's rejects, more rows than the page shows
GOOD = 150


@pytest.fixture(scope="module")
def report(tmp_path_factory, small_params: Params):
    """A report of real rejects: bad images and a caption caught at ingest, then rows broken in the metadata."""
    tmp = tmp_path_factory.mktemp("validation-page")
    images = {f"good-{i}.png": bad_inputs.rgb_png((i, 90, 200 - i), size=(40 + i % 7, 40)) for i in range(GOOD)}
    images |= {
        "noise.jpg": bad_inputs.random_bytes(),
        "cut.jpg": bad_inputs.truncated_jpeg(),
        "blank.png": images["good-0.png"],
    }
    for name, payload in images.items():
        (tmp / name).write_bytes(payload)
    rows = [{"image": f"good-{i}.png", "caption": f"a good picture, number {i}"} for i in range(GOOD)]
    rows += [{"image": "noise.jpg", "caption": "noise"}, {"image": "cut.jpg", "caption": "cut off"}]
    rows += [{"image": "blank.png", "caption": "   "}]
    pd.DataFrame(rows).to_csv(tmp / "manifest.csv", index=False)
    data = dataclasses.replace(small_params.data, workers=0)
    summary = ingest(str(tmp / "manifest.csv"), tmp / "data", data, small_params.validate)
    assert summary.quarantined == 3
    metadata = pd.read_parquet(tmp / "data" / "metadata.parquet")
    metadata.loc[: TALL - 1, "height"] = 10_000
    metadata.loc[TALL + 1, "key"] = metadata.loc[TALL, "key"]
    metadata.to_parquet(tmp / "data" / "metadata.parquet", index=False)
    result = validate(tmp / "data", tmp / "report", small_params.validate)
    return tmp / "report", result


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def _open_offline(browser, path: Path):
    """The page at `path`, and the list every request for something other than a local file lands in, refused."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    external: list[str] = []

    def refuse(route) -> None:
        external.append(route.request.url)
        route.abort("internetdisconnected")

    context.route(re.compile(r"^(?!file:).*"), refuse)
    page = context.new_page()
    page.on("request", lambda request: request.url.startswith("file:") or external.append(request.url))
    page.goto(path.as_uri(), wait_until="load")
    page.wait_for_load_state("networkidle")
    return page, external


def test_report_page_asks_for_nothing_and_shows_counts_thresholds_and_quarantine(browser, report):
    folder, result = report
    page, external = _open_offline(browser, folder / "index.html")
    assert external == []
    assert page.get_by_role("heading", name="Validation failed").is_visible()
    # Styles are in the page: the verdict sits on a red band, not as bare black text.
    assert page.locator("header").evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(179, 38, 30)"

    splits = page.locator("#splits")
    for split, counts in result.splits.items():
        row = splits.get_by_role("row").filter(has=page.get_by_role("cell", name=split, exact=True))
        assert row.is_visible(), split
        assert [cell.strip() for cell in row.locator("td").all_inner_texts()] == [
            split,
            str(counts["rows"]),
            str(counts["kept"]),
            str(counts["quarantined"]),
        ]
    assert result.splits["train"]["quarantined"] + result.splits["test"]["quarantined"] == TALL + 2
    assert "all input rows" in splits.get_by_role("row").last.inner_text()

    for expectation in result.expectations:
        row = (
            page.locator("#expectations tbody tr")
            .filter(has_text=expectation.expectation)
            .filter(has=page.locator("code", has_text=re.compile(f"^{expectation.column}$")))
        )
        assert row.count() == 1 and row.is_visible(), expectation
        assert expectation.threshold in row.inner_text()
        assert ("passed" if expectation.success else "failed") in row.inner_text()
    assert page.get_by_text("16 to 4096 px (validate.min_side, validate.max_side)").first.is_visible()

    rows = page.locator("#quarantine tbody tr").filter(has=page.locator("td.wrap"))
    assert rows.count() == QUARANTINE_SHOWN
    shown = set(rows.all_inner_texts())
    for reason in ("not an image", "image data does not decode", "caption is empty", "key not unique"):
        assert any(reason in text for text in shown), reason  # the few rare rows are not hidden behind 110
    hidden = result.quarantined - QUARANTINE_SHOWN
    note = page.locator("#not-shown")
    assert (
        note.is_visible()
        and note.inner_text() == f"{hidden} more rows not shown: all {result.quarantined} are in quarantine.parquet."
    )
    for link in page.locator("#files a").all():
        assert (folder / link.get_attribute("href")).is_file()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "validation-report.png", full_page=True)
    page.context.close()


def test_kubeflow_copy_names_the_folder_instead_of_linking_and_data_docs_need_the_network(browser, report, tmp_path):
    folder, _ = report
    copy = tmp_path / "kfp-report.html"  # the KFP UI shows the HTML artifact alone, away from its folder
    copy.write_text(report_page(folder, folder="minio://mlpipeline/v2/artifacts/run/validation"))
    page, external = _open_offline(browser, copy)
    assert external == []
    assert page.locator("a[href]").count() == 0
    assert page.get_by_text("minio://mlpipeline/v2/artifacts/run/validation/quarantine.parquet").is_visible()
    page.context.close()

    # What the page replaces: the data docs ask public CDNs for their styles and scripts.
    docs, external = _open_offline(browser, folder / "data_docs" / "index.html")
    assert any("bootstrap" in url for url in external), external
    docs.context.close()
