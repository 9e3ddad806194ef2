"""The validation report as one self-contained HTML page, written from the files of a report folder.

Great Expectations' data docs load Bootstrap, jQuery and fonts from public CDNs: offline (a
cluster without egress, a laptop on a train) they render unstyled and half empty. This page
carries its own styles, loads nothing and runs no script, and its Content-Security-Policy
forbids any request, so what it shows is all in the file: the verdict, rows per split, each
expectation with its threshold, and the quarantined rows, bounded in number.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from clipflow.artifacts import QUARANTINE_FILE, VALIDATION_REPORT, ValidationReport

DOCS_DIR = "data_docs"
NULL_SPLIT = "(null)"  # the per-split count of rows whose split is missing
QUARANTINE_SHOWN = 100  # rows of the quarantine table shown; all of them are in quarantine.parquet
QUARANTINE_COLUMNS = ("stage", "row", "key", "split", "source", "reason")

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:1.5em}
header{padding:1em 1.3em;border-radius:8px;color:#fff;margin-bottom:1.2em}
header.passed{background:#1f7a45}header.failed{background:#b3261e}
header h1{margin:0 0 .3em;font-size:1.6em}header p{margin:0}header code{background:rgba(255,255,255,.2)}
section{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:.8em 1.2em;margin-bottom:1.2em}
h2{font-size:1.2em;margin:.3em 0 .6em}h3{font-size:1em;margin:1em 0 .4em}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.93em}
th,td{padding:.35em .7em;text-align:left;border-bottom:1px solid #e6e8eb;vertical-align:top}
th{background:#f0f2f5;font-weight:600}
.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.wrap{overflow-wrap:anywhere;min-width:6em}
.ok{color:#1f7a45;font-weight:600}.bad{color:#b3261e;font-weight:600}
.note{color:#59636e}
code{background:#f0f2f5;padding:0 .25em;border-radius:3px;overflow-wrap:anywhere}
"""


def report_page(report_dir: str | Path, folder: str | None = None) -> str:
    """The HTML page of the report that `validate` wrote into `report_dir` (validation.json, quarantine.parquet).

    Args:
        report_dir: a validation report folder.
        folder: for a copy of the page read away from the folder (the Kubeflow UI's HTML view),
            the folder's location: its files are then named there instead of linked relatively.

    Returns:
        The page, one HTML document that requests nothing.
    """
    report_dir = Path(report_dir)
    report = ValidationReport.from_json((report_dir / VALIDATION_REPORT).read_text())
    quarantine = pd.read_parquet(report_dir / QUARANTINE_FILE)
    # One validation per fresh docs site: its result page, linked beside the site's index.
    pages = sorted((report_dir / DOCS_DIR / "validations").rglob("*.html"))
    files = [
        (QUARANTINE_FILE, "every quarantined row with its reason"),
        (VALIDATION_REPORT, "this report as JSON"),
        (f"{DOCS_DIR}/index.html", "Great Expectations' data docs (they load their styles from the internet)"),
        *[(page.relative_to(report_dir).as_posix(), "the data docs' page of this validation") for page in pages[:1]],
    ]
    status = "passed" if report.success else "failed"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>clipflow validation: {status}</title>
<style>{STYLE}</style>
</head>
<body>
<main>
<header class="{status}">
<h1>Validation {status}</h1>
<p>{report.quarantined} of {report.input_rows} input rows ({percent(report.bad_fraction)}) quarantined;
allowed: {percent(report.max_bad_fraction)} (<code>validate.max_bad_fraction</code>). Kept {report.kept} rows.</p>
</header>
{_rows_section(report)}
{_expectations_section(report)}
{_quarantine_section(report, quarantine)}
<section id="files">
<h2>Files</h2>
<ul>{"".join(_file_item(name, what, folder) for name, what in files)}</ul>
<p class="note">Checked in {report.seconds:.1f} s.</p>
</section>
</main>
</body>
</html>
"""


def percent(fraction: float) -> str:
    """A fraction as a percentage: two decimals, or two significant digits where those would show 0.00%."""
    value = fraction * 100
    return f"{value:.2f}%" if value == 0 or value >= 0.01 else f"{value:.2g}%"


def _rows_section(report: ValidationReport) -> str:
    splits = "".join(
        f"<tr><td>{_text(split)}</td><td class=n>{counts['rows']}</td><td class=n>{counts['kept']}</td>"
        f"<td class=n>{counts['quarantined']}</td></tr>"
        for split, counts in report.splits.items()
    )
    ingest = (
        f"<tr><td>rejected at ingest (no split)</td><td class=n>{report.quarantined_at_ingest}</td>"
        f"<td class=n>0</td><td class=n>{report.quarantined_at_ingest}</td></tr>"
    )
    total = (
        f"<tr><th>all input rows</th><th class=n>{report.input_rows}</th><th class=n>{report.kept}</th>"
        f"<th class=n>{report.quarantined}</th></tr>"
    )
    return f"""<section id="splits">
