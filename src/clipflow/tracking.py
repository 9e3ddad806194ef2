"""MLflow set-up shared by every step: one tracking URI and experiment from params."""

from __future__ import annotations

from pathlib import Path

from clipflow.errors import ClipflowError
from clipflow.params import TrackingParams

ARTIFACTS_DIR = "mlartifacts"


def absolute_uri(uri: str) -> str:
    """Make a relative `sqlite:///file` URI absolute, so subprocesses started elsewhere agree."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def setup(params: TrackingParams) -> str:
    """Point MLflow at the tracking store and experiment; returns the experiment id.

    With a local sqlite store, artifacts go to `./mlartifacts` beside the database.
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
        mlflow.set_experiment(experiment_id=experiment_id)
    except mlflow.exceptions.MlflowException as exc:
        reason = exc.message.strip().splitlines()[0]
        raise ClipflowError(f"cannot use the MLflow tracking store {uri}: {reason}") from None
    return experiment_id
