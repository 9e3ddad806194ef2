"""MLflow set-up shared by every step: one tracking URI and experiment from params, and the data a run read."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from clipflow.errors import ClipflowError
from clipflow.params import TrackingParams

ARTIFACTS_DIR = "mlartifacts"
# MLflow 3's UI opens an experiment without this tag on its GenAI "Traces" page, which stays
# empty for clipflow; "custom_model_development" ("Machine learning") opens it on its runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def absolute_uri(uri: str) -> str:
    """Make a relative `sqlite:///file` URI absolute, so subprocesses started elsewhere agree."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def setup(params: TrackingParams) -> str:
    """Point MLflow at the tracking store and experiment; returns the experiment id.

    With a local sqlite store, artifacts go to `./mlartifacts` beside the database. The
    experiment is marked as a machine-learning one, so MLflow's UI opens it on its runs.
    """
    import mlflow

    uri = absolute_uri(params.uri)
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.get_experiment_by_name(params.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri[len("sqlite:///") :]).parent / ARTIFACTS_DIR).as_uri()
            experiment_id = mlflow.create_experiment(params.experiment, artifact_location=location)
        # Also on experiments created before clipflow set it; a kind a user chose in the UI stays.
        if experiment is None or EXPERIMENT_KIND_TAG not in experiment.tags:
            mlflow.MlflowClient().set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        mlflow.set_experiment(experiment_id=experiment_id)
    except mlflow.exceptions.MlflowException as exc:
        reason = exc.message.strip().splitlines()[0]
        raise ClipflowError(f"cannot use the MLflow tracking store {uri}: {reason}") from None
    return experiment_id


def log_data(data_dir: str | Path, splits: Iterable[str], context: str) -> None:
    """Log splits of an ingested data directory as dataset inputs of the active run.

    Each split is one MLflow dataset named `<source>/<split>` (`builtin/train`), with the split's
    folder as its source and the data version as its digest, so MLflow's dataset views show
    which runs trained on, validated or evaluated the same data.

    Args:
        data_dir: the ingested data directory the step read.
        splits: the splits it read; splits the data does not hold are left out.
        context: what the run did with them: `training`, `validation` or `evaluation`.
    """
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, DataType, Schema

    from clipflow.artifacts import IngestReport

    report = IngestReport.read(data_dir)
    origin = source_name(report.source)
    # A WebDataset sample: its key, the image file and the caption (its .json metadata aside).
    schema = Schema(
        [ColSpec(DataType.string, "key"), ColSpec(DataType.binary, "image"), ColSpec(DataType.string, "caption")]
    )
    chosen = [split for split in dict.fromkeys(splits) if report.counts.get(split)]
    folder = Path(data_dir).resolve()
    datasets = [
        MetaDataset(
            resolve_dataset_source(str(folder / split)),
            name=f"{origin}/{split}",
            digest=report.data_version,
            schema=schema,
        )
        for split in chosen
    ]
    tags = [{"split": split, "samples": str(report.counts[split])} for split in chosen]
    mlflow.log_inputs(datasets, contexts=[context] * len(datasets), tags_list=tags)


def source_name(source: str) -> str:
    """A short name for what ingest read: `builtin`, a manifest's file name, a shard folder's name.

    Only the last part of the path: a URL's query (a presigned S3 URL's signature) stays out of MLflow.
    """
    parts = urlsplit(source)
    return PurePosixPath(parts.path.rstrip("/")).name or parts.hostname or source
