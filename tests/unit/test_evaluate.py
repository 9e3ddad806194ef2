"""The evaluate step on real shards: metric names, CLIP_benchmark export, plots, MLflow logging."""

import json

import mlflow
import pytest
import torch
from PIL import Image

from clipflow import model as clip_model
from clipflow import tracking
from clipflow.data.ingest import ingest
from clipflow.errors import ClipflowError
from clipflow.evaluate.embeddings import check_rankable
from clipflow.evaluate.step import evaluate
from clipflow.registry.models import log_clip_model


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, small_params):
    tmp = tmp_path_factory.mktemp("evaluate")
    ingest("builtin", tmp / "data", small_params.data)
    checkpoint = clip_model.save_checkpoint(tmp / "model", clip_model.create("CLIP-Tiny").model, "CLIP-Tiny", {})
    params = small_params.__class__(
        **{**small_params.__dict__, "tracking": small_params.tracking.__class__(f"sqlite:///{tmp}/mlflow.db", "e")}
    )
    tracking.setup(params.tracking)
    with mlflow.start_run() as run:
        pass
    result = evaluate(checkpoint, tmp / "data", tmp / "out", params, mlflow_run_id=run.info.run_id)
    yield tmp, result, run.info.run_id, params
    mlflow.set_tracking_uri(None)


def test_metrics_cover_every_zeroshot_set_retrieval_and_probe(evaluated, small_params):
    tmp, result, _, _ = evaluated
    metrics = result.metrics
    for name in small_params.evaluate.zeroshot:
        for metric in ("top1", "top5", "mean_per_class_recall", "chance"):
            assert 0.0 <= metrics[f"zeroshot_{metric}_{name}"] <= 1.0
        assert metrics[f"zeroshot_top1_{name}"] <= metrics[f"zeroshot_top5_{name}"]
        per_template = result.zeroshot[name].per_template_top1
        assert set(per_template) == set(small_params.evaluate.templates)
        spread = max(per_template.values()) - min(per_template.values())
        assert metrics[f"prompt_sensitivity_{name}"] == pytest.approx(spread)
    for k in small_params.evaluate.recall_k:
        assert {f"retrieval_i2t_r{k}", f"retrieval_t2i_r{k}"} <= set(metrics)
    assert {"probe_counting", "probe_spatial", "probe_binding"} <= set(metrics)
    assert result.probes["counting"].chance == 0.25
    written = json.loads((tmp / "out/metrics.json").read_text())
    assert written == json.loads(json.dumps(result.to_dict()))


def test_clip_benchmark_export_uses_its_names(evaluated):
    tmp, result, _, _ = evaluated
    classification = json.loads((tmp / "out/clip_benchmark/heldout_zeroshot_classification.json").read_text())
    assert classification["task"] == "zeroshot_classification"
    assert set(classification["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert classification["metrics"]["acc1"] == pytest.approx(result.metrics["zeroshot_top1_heldout"])
    retrieval = json.loads((tmp / "out/clip_benchmark/test_zeroshot_retrieval.json").read_text())
    # CLIP_benchmark's image retrieval is text -> image
    assert retrieval["metrics"]["image_retrieval_recall@1"] == pytest.approx(result.metrics["retrieval_t2i_r1"])
    assert retrieval["metrics"]["text_retrieval_recall@5"] == pytest.approx(result.metrics["retrieval_i2t_r5"])


def test_plots_and_summary_are_files_in_the_output_and_the_mlflow_run(evaluated):
    tmp, _, run_id, _ = evaluated
    for name in ("confusion_heldout.png", "confusion_seen.png", "retrieval_grid.png", "probes.png"):
        with Image.open(tmp / "out" / name) as image:
            assert image.width > 200 and image.height > 150
    assert "| heldout |" in (tmp / "out/summary.md").read_text()
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "evaluation")}
    assert {"evaluation/confusion_heldout.png", "evaluation/retrieval_grid.png", "evaluation/probes.png"} <= logged
    assert "zeroshot_top1_heldout" in mlflow.get_run(run_id).data.metrics


def test_unknown_run_and_missing_split_are_clear_errors(evaluated):
    tmp, _, _, params = evaluated
    with pytest.raises(ClipflowError, match="MLflow run nope not found"):
        evaluate(tmp / "model", tmp / "data", tmp / "out2", params, mlflow_run_id="nope")
    odd = params.__class__(
        **{
            **params.__dict__,
            "evaluate": params.evaluate.__class__(**{**params.evaluate.__dict__, "retrieval_split": "val"}),
        }
    )
    with pytest.raises(ClipflowError, match="no split 'val'"):
        evaluate(tmp / "model", tmp / "data", tmp / "out3", odd)


def test_any_open_clip_checkpoint_and_registry_uri_can_be_evaluated(evaluated):
    tmp, first, _, params = evaluated
    # a bare open_clip checkpoint: weights only, the config named by the caller
    state = torch.load(tmp / "model/checkpoint.pt", weights_only=True)["state_dict"]
    torch.save({"state_dict": state}, tmp / "bare.pt")
    with pytest.raises(ClipflowError, match="does not name its model config"):
        evaluate(tmp / "bare.pt", tmp / "data", tmp / "bare", params)
    bare = evaluate(tmp / "bare.pt", tmp / "data", tmp / "bare", params, model_config="CLIP-Tiny")
    assert bare.metrics == pytest.approx(first.metrics)

    with mlflow.start_run():
        logged = log_clip_model(tmp / "model")
    version = mlflow.register_model(logged, "clip-eval").version
    mlflow.MlflowClient().set_registered_model_alias("clip-eval", "champion", version)
    registry = evaluate("models:/clip-eval@champion", tmp / "data", tmp / "registry", params)
    assert registry.metrics == pytest.approx(first.metrics)


def _unit_rows(count: int, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(count, 16, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_embeddings_that_no_ranking_can_tell_apart_are_refused():
    spread = _unit_rows(50)
    assert check_rankable(spread, "image embeddings") is spread
    assert check_rankable(spread[:1], "image embeddings") is not None  # one row: nothing to tie with
    with_nan = spread.clone()
    with_nan[7, 3] = float("nan")
    with pytest.raises(ClipflowError, match="1 of 50 image embeddings are not finite"):
        check_rankable(with_nan, "image embeddings")
    # normalize() leaves a zero vector zero: what zeroed projections give
    with_zero = torch.nn.functional.normalize(torch.cat([spread[:49], torch.zeros(1, 16)]), dim=-1)
    with pytest.raises(ClipflowError, match="collapsed: 1 of 50 caption embeddings are zero vectors"):
        check_rankable(with_zero, "caption embeddings")
    one_point = torch.nn.functional.normalize(spread[:1] + 1e-7 * _unit_rows(50, seed=1), dim=-1)
    with pytest.raises(ClipflowError, match="collapsed: all 50 image embeddings are one point"):
        check_rankable(one_point, "image embeddings")
