"""The validate step: a Great Expectations suite over an ingested metadata table.

Output layout (a report directory):

    index.html           the report page, self-contained (no network): counts per split, each expectation
                         with its threshold, the quarantined rows; open this one
    data_docs/           the Great Expectations data docs site for this run (its styles load from CDNs)
    validation.json      the report that `validate` returns (`ValidationReport`), with per-expectation results
    quarantine.parquet   one row per rejected input row: stage, row, key, split, source, reason

Rows rejected by ingest's per-row checks (the data directory's own `quarantine.parquet`: the
image did not fetch or decode, a bad caption, a duplicate) come first, with stage `ingest` and
their input row; rows of the metadata table that break an expectation follow, with stage
`validate` and their metadata row. Input rows = kept rows + quarantined rows.

`validate` always writes the whole report and returns it; `check_passed` turns a report over
the `validate.max_bad_fraction` threshold into a one-line `ClipflowError`.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from clipflow.artifacts import METADATA_FILE, QUARANTINE_FILE, ExpectationResult, ValidationReport
from clipflow.errors import ClipflowError
from clipflow.params import ValidateParams
from clipflow.validate.page import DOCS_DIR, NULL_SPLIT, percent, report_page
from clipflow.validate.rows import reason_counts

INDEX_FILE = "index.html"
SUITE_NAME = "clipflow-metadata"
REQUIRED_COLUMNS = ("key", "split", "caption", "sha256", "width", "height")
# The metadata row's position, added to the frame GX sees: `key` alone cannot tell apart
# the rows of a duplicated or null key, and those are exactly the rows being reported.
ROW = "row"


@dataclass(frozen=True)
class Check:
    """One expectation, what it allows in words, and the words a row failing it gets in the quarantine table."""

    expectation: str
    column: str
    kwargs: dict[str, Any]
    reason: str
    threshold: str


def checks(params: ValidateParams) -> list[Check]:
    """The expectations every metadata table must meet, built from the `validate` params."""
    caption = [params.caption_min_chars, params.caption_max_chars]
    side = [params.min_side, params.max_side]
    between = {"min_value": params.min_side, "max_value": params.max_side}
    sides = f"{params.min_side} to {params.max_side} px (validate.min_side, validate.max_side)"
    # GX's value checks skip nulls (a null split is "in the set"), so each column needs its own.
    not_null = [
        Check("ExpectColumnValuesToNotBeNull", column, {}, f"{column} is null", "no nulls")
        for column in REQUIRED_COLUMNS
    ]
    return [
        *not_null,
        Check("ExpectColumnValuesToBeUnique", "key", {}, "key not unique", "every value unique"),
        Check(
            "ExpectColumnValuesToBeInSet",
            "split",
            {"value_set": params.splits},
            f"split not in {params.splits}",
            f"one of {', '.join(params.splits)} (validate.splits)",
        ),
        Check(
            "ExpectColumnValueLengthsToBeBetween",
            "caption",
            {"min_value": params.caption_min_chars, "max_value": params.caption_max_chars},
            f"caption length outside {caption}",
            f"{caption[0]} to {caption[1]} characters (validate.caption_min_chars, validate.caption_max_chars)",
        ),
        Check("ExpectColumnValuesToBeUnique", "sha256", {}, "sha256 not unique", "every value unique"),
        Check("ExpectColumnValuesToBeBetween", "width", between, f"width outside {side}", sides),
        Check("ExpectColumnValuesToBeBetween", "height", between, f"height outside {side}", sides),
    ]


def validate(data_dir: str | Path, report_dir: str | Path, params: ValidateParams) -> ValidationReport:
    """Validate an ingested data directory's metadata table and write the report.

    Args:
        data_dir: a directory written by the ingest step (it holds `metadata.parquet`).
        report_dir: where the report goes; created if missing. Only `data_docs/` inside it
            is replaced, so pointing it at a shared folder does not delete anything else.
        params: the `validate` section of params.yaml.

    Returns:
        The report, also written to `validation.json`; `success` is
        `bad_fraction <= max_bad_fraction`.

    Raises:
        ClipflowError: not an ingested data directory, a table without the needed columns
            or rows, inconsistent params, or an expectation that could not be evaluated.
    """
    started = time.perf_counter()
    params.check()  # at params load too; params built in code reach here unchecked
    rejected_at_ingest = _read_ingest_quarantine(Path(data_dir))
    metadata = _read_metadata(Path(data_dir), len(rejected_at_ingest))
    report_dir = Path(report_dir)
    suite = checks(params)
    docs_dir = report_dir / DOCS_DIR
    if docs_dir.exists():
        # A fresh site per run: GX's index would otherwise list every earlier run as well.
        shutil.rmtree(docs_dir)
    docs_dir.mkdir(parents=True)

    results = _run_suite(metadata, suite, docs_dir)
    reasons: dict[int, list[str]] = {}
    expectations = []
    for check, result in zip(suite, results, strict=True):
        error = _exception_message(result.exception_info)
        if error is not None:
            raise ClipflowError(f"cannot check {check.reason!r} on {METADATA_FILE}: {error}")
        failed = result.result.get("unexpected_index_list") or []
        for row in failed:
            reasons.setdefault(int(row[ROW]), []).append(check.reason)
        expectations.append(
            ExpectationResult(
                expectation=result.expectation_config.type,
                column=check.column,
                reason=check.reason,
                threshold=check.threshold,
                success=bool(result.success),
                unexpected_count=int(result.result.get("unexpected_count", len(failed))),
            )
        )

    bad_rows = sorted(reasons)
    broke_suite = pd.DataFrame(
        {
            "stage": "validate",
            ROW: pd.Series(bad_rows, dtype="int64"),
            "key": metadata["key"].iloc[bad_rows].to_numpy(),
            "split": metadata["split"].iloc[bad_rows].to_numpy(),
            "source": _column_or_none(metadata, "source", bad_rows),
            "reason": ["; ".join(reasons[row]) for row in bad_rows],
        }
    )
    quarantine = pd.concat([rejected_at_ingest, broke_suite], ignore_index=True)
    quarantine.astype({ROW: "int64"}).to_parquet(report_dir / QUARANTINE_FILE, index=False)

    input_rows = len(metadata) + len(rejected_at_ingest)
    bad_fraction = len(quarantine) / input_rows
    report = ValidationReport(
        success=bad_fraction <= params.max_bad_fraction,
        input_rows=input_rows,
        kept=len(metadata) - len(bad_rows),
        quarantined=len(quarantine),
        quarantined_at_ingest=len(rejected_at_ingest),
        quarantined_by_suite=len(bad_rows),
        quarantine_reasons=reason_counts(quarantine["reason"]),
        splits=_split_counts(metadata["split"], broke_suite["split"], params.splits),
        bad_fraction=bad_fraction,
        max_bad_fraction=params.max_bad_fraction,
        expectations=tuple(expectations),
        report=str(report_dir / INDEX_FILE),
        seconds=round(time.perf_counter() - started, 2),
    )
    report.write(report_dir)
    (report_dir / INDEX_FILE).write_text(report_page(report_dir))
    return report


def check_passed(result: ValidationReport, params: ValidateParams) -> None:
    """Raise a one-line `ClipflowError` when a `validate` result breaks `max_bad_fraction`.

    Raises:
        ClipflowError: more rows were quarantined than `params.max_bad_fraction` allows.
    """
    if result.bad_fraction <= params.max_bad_fraction:
        return
    raise ClipflowError(
        f"validation failed: {result.quarantined} of {result.input_rows} input rows ({percent(result.bad_fraction)}) "
        f"quarantined ({result.quarantined_at_ingest} at ingest, {result.quarantined_by_suite} by expectations), "
        f"above validate.max_bad_fraction={params.max_bad_fraction}; see {result.report}"
    )


def _read_ingest_quarantine(data_dir: Path) -> pd.DataFrame:
    """Rows ingest rejected, in this report's quarantine columns; none for a source without them."""
    columns = ["stage", ROW, "key", "split", "source", "reason"]
    path = data_dir / QUARANTINE_FILE
    if not path.is_file():
        return pd.DataFrame(columns=columns)
    try:
        rejected = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise ClipflowError(f"cannot read {path}: {exc}") from None
    return rejected.assign(stage="ingest", split=None).reindex(columns=columns)


