"""The evaluate step on real shards: metric names, CLIP_benchmark export, plots, MLflow logging."""

import json
import re

import mlflow
import pytest
import torch
from PIL import Image

from clipflow import model as clip_model
from clipflow import tracking
from clipflow.data.builtin import SHIFTS
from clipflow.data.ingest import ingest
from clipflow.data.shards import ShardIndex
from clipflow.errors import ClipflowError
from clipflow.evaluate import plots
from clipflow.evaluate.embeddings import SplitEmbeddings, check_rankable
from clipflow.evaluate.probes import probe_result
from clipflow.evaluate.report import markdown_summary
from clipflow.evaluate.retrieval import OTHER, PAIR, SAME_LABEL, retrieval
from clipflow.evaluate.step import evaluate
from clipflow.metric_names import EFFECTIVE_ROBUSTNESS, SHIFT_METHODS, SHIFT_WHERE, shift_metric
from clipflow.registry.models import load_model, log_clip_model


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, small_params):
    tmp = tmp_path_factory.mktemp("evaluate")
    ingest("builtin", tmp / "data", small_params.data)
    torch.manual_seed(0)  # one random init every run, so what the retrieval grid holds is the same each time
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
    # the configured set, then the built-in data's own held-out compositions
    assert list(result.zeroshot) == [*small_params.evaluate.zeroshot, "heldout"]
    for name in result.zeroshot:
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


def test_the_shift_report_sets_zeroshot_beside_a_linear_probe_in_distribution_and_shifted(evaluated, small_params):
    tmp, result, run_id, _ = evaluated
    shift, data = result.shift, small_params.data
    per_kind = data.num_shift // len(SHIFTS)
    assert shift.samples == {"in_distribution": data.num_test, "shifted": data.num_shift} | dict.fromkeys(
        SHIFTS, per_kind
    )
    assert shift.probe_train_images == min(small_params.evaluate.linear_probe.max_train, data.num_train)
    assert shift.probe_l2 in small_params.evaluate.linear_probe.l2
    zeroshot, probe = shift.top1["zeroshot"], shift.top1["linear_probe"]
    # in distribution, zero-shot is the `seen` set: the test split's images, every label, the default templates
    assert zeroshot["in_distribution"] == pytest.approx(result.metrics["zeroshot_top1_seen"])
    for method in SHIFT_METHODS:  # shifted: all of the kinds, a third each
        top1 = shift.top1[method]
        assert top1["shifted"] == pytest.approx(sum(top1[kind] for kind in SHIFTS) / len(SHIFTS))
    # even a random tower's features tell colours apart: the probe fitted on them beats guessing among the labels
    assert probe["in_distribution"] > 2 * result.zeroshot["seen"].chance

    expected = {shift_metric(m, where) for m in SHIFT_METHODS for where in (*SHIFT_WHERE, *SHIFTS)}
    assert {name for name in result.metrics if name.startswith("shift_")} == expected | {EFFECTIVE_ROBUSTNESS}
    drops = (zeroshot["shifted"] - zeroshot["in_distribution"], probe["shifted"] - probe["in_distribution"])
    assert result.metrics[EFFECTIVE_ROBUSTNESS] == pytest.approx(drops[0] - drops[1])
    assert json.loads((tmp / "out/metrics.json").read_text())["shift"]["top1"] == shift.top1
    summary = (tmp / "out/summary.md").read_text()
    assert "## Distribution shift" in summary
    assert f"| sketch | {per_kind} | {zeroshot['sketch']:.3f} | {probe['sketch']:.3f} |" in summary
    logged = mlflow.get_run(run_id).data.metrics
    assert logged[f"eval/{EFFECTIVE_ROBUSTNESS}"] == pytest.approx(result.metrics[EFFECTIVE_ROBUSTNESS])
    assert logged["eval/shift_linear_probe_top1_shifted"] == pytest.approx(probe["shifted"])


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
    tmp, result, run_id, _ = evaluated
    for name in ("confusion_heldout.png", "confusion_seen.png", "retrieval_grid.png", "probes.png"):
        with Image.open(tmp / "out" / name) as image:
            assert image.width > 200 and image.height > 150
    summary = (tmp / "out/summary.md").read_text()
    heldout = result.zeroshot["heldout"]
    # each set by its name, with its number of classes and chance beside its top-1
    assert (
        f"| heldout | heldout | 200 | {len(heldout.classes)} | {heldout.acc1:.3f} | {heldout.chance:.3f} |" in summary
    )
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "evaluation")}
    assert {"evaluation/confusion_heldout.png", "evaluation/retrieval_grid.png", "evaluation/probes.png"} <= logged
    assert "eval/zeroshot_top1_heldout" in mlflow.get_run(run_id).data.metrics


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


def test_probes_carry_n_an_interval_and_where_they_stand_to_chance(evaluated, small_params):
    tmp, result, _, _ = evaluated
    written = json.loads((tmp / "out/metrics.json").read_text())["probes"]
    per_kind = small_params.data.num_probe // 3
    for kind, probe in written.items():
        assert probe["samples"] == per_kind
        assert probe["ci_low"] <= probe["accuracy"] <= probe["ci_high"]
        assert probe["below_chance"] == (probe["ci_high"] < probe["chance"])
        assert probe["description"].startswith("the true caption among ")
        assert f"| {kind} | {probe['description']} | {per_kind} |" in (tmp / "out/summary.md").read_text()
    assert "“" in written["counting"]["description"]  # an example caption from the data


