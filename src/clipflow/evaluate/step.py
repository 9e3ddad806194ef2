"""The evaluate step: zero-shot classification sets, retrieval both ways, probes, and reports.

Output folder:

    metrics.json               every metric (clipflow names), per-template accuracies, probe details
    clip_benchmark/*.json      the same results in CLIP_benchmark's result format and metric names
    confusion_<set>.png        row-normalised confusion matrix of each zero-shot set with per-class recall
                               (beyond 16 classes: per-class recall and the top confusions)
    retrieval_grid.png         captions with their top-5 images, images with their top-5 captions
    probes.png                 accuracy per probe with its 95% interval, against chance
    summary.md                 a Markdown summary with per-class tables and the figures (the Kubeflow UI shows it)
                               and, on data with the built-in `shift` split, the distribution-shift report
    per_item.parquet           per image (or caption) and metric: the hit behind each mean, for the gate's bootstrap

When `train.pretrained` names the model fine-tuning started from, that model is evaluated too, on the same
sets with the same prompts (`baseline_<metric>` in metrics.json, its rows in per_item.parquet), and the
WiSE-FT mixes of the two are scored (`clipflow.evaluate.wiseft`):

    wiseft.json                every `a` with its target and retention top-1, and the chosen `a`
    wiseft.png                 the same curve, the chosen `a` marked
    wiseft_model/checkpoint.pt the chosen mix, when it is not the fine-tuned model itself (a != 1); logged as
                               the run's MLflow model (tag `wiseft_alpha`), not among the evaluation files

The main evaluation (metrics.json, figures, summary) is then of the chosen weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from pathlib import Path

import pandas as pd

from clipflow import model as clip_model
from clipflow import tracking
from clipflow.artifacts import (
    EVALUATION_ARTIFACTS,
    METADATA_FILE,
    PER_ITEM_BASELINE,
    PER_ITEM_FILE,
    PER_ITEM_MODEL,
    WISEFT_ALPHA_TAG,
)
from clipflow.errors import ClipflowError
from clipflow.evaluate import plots, wiseft
from clipflow.evaluate.embeddings import SplitEmbeddings
from clipflow.evaluate.plan import evaluation_sets
from clipflow.evaluate.probes import PROBE_SPLIT, probes
from clipflow.evaluate.report import Evaluation, write_figures, write_results
from clipflow.evaluate.retrieval import retrieval
from clipflow.evaluate.shift import SHIFT_SPLIT, shift_report
from clipflow.evaluate.zeroshot import zeroshot
from clipflow.model import ClipModel
from clipflow.params import EvaluateParams, Params
from clipflow.registry.models import load_model, load_starting_model, log_clip_model

# Beside the evaluation files, never logged as one of them: the chosen WiSE-FT weights are the run's model.
WISEFT_MODEL_DIR = "wiseft_model"


def evaluate(
    model_ref: str | Path,
    data_dir: str | Path,
    output_dir: str | Path,
    params: Params,
    mlflow_run_id: str | None = None,
    model_config: str | None = None,
) -> Evaluation:
    """Evaluate a checkpoint path or MLflow model URI on an ingested data directory.

    Args:
        model_ref: a checkpoint file or folder, or `models:/NAME@ALIAS`.
        data_dir: an ingested data directory.
        output_dir: where the reports go (see the module docstring).
        params: all params; `evaluate` drives the work, `train.pretrained` names the baseline.
        mlflow_run_id: a run that receives the metrics and the report files (and the chosen WiSE-FT model).
        model_config: the open_clip config name, for checkpoints that do not record it.

    Returns:
        The `Evaluation`: per zero-shot set, retrieval and probe results, `metrics` (name -> value),
        the `baseline` and `wiseft` curve when fine-tuning started from a model, the `model_uri` of a
        logged WiSE-FT mix, the report `files` and the `seconds` it took.
    """
    started = time.perf_counter()
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    if not (data_dir / METADATA_FILE).is_file():
        raise ClipflowError(f"not an ingested data directory (no {METADATA_FILE}): {data_dir}")
    if mlflow_run_id:
        _check_run_exists(mlflow_run_id, params)
    clip = load_model(model_ref, model_config, params.train.model_cache)
    # With no training steps the model is its starting model: no baseline to beat, nothing to mix.
    start = load_starting_model(params.train) if params.train.steps else None
    output_dir.mkdir(parents=True, exist_ok=True)
    # An earlier evaluation's curve and mix in this folder are not this one's: they must not be logged with it.
    shutil.rmtree(output_dir / WISEFT_MODEL_DIR, ignore_errors=True)
    for stale in (wiseft.WISEFT_FILE, wiseft.WISEFT_PLOT):
        (output_dir / stale).unlink(missing_ok=True)
    metadata = pd.read_parquet(data_dir / METADATA_FILE)
    # The built-in data's own zero-shot sets (its held-out compositions) join those of `evaluate.zeroshot`.
    settings = dataclasses.replace(params.evaluate, zeroshot=evaluation_sets(data_dir, params.evaluate))
    images = SplitEmbeddings(clip, data_dir, settings.batch_size)
    baseline = curve = None
    if start is not None:
        baseline = _measure(params.train.pretrained, start, data_dir, metadata, settings)
    if baseline is not None and settings.wiseft.alphas:
        target = wiseft.target_set(params, settings.zeroshot)
        curve = wiseft.curve(start, clip, images, baseline.zeroshot, data_dir, metadata, settings, target)
    chosen, model_name = clip, str(model_ref)
    if curve is not None and curve.chosen != 1.0:
        chosen = wiseft.mix(start, clip, curve.chosen)
        images = SplitEmbeddings(chosen, data_dir, settings.batch_size)
        model_name = f"WiSE-FT a={curve.chosen:g}: {params.train.pretrained} towards {model_ref}"
    evaluation = dataclasses.replace(
        _measure(model_name, chosen, data_dir, metadata, settings, images), baseline=baseline, wiseft=curve
    )
    figures = write_figures(evaluation, output_dir)
    figures.append(_write_per_item(evaluation, output_dir))
    checkpoint = None
    if curve is not None:
        figures += [curve.write(output_dir), plots.wiseft_curve(curve, output_dir / wiseft.WISEFT_PLOT)]
        if chosen is not clip:
            extra = {WISEFT_ALPHA_TAG: curve.chosen, "pretrained": params.train.pretrained, "finetuned": str(model_ref)}
            checkpoint = clip_model.save_checkpoint(output_dir / WISEFT_MODEL_DIR, chosen.model, chosen.name, extra)
            figures.append(checkpoint)
    with _active_run(mlflow_run_id):
        model_uri = _log_mix(checkpoint, curve) if mlflow_run_id and checkpoint else None
        evaluation = dataclasses.replace(
            evaluation, model_uri=model_uri, seconds=round(time.perf_counter() - started, 2)
        )
        # metrics.json and summary.md last, so that they carry the step's whole time and the mix's URI.
        files = [*figures, *write_results(evaluation, output_dir)]
        if mlflow_run_id:
            _log(evaluation, output_dir, data_dir, settings)
    return dataclasses.replace(evaluation, files=[str(path) for path in files])


def _measure(
    name: str,
    clip: ClipModel,
    data_dir: Path,
    metadata: pd.DataFrame,
    settings: EvaluateParams,
    images: SplitEmbeddings | None = None,
) -> Evaluation:
    """One model on every zero-shot set, retrieval and (on data that has their splits) the probes and the
    distribution-shift report."""
    images = images or SplitEmbeddings(clip, data_dir, settings.batch_size)
    splits = set(metadata["split"])
    return Evaluation(
        model=name,
        zeroshot={
            set_name: zeroshot(clip, images, metadata, set_name, spec, settings.templates)
            for set_name, spec in settings.zeroshot.items()
        },
        retrieval=retrieval(
            clip,
            images,
            settings.retrieval_split,
            settings.batch_size,
            settings.recall_k,
            settings.chunk_size,
            settings.retrieval_label_field,
        ),
        probes=probes(clip, images) if PROBE_SPLIT in splits else {},
        shift=shift_report(clip, images, data_dir, metadata, settings) if SHIFT_SPLIT in splits else None,
    )


def _write_per_item(evaluation: Evaluation, output_dir: Path) -> Path:
    """per_item.parquet: the hits of the evaluated model and, when there is one, of its baseline."""
    rows = []
    for who, measured in ((PER_ITEM_MODEL, evaluation), (PER_ITEM_BASELINE, evaluation.baseline)):
        if measured is None:
            continue
        results = [(name, result.keys, result.per_item()) for name, result in measured.zeroshot.items()]
        results.append((measured.retrieval.split, measured.retrieval.keys, measured.retrieval.per_item()))
        for set_name, keys, per_item in results:
            for metric, hits in per_item.items():
                columns = {"model": who, "metric": metric, "set": set_name, "key": keys, "hit": hits.numpy()}
                rows.append(pd.DataFrame(columns).astype({"hit": "int8"}))
    path = output_dir / PER_ITEM_FILE
    pd.concat(rows, ignore_index=True).to_parquet(path, index=False)
    return path


def _active_run(run_id: str | None) -> contextlib.AbstractContextManager:
    """The MLflow run that receives the evaluation, as the active run; nothing without one."""
    if run_id is None:
        return contextlib.nullcontext()
    import mlflow

    return mlflow.start_run(run_id=run_id)


def _log_mix(checkpoint: Path, curve: wiseft.WiseftCurve) -> str:
    """Log the chosen WiSE-FT mix as an MLflow model of the active run, tagged with its `a`; returns its URI."""
    import mlflow

    model_uri = log_clip_model(checkpoint)
    mlflow.set_logged_model_tags(model_uri.removeprefix("models:/"), {WISEFT_ALPHA_TAG: str(curve.chosen)})
    return model_uri


def _log(evaluation: Evaluation, output_dir: Path, data_dir: Path, settings: EvaluateParams) -> None:
    """Log the metrics, the WiSE-FT curve and the evaluation files to the active run."""
    import mlflow

    # `eval/` groups them apart from the training's charts; metrics.json keeps the plain names.
    mlflow.log_metrics({f"eval/{name}": value for name, value in evaluation.metrics.items()})
    if evaluation.wiseft:
        mlflow.set_tag(WISEFT_ALPHA_TAG, str(evaluation.wiseft.chosen))
        for point in evaluation.wiseft.points:
            step = round(point.alpha * 100)  # MLflow steps are integers: a in percent
            mlflow.log_metric("wiseft/target_top1", point.target_top1, step=step)
            if point.retention_top1 is not None:
                mlflow.log_metric("wiseft/retention_top1", point.retention_top1, step=step)
    for path in sorted(output_dir.iterdir()):
        if path.name == WISEFT_MODEL_DIR:
            continue
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=f"{EVALUATION_ARTIFACTS}/{path.name}")
        else:
            mlflow.log_artifact(str(path), artifact_path=EVALUATION_ARTIFACTS)
    # The linear probe's training images are the run's training input, logged as such already.
    splits = [spec.split for spec in settings.zeroshot.values()] + [settings.retrieval_split, PROBE_SPLIT, SHIFT_SPLIT]
    tracking.log_data(data_dir, splits, "evaluation")


def _check_run_exists(run_id: str, params: Params) -> None:
    """Fail before the work, not after it, when the run to log to is not in this tracking store."""
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking.setup(params.tracking)
    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        raise ClipflowError(f"MLflow run {run_id} not found at {mlflow.get_tracking_uri()}") from None
