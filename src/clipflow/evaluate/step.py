"""The evaluate step: zero-shot on held-out compositions and retrieval on the test split."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from clipflow import tracking
from clipflow.data.pairs import ShardPairs
from clipflow.errors import ClipflowError
from clipflow.evaluate.metrics import recall_at_k, zeroshot_topk
from clipflow.model import ClipModel
from clipflow.params import Params
from clipflow.progress import progress
from clipflow.registry.models import load_model

METRICS_FILE = "metrics.json"


def evaluate(
    model_ref: str | Path,
    data_dir: str | Path,
    output_dir: str | Path,
    params: Params,
    mlflow_run_id: str | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint path or MLflow model URI on an ingested data directory.

    Writes `metrics.json` to `output_dir` and, given a run id, logs the metrics to that MLflow run.

    Returns:
        `metrics` (name -> value, including `zeroshot_chance`), `classes`, `seconds`.
    """
    started = time.perf_counter()
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    if not data_dir.is_dir():
        raise ClipflowError(f"data directory not found: {data_dir}")
    if mlflow_run_id:
        tracking.setup(params.tracking)
    clip = load_model(model_ref)
    batch_size = params.evaluate.batch_size
    classes = [f"{color} {shape}" for color in params.data.colors for shape in params.data.shapes]
    class_index = {name: i for i, name in enumerate(classes)}
    classifier = clip.encode_labels(classes, params.evaluate.templates)

    metrics: dict[str, float] = {"zeroshot_chance": 1.0 / len(classes)}
    for split, name in (("heldout", "zeroshot_top1_heldout"), ("test", "zeroshot_top1_seen")):
        pairs = ShardPairs(data_dir, split, clip.preprocess, clip.tokenizer)
        images = _embed_images(clip, pairs, batch_size, desc=f"evaluate {split}")
        targets = torch.tensor([class_index[pairs.meta(i)["label"]] for i in range(len(pairs))])
        metrics[name] = zeroshot_topk(images, classifier, targets, k=1)
        if split == "test":
            texts = _embed_texts(clip, [pairs.caption(i) for i in range(len(pairs))], batch_size)
            ks = params.evaluate.recall_k
            for k, value in recall_at_k(images, texts, ks).items():
                metrics[f"retrieval_i2t_r{k}"] = value
            for k, value in recall_at_k(texts, images, ks).items():
                metrics[f"retrieval_t2i_r{k}"] = value

    output_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "metrics": metrics,
        "classes": classes,
        "model": str(model_ref),
        "seconds": round(time.perf_counter() - started, 2),
    }
    (output_dir / METRICS_FILE).write_text(json.dumps(result, indent=2))
    if mlflow_run_id:
        import mlflow

        with mlflow.start_run(run_id=mlflow_run_id):
            mlflow.log_metrics(metrics)
            mlflow.log_artifact(str(output_dir / METRICS_FILE), artifact_path="evaluation")
    return result


def _embed_images(clip: ClipModel, pairs: ShardPairs, batch_size: int, desc: str) -> torch.Tensor:
    chunks = []
    starts = range(0, len(pairs), batch_size)
    for start in progress(starts, total=len(starts), desc=desc):
        batch = torch.stack(
            [clip.preprocess(pairs.image(i)) for i in range(start, min(start + batch_size, len(pairs)))]
        )
        chunks.append(clip.encode_images(batch))
    return torch.cat(chunks)


def _embed_texts(clip: ClipModel, texts: list[str], batch_size: int) -> torch.Tensor:
    return torch.cat(
        [clip.encode_text(texts[start : start + batch_size]) for start in range(0, len(texts), batch_size)]
    )
