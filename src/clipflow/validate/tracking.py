"""The validation report as an MLflow run of its own, so the data docs sit beside the models."""

from __future__ import annotations

from pathlib import Path

from clipflow import tracking as clipflow_tracking
from clipflow.artifacts import IngestReport, ValidationReport, lineage
from clipflow.params import TrackingParams

ARTIFACT_PATH = "validation"


def log_report(report_dir: str | Path, result: ValidationReport, tracking: TrackingParams, data_dir: str | Path) -> str:
    """Log a `validate` result and its report folder (data docs, quarantine) to MLflow.

    The run is named and described by the data version it checked, tagged `clipflow.step=validate`
    and with the data's lineage (`data_version`, `data_dvc_md5`), the same tags a training run on
    that data carries, and lists every split it checked as a dataset input (context `validation`),
    so the two are found together.

    Returns:
        The MLflow run id.
    """
    import mlflow

    clipflow_tracking.setup(tracking)
    data = IngestReport.read(data_dir)
    name = f"validate data {data.data_version[:8]}"
    with mlflow.start_run(run_name=name, description=describe(result, data)) as run:
        mlflow.set_tags({**lineage(data_dir), "clipflow.step": "validate", "validation.success": str(result.success)})
        keys = ("input_rows", "kept", "quarantined", "quarantined_at_ingest", "quarantined_by_suite", "bad_fraction")
        mlflow.log_metrics({f"validation_{key}": float(getattr(result, key)) for key in keys})
        mlflow.log_artifacts(str(report_dir), artifact_path=ARTIFACT_PATH)
        clipflow_tracking.log_data(data_dir, data.counts, "validation")
    return run.info.run_id


def describe(result: ValidationReport, data: IngestReport) -> str:
    """The validation run's description in MLflow (Markdown): which data, what was kept, the verdict."""
    verdict = "passed" if result.success else "failed"
    failed = [e for e in result.expectations if not e.success]
    lines = [
        f"Great Expectations validation of data version `{data.data_version}`, ingested from"
        f" `{clipflow_tracking.source_name(data.source)}`: **{verdict}**.",
        "",
        f"{result.input_rows} rows in, {result.kept} kept, {result.quarantined} quarantined"
        f" ({result.quarantined_at_ingest} at ingest, {result.quarantined_by_suite} by the suite);"
        f" bad fraction {result.bad_fraction:.4f}, allowed {result.max_bad_fraction:.4f}.",
    ]
    if failed:
        lines += ["", "Failed expectations: " + "; ".join(f"{e.expectation} on `{e.column}`" for e in failed) + "."]
    lines += ["", f"The data docs and the quarantine table are the run's `{ARTIFACT_PATH}/` artifacts."]
    return "\n".join(lines)
