"""Each component called as a plain function (`component.python_func`), as Kubeflow's own components are tested.

The steps are chained as the DAG chains them (ingest -> validate -> train -> evaluate -> promote ->
package) on the `test` profile: the session fixtures of tests/support/component_run.py run the
first five once. The whole DAG through kfp.local is tests/e2e/test_pipeline.py.
"""

import json
from pathlib import Path

import pytest

from components.package import package_component
from tests.support.component_run import mlflow_client


def test_ingest_writes_shards_per_split_and_reports_the_data_version(ingested, small_params):
    data, outputs = ingested
    report = json.loads(outputs.report)
    assert report["data_version"] == outputs.data_version == data.metadata["data_version"]
    assert report["output"] == data.path and report["source"] == "builtin"
    counts = {
        split: getattr(small_params.data, f"num_{split}") for split in ("train", "test", "heldout", "shift", "probe")
    }
    assert report["counts"] == counts
    assert report["kept"] == report["input_rows"] == data.metadata["rows"] == sum(counts.values())
    for split, count in counts.items():
        assert sum(json.loads((Path(data.path) / split / "sizes.json").read_text()).values()) == count
        assert sorted(Path(data.path, split).glob(f"{split}-*.tar"))
    assert (Path(data.path) / "metadata.parquet").is_file()
    # what `dvc add` would record for the folder, and the code that wrote it
    assert data.metadata["dvc_md5"].endswith(".dir") and "git_revision" in data.metadata


def test_validate_passes_the_generated_data_and_logs_its_report(run, ingested, validated):
    data, ingest_outputs = ingested
    report, validation, result = validated
    assert result["success"] is True
    assert result["input_rows"] == result["kept"] == data.metadata["rows"] and result["quarantined"] == 0
    assert {k: validation.metadata[k] for k in ("input_rows", "kept", "quarantined")} == {
        k: result[k] for k in ("input_rows", "kept", "quarantined")
    }
    assert "<html" in Path(report.path).read_text().lower()
    for name in ("validation.json", "quarantine.parquet", "index.html"):
        assert (Path(validation.path) / name).is_file()
    logged = mlflow_client(run).get_run(validation.metadata["mlflow_run_id"])
    assert logged.data.tags["clipflow.step"] == "validate"
    assert logged.data.tags["data_version"] == ingest_outputs.data_version


def test_train_writes_an_open_clip_checkpoint_and_an_mlflow_run(run, ingested, trained, small_params):
    _, ingest_outputs = ingested
    model, outputs = trained
    report = json.loads(outputs.report)
    assert report["mlflow_run_id"] == outputs.mlflow_run_id == model.metadata["mlflow_run_id"]
    assert report["model_uri"] == outputs.model_uri and outputs.model_uri.startswith("models:/")
    assert report["checkpoint"] == str(Path(model.path) / "checkpoint.pt") and Path(report["checkpoint"]).is_file()
    assert model.metadata["framework"] == "open_clip"
    assert report["data_version"] == ingest_outputs.data_version
    logged = mlflow_client(run).get_run(outputs.mlflow_run_id)
    assert logged.data.tags["clipflow.step"] == "train" and logged.data.tags["profile"] == "test"
    assert logged.data.tags["data_version"] == ingest_outputs.data_version
    assert "train/loss" in logged.data.metrics
    assert int(logged.data.params["train.steps"]) == small_params.train.steps


def test_evaluate_fills_the_kfp_metrics_confusion_matrix_and_summary(run, trained, evaluated):
    _, train_outputs = trained
    artifacts, returned = evaluated
    metrics = json.loads(returned.metrics_json)
    report = json.loads(returned.report)
    assert set(report) == {"metrics", "probes", "shift", "model", "seconds"} and report["metrics"] == metrics
    # the distribution-shift report reaches the KFP outputs: in the report, and its numbers among the Metrics
    assert report["shift"]["effective_robustness"] == pytest.approx(metrics["shift_effective_robustness"])
    assert report["shift"]["top1"]["linear_probe"]["shifted"] == pytest.approx(
        metrics["shift_linear_probe_top1_shifted"]
    )
    for name in ("zeroshot_top1_heldout", "retrieval_i2t_r1", "retrieval_t2i_r1"):
        assert 0.0 <= metrics[name] <= 1.0
    assert artifacts["metrics"].metadata == pytest.approx(metrics)
    confusion = artifacts["confusion"].metadata["confusionMatrix"]
    classes = [c["displayName"] for c in confusion["annotationSpecs"]]
    assert len(confusion["rows"]) == len(classes) > 1
    summary = Path(artifacts["summary"].path).read_text()
    assert "| heldout |" in summary and "## Distribution shift" in summary
    evaluation = Path(artifacts["evaluation"].path)
    for name in ("metrics.json", "confusion_heldout.png", "retrieval_grid.png", "probes.png", "summary.md"):
        assert (evaluation / name).stat().st_size > 0
    logged = mlflow_client(run).get_run(train_outputs.mlflow_run_id)
    assert logged.data.metrics["eval/zeroshot_top1_heldout"] == pytest.approx(metrics["zeroshot_top1_heldout"])


def test_promote_registers_the_first_model_as_champion(run, promoted, small_params):
    promoted, summary = promoted
    report = json.loads(promoted.report)
    assert (report["model_name"], report["model_version"]) == (promoted.model_name, promoted.model_version)
    assert promoted.model_name == small_params.promote.model_name and promoted.model_version == "1"
    # the test profile's gate has zero floors, and there is no champion yet
    assert report["promoted"] is True and report["previous_champion"] is None
    assert report["aliases"] == ["champion"]
    champion = mlflow_client(run).get_model_version_by_alias(promoted.model_name, "champion")
    assert str(champion.version) == promoted.model_version
    # the Kubeflow UI shows the decision and where the model is
    text = Path(summary.path).read_text()
    assert "**Promoted**" in text and f"`models:/{promoted.model_name}/1`" in text


def test_package_builds_a_bento_of_the_champion_with_the_gallery(run, ingested, promoted, packaged, small_params):
    """`packaged` (tests/support/serving_fixtures.py) holds $BENTOML_HOME on the session's one store:
    BentoML fixes its store once per process, so every test that packages in this process shares it."""
    import bentoml

    from clipflow.model.precision import resolve_precision

    (data, ingest_outputs), (promoted, _) = ingested, promoted
    result = json.loads(package_component.python_func(model_name=promoted.model_name, data=data, **run["common"]))
    assert result["model_uri"] == f"models:/{promoted.model_name}@champion"
    assert result["gallery"] == {
        "split": small_params.serve.gallery_split,
        "size": getattr(small_params.data, f"num_{small_params.serve.gallery_split}"),
        "precision": resolve_precision(small_params.serve.precision),
        "data_version": ingest_outputs.data_version,
    }
    assert result["precision"] == small_params.serve.precision
    bento = bentoml.get(result["bento_tag"])
    assert bento.tag.name == small_params.serve.bento_name
    assert bento.info.labels["mlflow_model"] == promoted.model_name
    assert bento.info.labels["mlflow_version"] == promoted.model_version
    assert bento.info.labels["data_version"] == ingest_outputs.data_version
    assert result["bento_model_tag"] in {str(model.tag) for model in bento.info.all_models}
