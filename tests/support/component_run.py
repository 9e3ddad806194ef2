"""Session fixtures: the DAG's steps called as plain functions (`component.python_func`), chained once.

ingest -> validate -> train -> evaluate -> promote on the `test` profile, with real KFP artifact
objects whose `.path` is a temporary folder, a fresh MLflow sqlite store and real torchrun
workers. Loaded by `tests/conftest.py` (`pytest_plugins`), so the component tests and the MLflow
story test read the same run instead of training twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp import dsl

from pipelines import params_json
from tests.support import REPO


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """The arguments every step receives, over a fresh MLflow store; the process's MLflow state restored after."""
    import mlflow

    tmp = tmp_path_factory.mktemp("components")
    tracking_uri = f"sqlite:///{tmp}/mlflow.db"
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("CLIPFLOW_LAUNCHER", raising=False)  # kfp.local's torchrun, not the cluster's TrainJob
        yield {
            "tmp": tmp,
            "tracking_uri": tracking_uri,
            "common": {
                "params": params_json(REPO / "params.yaml"),
                "overrides": [f"tracking.uri={tracking_uri}", "tracking.experiment=components"],
                "profile": "test",
            },
        }
    mlflow.set_tracking_uri(previous_uri)


def artifact(kind, run, name: str):
    """An output artifact as the KFP executor hands it to a step: its folder exists, the path does not yet."""
    made = kind(name=name.rpartition("/")[2], uri=str(run["tmp"] / name))
    Path(made.path).parent.mkdir(parents=True, exist_ok=True)
    return made


def mlflow_client(run):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=run["tracking_uri"])


@pytest.fixture(scope="session")
def ingested(run):
    from components.ingest import ingest_component

    data = artifact(dsl.Dataset, run, "ingest/data")
    outputs = ingest_component.python_func(source="builtin", data=data, **run["common"])
    return data, outputs


@pytest.fixture(scope="session")
def validated(run, ingested):
    from components.validate import validate_component

    data, _ = ingested
    report, validation = artifact(dsl.HTML, run, "validate/report"), artifact(dsl.Artifact, run, "validate/validation")
    output = validate_component.python_func(data=data, report=report, validation=validation, **run["common"])
    return report, validation, json.loads(output)


@pytest.fixture(scope="session")
def trained(run, ingested, validated):
    from components.train import train_component

    data, _ = ingested
    model = artifact(dsl.Model, run, "train/model")
    outputs = train_component.python_func(data=data, model=model, **run["common"])
    return model, outputs


@pytest.fixture(scope="session")
def evaluated(run, ingested, trained):
    from components.evaluate import evaluate_component

    (data, _), (model, trained_outputs) = ingested, trained
    outputs = {
        "metrics": artifact(dsl.Metrics, run, "evaluate/metrics"),
        "confusion": artifact(dsl.ClassificationMetrics, run, "evaluate/confusion"),
        "summary": artifact(dsl.Markdown, run, "evaluate/summary"),
        "evaluation": artifact(dsl.Artifact, run, "evaluate/evaluation"),
    }
    returned = evaluate_component.python_func(
        data=data, model=model, mlflow_run_id=trained_outputs.mlflow_run_id, **outputs, **run["common"]
    )
    return outputs, returned


@pytest.fixture(scope="session")
def promoted(run, ingested, trained, evaluated):
    """The promote step's outputs, and its Markdown summary artifact."""
    from components.promote import promote_component

    (_, ingest_outputs), (_, train_outputs), (_, evaluate_outputs) = ingested, trained, evaluated
    summary = artifact(dsl.Markdown, run, "promote/summary")
    outputs = promote_component.python_func(
        model_uri=train_outputs.model_uri,
        metrics_json=evaluate_outputs.metrics_json,
        data_version=ingest_outputs.data_version,
        summary=summary,
        **run["common"],
    )
    return outputs, summary
