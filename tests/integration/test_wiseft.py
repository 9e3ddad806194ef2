"""The evaluate step of a fine-tuned model: its baseline beside it, per-item hits, the WiSE-FT curve and the
chosen mix logged, tagged and registered through the gate, on real shards and a real MLflow store."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml

from clipflow import model as clip_model
from clipflow import tracking
from clipflow.artifacts import TrainReport
from clipflow.data.ingest import ingest
from clipflow.evaluate.embeddings import SplitEmbeddings
from clipflow.evaluate.step import WISEFT_MODEL_DIR, evaluate
from clipflow.evaluate.wiseft import interpolate
from clipflow.evaluate.zeroshot import zeroshot
from clipflow.registry.models import load_model
from clipflow.registry.promote import AGAINST_BASELINE, promote

ALPHAS = [0.0, 0.5]  # without 1.0 the chosen weights are a mix, never the fine-tuned ones as they are


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, small_params):
    """Two CLIP-Tiny checkpoints, the "pretrained" start and the "fine-tuned" model, evaluated as a fine-tuning."""
    tmp = tmp_path_factory.mktemp("wiseft")
    ingest("builtin", tmp / "data", small_params.data)
    torch.manual_seed(0)
    start = clip_model.save_checkpoint(tmp / "start", clip_model.create("CLIP-Tiny").model, "CLIP-Tiny", {})
    finetuned = clip_model.save_checkpoint(tmp / "tuned", clip_model.create("CLIP-Tiny").model, "CLIP-Tiny", {})
    evaluate_params = small_params.evaluate
    wiseft = dataclasses.replace(evaluate_params.wiseft, alphas=ALPHAS, retention="heldout", max_retention_drop=1.0)
    params = dataclasses.replace(
        small_params,
        train=dataclasses.replace(small_params.train, pretrained=str(start)),
        evaluate=dataclasses.replace(evaluate_params, wiseft=wiseft),
        tracking=dataclasses.replace(small_params.tracking, uri=f"sqlite:///{tmp}/mlflow.db", experiment="wiseft"),
    )
    tracking.setup(params.tracking)
    with mlflow.start_run() as run:
        pass
    result = evaluate(finetuned, tmp / "data", tmp / "out", params, mlflow_run_id=run.info.run_id)
    yield {
        "tmp": tmp,
        "result": result,
        "run_id": run.info.run_id,
        "params": params,
        "start": start,
        "tuned": finetuned,
    }
    mlflow.set_tracking_uri(None)


def test_the_starting_model_is_evaluated_beside_the_fine_tuned_one(fine_tuned):
    result, tmp = fine_tuned["result"], fine_tuned["tmp"]
    metrics = result.metrics
    for name in ("zeroshot_top1_seen", "zeroshot_top1_heldout", "retrieval_i2t_r1", "retrieval_t2i_r1"):
        assert 0.0 <= metrics[f"baseline_{name}"] <= 1.0
    assert "baseline_zeroshot_chance_seen" not in metrics  # chance is the data's, said once
    # the same set with the same prompts, scored on the starting model alone
    start = clip_model.load(fine_tuned["start"])
    settings = fine_tuned["params"].evaluate
    alone = zeroshot(
        start,
        SplitEmbeddings(start, tmp / "data", settings.batch_size),
        pd.read_parquet(tmp / "data/metadata.parquet"),
        "seen",
        settings.zeroshot["seen"],
        settings.templates,
    )
    assert metrics["baseline_zeroshot_top1_seen"] == pytest.approx(alone.acc1)
    written = json.loads((tmp / "out/metrics.json").read_text())
    assert written["metrics"] == pytest.approx(metrics) and written["baseline"]["model"] == str(fine_tuned["start"])
    logged = mlflow.MlflowClient().get_run(fine_tuned["run_id"]).data.metrics
    assert logged["eval/baseline_zeroshot_top1_seen"] == pytest.approx(metrics["baseline_zeroshot_top1_seen"])
    summary = (tmp / "out/summary.md").read_text()
    assert "## Against the starting model" in summary and "| metric | fine-tuned | baseline | difference |" in summary
    seen, base = metrics["zeroshot_top1_seen"], metrics["baseline_zeroshot_top1_seen"]
    assert f"| `zeroshot_top1_seen` | {seen:.3f} | {base:.3f} | {seen - base:+.3f} |" in summary


def test_per_item_hits_average_to_the_metrics_of_both_models(fine_tuned):
    result, tmp = fine_tuned["result"], fine_tuned["tmp"]
    items = pd.read_parquet(tmp / "out/per_item.parquet")
    assert set(items.columns) == {"model", "metric", "set", "key", "hit"} and set(items["hit"]) <= {0, 1}
    assert set(items["model"]) == {"model", "baseline"}
    means = items.groupby(["model", "metric"])["hit"].mean()
    for (who, metric), mean in means.items():
        assert mean == pytest.approx(result.metrics[metric if who == "model" else f"baseline_{metric}"]), metric
    assert {"zeroshot_top1_seen", "zeroshot_top1_heldout", "retrieval_i2t_r1", "retrieval_t2i_r10"} <= set(
        items["metric"]
    )
    small = fine_tuned["params"].data
    per_metric = items.groupby(["model", "metric"])["key"]
    assert (per_metric.nunique() == per_metric.size()).all()  # one row per item
    assert means.index.size == 2 * items["metric"].nunique()
    assert per_metric.size()[("model", "zeroshot_top1_heldout")] == small.num_heldout
    assert set(items.loc[items["metric"] == "retrieval_i2t_r1", "set"]) == {"test"}


def test_the_wiseft_curve_is_written_plotted_and_logged_per_a(fine_tuned):
    result, tmp = fine_tuned["result"], fine_tuned["tmp"]
    curve = json.loads((tmp / "out/wiseft.json").read_text())
    assert [point["alpha"] for point in curve["points"]] == ALPHAS
    assert curve["target"] == "seen" and curve["retention"] == "heldout" and curve["chosen"] in ALPHAS
    # a = 0 is the starting model itself
    assert curve["points"][0]["target_top1"] == pytest.approx(result.metrics["baseline_zeroshot_top1_seen"])
    assert curve["points"][0]["retention_top1"] == pytest.approx(result.metrics["baseline_zeroshot_top1_heldout"])
    assert curve["pretrained_retention_top1"] == curve["points"][0]["retention_top1"]
    assert (tmp / "out/wiseft.png").stat().st_size > 10_000
    client = mlflow.MlflowClient()
    for name, field in (("wiseft/target_top1", "target_top1"), ("wiseft/retention_top1", "retention_top1")):
        history = sorted(client.get_metric_history(fine_tuned["run_id"], name), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [
            (round(point["alpha"] * 100), pytest.approx(point[field])) for point in curve["points"]
        ]
    summary = (tmp / "out/summary.md").read_text()
    assert "## WiSE-FT" in summary and f"chosen: **a = {curve['chosen']:g}**" in summary
    assert "![WiSE-FT curve](wiseft.png)" in summary


def test_the_chosen_mix_is_the_evaluated_model_logged_and_tagged(fine_tuned):
    result, tmp = fine_tuned["result"], fine_tuned["tmp"]
    chosen = result.wiseft.chosen
    (point,) = [p for p in result.wiseft.points if p.alpha == chosen]
    assert result.metrics["zeroshot_top1_seen"] == pytest.approx(point.target_top1)
    assert result.model.startswith(f"WiSE-FT a={chosen:g}")
    # its weights are the mix, as a checkpoint beside the evaluation and as the run's MLflow model
    expected = interpolate(
        clip_model.load(fine_tuned["start"]).model.state_dict(),
        clip_model.load(fine_tuned["tuned"]).model.state_dict(),
        chosen,
    )
    assert (tmp / "out" / WISEFT_MODEL_DIR / "checkpoint.pt").is_file()
    assert result.model_uri and result.model_uri.startswith("models:/m-")
    logged = mlflow.get_logged_model(result.model_uri.removeprefix("models:/"))
    assert logged.tags["wiseft_alpha"] == str(chosen) and logged.source_run_id == fine_tuned["run_id"]
    restored = load_model(result.model_uri).model.state_dict()
    assert all(torch.equal(restored[name], tensor) for name, tensor in expected.items())
    client = mlflow.MlflowClient()
    assert client.get_run(fine_tuned["run_id"]).data.tags["wiseft_alpha"] == str(chosen)
    # the evaluation artifacts hold the curve and the per-item hits, not a second copy of the weights
    logged_files = {a.path for a in client.list_artifacts(fine_tuned["run_id"], "evaluation")}
    assert {"evaluation/per_item.parquet", "evaluation/wiseft.json", "evaluation/wiseft.png"} <= logged_files
    assert f"evaluation/{WISEFT_MODEL_DIR}" not in logged_files


def test_the_registered_mix_carries_its_a_and_the_gate_pairs_it_with_its_baseline(fine_tuned):
    result, params = fine_tuned["result"], fine_tuned["params"]
    params = dataclasses.replace(params, promote=dataclasses.replace(params.promote, model_name="clip-wiseft"))
    promoted = promote(result.model_uri, result.metrics, params, data_version="v1")
    version = mlflow.MlflowClient().get_model_version("clip-wiseft", promoted.model_version)
    assert version.tags["wiseft_alpha"] == str(result.wiseft.chosen)
    against_baseline = [check for check in promoted.checks if check.against == AGAINST_BASELINE]
    assert {check.metric for check in against_baseline} == set(params.promote.gated)
    sizes = {"zeroshot_top1_seen": params.data.num_test, "retrieval_i2t_r1": params.data.num_test}
    for check in against_baseline:
        assert check.items == sizes[check.metric] and check.interval[0] <= check.difference <= check.interval[1]


def test_promote_step_by_step_registers_the_mix_its_evaluation_chose(fine_tuned, tmp_path):
    """`clipflow promote --model-uri TRAIN_DIR --metrics metrics.json`, as after `clipflow train` and `evaluate`."""
    tmp, result = fine_tuned["tmp"], fine_tuned["result"]
    trained = tmp_path / "model"
    trained.mkdir()
    TrainReport(fine_tuned["run_id"], "models:/m-0123", str(fine_tuned["tuned"]), "v1", 1.0).write(trained)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(fine_tuned["params"].to_dict()))
    promoted = subprocess.run(
        [str(Path(sys.executable).with_name("clipflow")), "promote", "--model-uri", str(trained)]
        + ["--metrics", str(tmp / "out/metrics.json"), "--set", "promote.model_name=clip-wiseft-cli"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    registered = json.loads(promoted.stdout)
    version = mlflow.MlflowClient().get_model_version("clip-wiseft-cli", registered["model_version"])
    assert version.source == result.model_uri
    assert version.tags["wiseft_alpha"] == str(result.wiseft.chosen)