def _split_counts(splits: pd.Series, quarantined: pd.Series, expected: list[str]) -> dict[str, dict[str, int]]:
    """Rows, kept and quarantined rows per split of the metadata: the expected splits first, then any others."""
    # A null split is a row too, quarantined for it, and must be counted somewhere.
    rows = splits.fillna(NULL_SPLIT).value_counts()
    bad = quarantined.fillna(NULL_SPLIT).value_counts()
    names = [*expected, *sorted(set(rows.index) - set(expected))]
    return {
        name: {
            "rows": int(rows.get(name, 0)),
            "kept": int(rows.get(name, 0) - bad.get(name, 0)),
            "quarantined": int(bad.get(name, 0)),
        }
        for name in names
    }


def _column_or_none(frame: pd.DataFrame, column: str, rows: list[int]) -> list:
    return frame[column].iloc[rows].tolist() if column in frame.columns else [None] * len(rows)


def _read_metadata(data_dir: Path, rejected_at_ingest: int) -> pd.DataFrame:
    path = data_dir / METADATA_FILE
    if not path.is_file():
        raise ClipflowError(f"not an ingested data directory (no {METADATA_FILE}): {data_dir}")
    try:
        metadata = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise ClipflowError(f"cannot read {path}: {exc}") from None
    missing = [column for column in REQUIRED_COLUMNS if column not in metadata.columns]
    if missing:
        raise ClipflowError(f"{path} lacks columns {missing}")
    # GX misjudges columns of the wrong type instead of failing them: a range check on text
    # compares "64" with 16 when every value parses, and lists all count as unique.
    for column in ("key", "split", "caption", "sha256"):
        if not pd.api.types.is_string_dtype(metadata[column]):
            raise ClipflowError(f"{path}: column {column} must hold text, not {metadata[column].dtype}")
    for column in ("width", "height"):
        dtype = metadata[column].dtype
        if not pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype):
            raise ClipflowError(f"{path}: column {column} must hold numbers, not {dtype}")
    if metadata.empty and rejected_at_ingest:
        raise ClipflowError(
            f"validation failed: all {rejected_at_ingest} input rows were quarantined at ingest; "
            f"see {data_dir / QUARANTINE_FILE}"
        )
    if metadata.empty:
        raise ClipflowError(f"{path} has no rows to validate")
    return metadata.reset_index(drop=True)