def test_probe_flags_below_chance_only_when_its_whole_interval_is_below():
    below = probe_result("d", correct=2, samples=60, chance=0.25)
    assert below.below_chance and below.versus_chance == "below" and below.ci_high < 0.25
    at = probe_result("d", correct=12, samples=60, chance=0.25)  # 0.20: below chance, within the noise of n = 60
    assert not at.below_chance and at.versus_chance == "at" and at.accuracy < at.chance
    above = probe_result("d", correct=30, samples=60, chance=0.25)
    assert not above.below_chance and above.versus_chance == "above"
    assert above.to_dict()["below_chance"] is False and below.to_dict()["versus_chance"] == "below"


def test_label_level_recall_sits_beside_the_pair_level_names(evaluated, small_params):
    _, result, _, _ = evaluated
    metrics = result.metrics
    for k in small_params.evaluate.recall_k:
        for direction in ("i2t", "t2i"):
            # Its own pair has the query's label, so a pair hit is a label hit.
            assert metrics[f"retrieval_{direction}_r{k}"] <= metrics[f"retrieval_{direction}_label_r{k}"] <= 1.0
    # Forty-odd labels among 200 test pairs: far more queries find their label than their pair.
    assert metrics["retrieval_i2t_label_r10"] > metrics["retrieval_i2t_r10"]


def test_retrieval_grid_frames_pairs_labels_and_others_as_the_data_says(evaluated):
    tmp, result, _, _ = evaluated
    index = ShardIndex.of_split(tmp / "data", "test")
    captions = [index.read(i, "txt").decode() for i in range(len(index))]
    labels = [json.loads(index.read(i, "json"))["label"] for i in range(len(index))]
    grid = result.retrieval.grid
    relations = set()
    for row in grid.text_to_image:
        query = captions.index(row.query)
        assert [found.rank for found in row.retrieved] == [1, 2, 3, 4, 5]
        assert [found.score for found in row.retrieved] == sorted(
            (found.score for found in row.retrieved), reverse=True
        )
        for found in row.retrieved:
            same_label = labels[found.sample] == labels[query]
            expected = PAIR if captions[found.sample] == row.query else SAME_LABEL if same_label else OTHER
            assert found.relation == expected
            relations.add(found.relation)
    for row, text_row in zip(grid.image_to_text, grid.text_to_image, strict=True):
        query = captions.index(text_row.query)  # each image query is the first image of a text query
        shown = [found.item for found in row.retrieved]
        assert len(set(shown)) == len(shown) == 5  # distinct captions
        for found in row.retrieved:
            assert found.item == captions[found.sample]
            same_label = labels[query] in {labels[i] for i, c in enumerate(captions) if c == found.item}
            expected = PAIR if found.item == captions[query] else SAME_LABEL if same_label else OTHER
            assert found.relation == expected
            relations.add(found.relation)
    assert SAME_LABEL in relations  # the case that was framed red before


def test_summary_has_per_class_tables_figures_and_room_for_the_promotion(evaluated):
    tmp, result, _, _ = evaluated
    summary = (tmp / "out/summary.md").read_text()
    written = json.loads((tmp / "out/metrics.json").read_text())["zeroshot"]
    for name, zeroshot in written.items():
        confusion = torch.tensor(zeroshot["confusion"])
        for i in (confusion.sum(dim=1) > 0).nonzero().flatten().tolist():
            recall = confusion[i, i].item() / confusion[i].sum().item()
            assert f"| {zeroshot['classes'][i]} | {confusion[i].sum().item()} | {recall:.3f} |" in summary
        assert f"![confusion matrix of {name}](confusion_{name}.png)" in summary
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", summary):
        assert (tmp / "out" / link).is_file(), link
    assert "`clipflow promote` appends the promotion decision" in summary
    assert "## Promotion" not in summary  # promote adds that section, and replaces everything from it on
    # The Kubeflow UI shows the Markdown alone: figures are named in their folder, not linked.
    away = markdown_summary(result, figures_in="s3://bucket/run/evaluation")
    assert "![" not in away and "`retrieval_grid.png` in `s3://bucket/run/evaluation`" in away


def test_large_class_sets_get_recall_and_top_confusions_instead_of_a_matrix(evaluated, tmp_path):
    _, result, _, _ = evaluated
    seen = result.zeroshot["seen"]
    assert (seen.confusion.sum(dim=1) > 0).sum() > plots.MATRIX_MAX_CLASSES
    with Image.open(plots.confusion_matrix(seen.confusion, seen.classes, "seen", tmp_path / "seen.png")) as image:
        # Two panels of readable rows, not a 48-column matrix two thousand pixels wide.
        assert image.width < 1500
    heldout = result.zeroshot["heldout"]
    with Image.open(plots.confusion_matrix(heldout.confusion, heldout.classes, "h", tmp_path / "h.png")) as image:
        assert image.width < 2000 and image.height < 1000


def test_retrieval_without_labels_counts_pairs_only_and_a_missing_column_is_one_clear_error(evaluated):
    tmp, _, _, params = evaluated
    clip = load_model(tmp / "model")
    images = SplitEmbeddings(clip, tmp / "data", params.evaluate.batch_size)
    plain = retrieval(clip, images, "test", params.evaluate.batch_size, [1, 5], 64, label_field=None)
    assert set(plain.metrics()) == {"retrieval_i2t_r1", "retrieval_i2t_r5", "retrieval_t2i_r1", "retrieval_t2i_r5"}
    relations = {
        found.relation
        for rows in (plain.grid.text_to_image, plain.grid.image_to_text)
        for row in rows
        for found in row.retrieved
    }
    assert SAME_LABEL not in relations
    with pytest.raises(ClipflowError, match="no sample of split 'test' has the label column 'colour'"):
        retrieval(clip, images, "test", params.evaluate.batch_size, [1], 64, label_field="colour")
