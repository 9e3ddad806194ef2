"""What a user finds in MLflow after a test-profile run: `mlflow server` over the run's store, read with the client.

The run is the session's chain of components (tests/support/component_run.py): ingest, validate,
train, evaluate and promote into one sqlite store. Afterwards a tracking server serves that
store, as `mlflow server --backend-store-uri sqlite:///mlflow.db` does after `make run`, and every
check below goes through it: what the UI would show, read through the client instead of a browser.
"""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from clipflow.model import model_config
from clipflow.params import parse_params
from tests.support import REPO
from tests.support.servers import mlflow_server

CLIPFLOW = str(Path(sys.executable).with_name("clipflow"))
EXPERIMENT = "components"  # tests/support/component_run.py logs there
SPLITS = ("train", "test", "heldout", "shift", "probe")


@pytest.fixture(scope="module")
def story(run, ingested, validated, trained, evaluated, promoted, small_params):
    """The finished run's store behind `mlflow server`, with what the steps returned."""
    workdir = run["tmp"] / "mlflow-server"
    with mlflow_server(workdir, store=Path(run["tracking_uri"].removeprefix("sqlite:///"))) as url:
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(url)  # `models:/` URIs resolve through the server too
        try:
            yield {
                "url": url,
                "client": mlflow.MlflowClient(tracking_uri=url),
                "data_version": ingested[1].data_version,
                "data_dir": Path(ingested[0].path),
                "validate_run": validated[1].metadata["mlflow_run_id"],
                "train": trained[1],
                "metrics": json.loads(evaluated[1].metrics_json),
                "evaluation": Path(evaluated[0]["evaluation"].path),
                "model_name": small_params.promote.model_name,
                "params": parse_params(run["common"]["params"], run["common"]["overrides"], run["common"]["profile"]),
            }
        finally:
            mlflow.set_tracking_uri(previous)


def _inputs(run) -> dict[tuple[str, str], object]:
    """(dataset name, context) -> the dataset, for every dataset input of a run."""
    found = {}
    for item in run.inputs.dataset_inputs:
        context = {tag.key: tag.value for tag in item.tags}["mlflow.data.context"]
        found[item.dataset.name, context] = item.dataset
    return found


def test_the_experiment_opens_on_its_runs_not_on_genai_traces(story):
    experiment = story["client"].get_experiment_by_name(EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_validation_run_is_named_described_and_lists_every_split_it_checked(story):
    client, version = story["client"], story["data_version"]
    validation = client.get_run(story["validate_run"])
    assert validation.info.run_name == f"validate data {version[:8]}"
    description = validation.data.tags["mlflow.note.content"]
    assert f"data version `{version}`" in description and "**passed**" in description
    assert "ingested from `builtin`" in description and "0 quarantined" in description
    inputs = _inputs(validation)
    assert set(inputs) == {(f"builtin/{split}", "validation") for split in SPLITS}
    assert {dataset.digest for dataset in inputs.values()} == {version}
    source = json.loads(inputs["builtin/train", "validation"].source)["uri"]
    assert Path(source) == story["data_dir"].resolve() / "train"


def test_training_run_tells_what_trained_on_which_data(story, small_params):
    client, version = story["client"], story["data_version"]
    training = client.get_run(story["train"].mlflow_run_id)
    assert training.info.run_name == f"train CLIP-Tiny on data {version[:8]}"
    description = training.data.tags["mlflow.note.content"]
    steps, batch = small_params.train.steps, small_params.train.batch_size
    assert f"Trains `CLIP-Tiny` from random weights for {steps} steps of {batch} image-text pairs" in description
    assert f"the `train` split ({small_params.data.num_train} pairs) of data version `{version}`" in description

    # trained on the train split, evaluated on the others: the data version is each one's digest
    inputs = _inputs(training)
    expected = {("builtin/train", "training")} | {
        (f"builtin/{s}", "evaluation") for s in ("test", "heldout", "shift", "probe")
    }
    assert set(inputs) == expected
    assert {dataset.digest for dataset in inputs.values()} == {version}

    # the charts come in groups: training, evaluation and MLflow's system metrics
    metrics = training.data.metrics
    assert {"train/loss", "train/lr", "train/logit_scale", "train/samples_per_second"} <= set(metrics)
    assert metrics["eval/zeroshot_top1_heldout"] == pytest.approx(story["metrics"]["zeroshot_top1_heldout"])
    assert {name.split("/")[0] for name in metrics} <= {"train", "eval", "system"}
    # only the section that applied to a local run: no 8-GPU cluster, no serving limits
    assert training.data.params and all(key.startswith("train.") for key in training.data.params)
    assert training.data.params["train.steps"] == str(steps)


def test_training_run_keeps_the_resolved_params_and_the_training_log(story, tmp_path):
    client, run_id = story["client"], story["train"].mlflow_run_id
    resolved = yaml.safe_load(Path(client.download_artifacts(run_id, "params.yaml", str(tmp_path))).read_text())
    assert resolved == story["params"].to_dict()  # with the profile and the overrides, every section
    log = Path(client.download_artifacts(run_id, "train.log", str(tmp_path))).read_text()
    assert "train from step 0" in log  # the leader's progress, as torchrun relayed it


def test_logged_model_shows_its_signature_and_an_example_it_encodes(story):
    uri = story["train"].model_uri
    info = mlflow.models.get_model_info(uri)
    width = model_config("CLIP-Tiny")["embed_dim"]
    signature = {
        side: json.loads(spec) for side, spec in info.signature.to_dict().items() if spec
    }  # as MLmodel holds it
    assert signature == {
        "inputs": [{"type": "string", "required": True}],
        "outputs": [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, width]}}],
    }
    model = mlflow.pyfunc.load_model(uri)
    example = model.input_example
    assert example and all(isinstance(text, str) for text in example)
    embeddings = model.predict(example)
    assert embeddings.shape == (len(example), width)
    assert np.linalg.norm(embeddings, axis=1) == pytest.approx(1.0, abs=1e-5)


