"""The validation report as an MLflow run of its own, so the data docs sit beside the models."""

from __future__ import annotations

from pathlib import Path

from clipflow.artifacts import ValidationReport, lineage
from clipflow.params import TrackingParams

ARTIFACT_PATH = "validation"


def log_report(report_dir: str | Path, result: ValidationReport, tracking: TrackingParams, data_dir: str | Path) -> str:
    """Log a `validate` result and its report folder (data docs, quarantine) to MLflow.

    The run is tagged `clipflow.step=validate` and with the data's lineage (`data_version`,
    `data_dvc_md5`), the same tags a training run on that data carries, so the two are found
    together.

    Returns:
        The MLflow run id.
    """
    import mlflow

    from clipflow import tracking as clipflow_tracking

    clipflow_tracking.setup(tracking)
    with mlflow.start_run(run_name="validate") as run:
        mlflow.set_tags({**lineage(data_dir), "clipflow.step": "validate", "validation.success": str(result.success)})
        keys = ("input_rows", "kept", "quarantined", "quarantined_at_ingest", "quarantined_by_suite", "bad_fraction")
        mlflow.log_metrics({f"validation_{key}": float(getattr(result, key)) for key in keys})
        mlflow.log_artifacts(str(report_dir), artifact_path=ARTIFACT_PATH)
    return run.info.run_id