def _run_suite(metadata: pd.DataFrame, suite: list[Check], docs_dir: Path) -> list[Any]:
    """Run the suite through a checkpoint that builds the data docs; return results in suite order."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    site = "clipflow"
    context.add_data_docs_site(
        site,
        {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    asset = context.data_sources.add_pandas("clipflow").add_dataframe_asset("metadata")
    batch = asset.add_batch_definition_whole_dataframe("metadata")
    expectations = [getattr(gxe, c.expectation)(column=c.column, **c.kwargs) for c in suite]
    gx_suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME, expectations=expectations))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=SUITE_NAME, data=batch, suite=gx_suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=SUITE_NAME,
            validation_definitions=[definition],
            # The ephemeral context also has a default site in a temporary directory; build only ours.
            actions=[UpdateDataDocsAction(name="data_docs", site_names=[site])],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["key", ROW]},
        )
    )
    frame = metadata.assign(**{ROW: range(len(metadata))})
    outcome = checkpoint.run(batch_parameters={"dataframe": frame})
    (validation,) = outcome.run_results.values()

    # GX hands results back in its own order; match them to the suite by the expectation's id.
    by_id = {result.expectation_config.id: result for result in validation.results}
    return [by_id[expectation.id] for expectation in gx_suite.expectations]


def _exception_message(info: dict[str, Any] | None) -> str | None:
    """The first line of an error GX caught while evaluating an expectation, if any."""
    # GX reports an error either flat or nested under the id of each metric that failed.
    for entry in [info or {}, *(info or {}).values()]:
        if isinstance(entry, dict) and entry.get("raised_exception"):
            lines = str(entry.get("exception_message") or "").splitlines()
            return lines[0] if lines else "unknown error"
    return None