def test_promotion_explains_itself_and_challenger_never_names_the_champion(story, small_params, tmp_path):
    client, name, metrics = story["client"], story["model_name"], story["metrics"]
    first = client.get_model_version(name, "1")
    assert first.aliases == ["champion"]
    description = first.description
    assert description.startswith(f"## Promotion\n\n**Promoted**: version 1 of `{name}` is now `champion`")
    for metric, floor in small_params.promote.floors.items():
        assert f"| `{metric}` | {metrics[metric]:.4f} | its floor | {floor:.4f} or more | pass |" in description
    assert "There was no champion to compare with" in description
    assert f"`models:/{name}/1`" in description and f"`{story['train'].model_uri}`" in description
    # the run's evaluation summary ends with the same section
    summary = mlflow.artifacts.load_text(f"runs:/{story['train'].mlflow_run_id}/evaluation/summary.md")
    assert summary.startswith((story["evaluation"] / "summary.md").read_text().rstrip("\n"))
    assert summary.endswith(description)

    # A second promotion of the same model, as a user runs it against the server, with a floor no
    # 12-step model reaches: refused, it becomes challenger and the champion stays.
    floors = "{zeroshot_top1_heldout: 1.0, retrieval_i2t_r1: 0.0}"
    overrides = [f"tracking.uri={story['url']}", f"tracking.experiment={EXPERIMENT}", f"promote.floors={floors}"]
    overrides.append("promote.max_drop=0.0")
    command = [CLIPFLOW, "promote", "--model-uri", story["train"].model_uri]
    command += ["--metrics", str(story["evaluation"] / "metrics.json"), "--params", str(REPO / "params.yaml")]
    command += ["--profile", "test", *(arg for item in overrides for arg in ("--set", item))]
    promoted = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    assert json.loads(promoted.stdout)["promoted"] is False

    assert client.get_registered_model(name).aliases == {"champion": "1", "challenger": "2"}
    second = client.get_model_version(name, "2")
    heldout, i2t = metrics["zeroshot_top1_heldout"], metrics["retrieval_i2t_r1"]
    assert second.description.startswith(
        f"## Promotion\n\n**Not promoted**: version 2 of `{name}` is `challenger`; `champion` stays version 1:"
        f" zeroshot_top1_heldout={heldout:.4f} is below its floor 1.0000."
    )
    rows = [
        f"| `retrieval_i2t_r1` | {i2t:.4f} | its floor | 0.0000 or more | pass |",
        f"| `zeroshot_top1_heldout` | {heldout:.4f} | its floor | 1.0000 or more | **fail** |",
        # the same evaluation on both sides: paired item by item, they differ nowhere
        f"| `retrieval_i2t_r1` | {i2t:.4f} | champion version 1: {i2t:.4f}; difference +0.0000, 95% interval"
        f" [+0.0000, +0.0000] over {small_params.data.num_test} paired items | upper bound +0.0000 or more | pass |",
    ]
    for row in rows:
        assert row in second.description
    # the summary holds the latest decision about this run's model, once
    summary = mlflow.artifacts.load_text(f"runs:/{story['train'].mlflow_run_id}/evaluation/summary.md")
    assert summary.count("## Promotion") == 1 and summary.endswith(second.description)
