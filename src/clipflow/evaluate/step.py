"""The evaluate step: zero-shot classification sets, retrieval both ways, probes, and reports.

Output folder:

    metrics.json               every metric (clipflow names), per-template accuracies, probe details
    clip_benchmark/*.json      the same results in CLIP_benchmark's result format and metric names
    confusion_<set>.png        row-normalised confusion matrix of each zero-shot set with per-class recall
                               (beyond 16 classes: per-class recall and the top confusions)
    retrieval_grid.png         captions with their top-5 images, images with their top-5 captions
    probes.png                 accuracy per probe with its 95% interval, against chance
    summary.md                 a Markdown summary with per-class tables and the figures (the Kubeflow UI shows it)
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pandas as pd

from clipflow import tracking
from clipflow.artifacts import EVALUATION_ARTIFACTS, METADATA_FILE
from clipflow.errors import ClipflowError
from clipflow.evaluate.embeddings import SplitEmbeddings
from clipflow.evaluate.probes import PROBE_SPLIT, probes
from clipflow.evaluate.report import Evaluation, write_figures, write_results
from clipflow.evaluate.retrieval import retrieval
from clipflow.evaluate.zeroshot import zeroshot
from clipflow.params import Params
from clipflow.registry.models import load_model


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
        params: all params; `evaluate` drives the work.
        mlflow_run_id: a run that receives the metrics and the report files.
        model_config: the open_clip config name, for checkpoints that do not record it.

    Returns:
        The `Evaluation`: per zero-shot set, retrieval and probe results, `metrics` (name -> value),
        the report `files` and the `seconds` it took.
    """
    started = time.perf_counter()
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    if not (data_dir / METADATA_FILE).is_file():
        raise ClipflowError(f"not an ingested data directory (no {METADATA_FILE}): {data_dir}")
    if mlflow_run_id:
        _check_run_exists(mlflow_run_id, params)
    clip = load_model(model_ref, model_config)
    output_dir.mkdir(parents=True, exist_ok=True)
    metadata = pd.read_parquet(data_dir / METADATA_FILE)
    images = SplitEmbeddings(clip, data_dir, params.evaluate.batch_size)
    settings = params.evaluate
    evaluation = Evaluation(
        model=str(model_ref),
        zeroshot={
            name: zeroshot(clip, images, metadata, name, spec, settings.templates)
            for name, spec in settings.zeroshot.items()
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
        probes=probes(clip, images) if PROBE_SPLIT in set(metadata["split"]) else {},
    )
    figures = write_figures(evaluation, output_dir)
    evaluation = dataclasses.replace(evaluation, seconds=round(time.perf_counter() - started, 2))
    files = [*figures, *write_results(evaluation, output_dir)]
    if mlflow_run_id:
        import mlflow

        with mlflow.start_run(run_id=mlflow_run_id):
            # `eval/` groups them apart from the training's charts; metrics.json keeps the plain names.
            mlflow.log_metrics({f"eval/{name}": value for name, value in evaluation.metrics.items()})
            mlflow.log_artifacts(str(output_dir), artifact_path=EVALUATION_ARTIFACTS)
            splits = [spec.split for spec in settings.zeroshot.values()] + [settings.retrieval_split, PROBE_SPLIT]
            tracking.log_data(data_dir, splits, "evaluation")
    return dataclasses.replace(evaluation, files=[str(path) for path in files])


def _check_run_exists(run_id: str, params: Params) -> None:
    """Fail before the work, not after it, when the run to log to is not in this tracking store."""
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking.setup(params.tracking)
    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        raise ClipflowError(f"MLflow run {run_id} not found at {mlflow.get_tracking_uri()}") from None