<h2>Rows per split</h2>
<p>Ingest's image and caption checks quarantined {report.quarantined_at_ingest} rows before they reached a split;
the expectations below quarantined {report.quarantined_by_suite} rows of the metadata table.</p>
<div class="scroll"><table>
<thead><tr><th>split</th><th class=n>rows</th><th class=n>kept</th><th class=n>quarantined</th></tr></thead>
<tbody>{splits}{ingest}</tbody><tfoot>{total}</tfoot>
</table></div>
</section>"""


def _expectations_section(report: ValidationReport) -> str:
    metadata_rows = report.input_rows - report.quarantined_at_ingest
    rows = "".join(
        f"<tr><td><code>{_text(e.column)}</code></td><td>{_text(e.expectation)}</td><td>{_text(e.threshold)}</td>"
        f"<td class={'ok' if e.success else 'bad'}>{'passed' if e.success else 'failed'}</td>"
        f"<td class=n>{e.unexpected_count}</td><td class=n>{percent(e.unexpected_count / metadata_rows)}</td></tr>"
        for e in report.expectations
    )
    return f"""<section id="expectations">
<h2>Expectations</h2>
<p>Great Expectations checked each column of the {metadata_rows} rows of the metadata table.</p>
<div class="scroll"><table>
<thead><tr><th>column</th><th>expectation</th><th>threshold</th><th>result</th><th class=n>rows failing</th>
<th class=n>share</th></tr></thead>
<tbody>{rows}</tbody>
</table></div>
</section>"""


def _quarantine_section(report: ValidationReport, quarantine: pd.DataFrame) -> str:
    if quarantine.empty:
        return '<section id="quarantine"><h2>Quarantined rows</h2><p>None: every input row was kept.</p></section>'
    reasons = "".join(
        f"<tr><td>{_text(reason)}</td><td class=n>{count}</td></tr>"
        for reason, count in report.quarantine_reasons.items()
    )
    # Round robin over reasons, then back in table order: a thousand rows of one reason must not hide the rare ones.
    turn = quarantine.groupby("reason", sort=False).cumcount()
    shown = quarantine.loc[turn.sort_values(kind="stable").index[:QUARANTINE_SHOWN]].sort_index()
    head = "".join(f"<th{' class=n' if column == 'row' else ''}>{column}</th>" for column in QUARANTINE_COLUMNS)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class={'n' if column == 'row' else 'wrap'}>{_text(record.get(column))}</td>"
            for column in QUARANTINE_COLUMNS
        )
        + "</tr>"
        for record in shown.to_dict("records")
    )
    hidden = len(quarantine) - len(shown)
    more = (
        f'<p class="note" id="not-shown">{hidden} more rows not shown: all {len(quarantine)} are in '
        f"<code>{QUARANTINE_FILE}</code>.</p>"
        if hidden
        else ""
    )
    return f"""<section id="quarantine">
<h2>Quarantined rows</h2>
<h3>Rows per reason</h3>
<div class="scroll"><table>
<thead><tr><th>reason</th><th class=n>rows</th></tr></thead><tbody>{reasons}</tbody>
</table></div>
<h3>{f"{len(shown)} of the {len(quarantine)} rows, each reason's first" if hidden else "All rows"}</h3>
<p class="note"><code>row</code> is the input row for stage <code>ingest</code>, the metadata table's row for stage
<code>validate</code>.</p>
<div class="scroll"><table>
<thead><tr>{head}</tr></thead><tbody>{body}</tbody>
</table></div>
{more}
</section>"""


def _file_item(name: str, what: str, folder: str | None) -> str:
    if folder is None:
        return f'<li><a href="{html.escape(name)}">{html.escape(name)}</a>: {what}</li>'
    return f"<li><code>{html.escape(folder.rstrip('/') + '/' + name)}</code>: {what}</li>"


def _text(value: object) -> str:
    """A cell's text, escaped: keys, sources and reasons come from the user's data."""
    return "" if value is None or (isinstance(value, float) and value != value) else html.escape(str(value))
