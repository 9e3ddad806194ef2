"""The evaluate step: zero-shot classification sets, retrieval both ways, probes, and reports.

Output folder:

    metrics.json               every metric (clipflow names), per-template accuracies, probe details
    clip_benchmark/*.json      the same results in CLIP_benchmark's result format and metric names
    confusion_<set>.png        confusion matrix of each zero-shot set
    retrieval_grid.png         query texts with their top-5 images
    probes.png                 accuracy per probe against chance
    summary.md                 a Markdown summary (the Kubeflow UI shows it)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from clipflow import tracking
from clipflow.artifacts import METADATA_FILE, METRICS_FILE
from clipflow.data.pairs import ShardPairs
from clipflow.errors import ClipflowError
from clipflow.evaluate import plots
from clipflow.evaluate.metrics import classification_report, recall_at_k, zeroshot_topk
from clipflow.model import ClipModel
from clipflow.params import Params, ZeroshotSet
from clipflow.registry.models import load_model

SUMMARY_FILE = "summary.md"
CLIP_BENCHMARK_DIR = "clip_benchmark"
GRID_QUERIES = 6
GRID_TOP_K = 5


def evaluate(
    model_ref: str | Path,
    data_dir: str | Path,
    output_dir: str | Path,
    params: Params,
    mlflow_run_id: str | None = None,
    model_config: str | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint path or MLflow model URI on an ingested data directory.

    Args:
        model_ref: a checkpoint file or folder, or `models:/NAME@ALIAS`.
        data_dir: an ingested data directory.
        output_dir: where the reports go (see the module docstring).
        params: all params; `evaluate` drives the work.
        mlflow_run_id: a run that receives the metrics and the report files.
        model_config: the open_clip config name, for checkpoints that do not record it.

    Returns:
        `metrics` (name -> value), `zeroshot` (per set: classes, per-template accuracy,
        confusion matrix), `probes`, `files`, `seconds`.
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
    images = _SplitEmbeddings(clip, data_dir, params.evaluate.batch_size)

    metrics: dict[str, float] = {}
    zeroshot: dict[str, Any] = {}
    files: list[Path] = []
    benchmark: list[dict[str, Any]] = []
    for name, spec in params.evaluate.zeroshot.items():
        result = _zeroshot(clip, images, metadata, spec, params.evaluate.templates)
        metrics[f"zeroshot_top1_{name}"] = result["acc1"]
        metrics[f"zeroshot_top5_{name}"] = result["acc5"]
        metrics[f"zeroshot_mean_per_class_recall_{name}"] = result["mean_per_class_recall"]
        metrics[f"zeroshot_chance_{name}"] = 1.0 / len(result["classes"])
        metrics[f"prompt_sensitivity_{name}"] = result["prompt_spread"]
        zeroshot[name] = result
        benchmark.append(_benchmark_record(name, "zeroshot_classification", result, model_ref))
        files.append(
            plots.confusion_matrix(
                result["confusion"],
                result["classes"],
                f"zero-shot '{name}' ({spec.split})",
                output_dir / f"confusion_{name}.png",
            )
        )

    retrieval = _retrieval(clip, images, params)
    metrics.update(retrieval["metrics"])
    benchmark.append(_benchmark_record(params.evaluate.retrieval_split, "zeroshot_retrieval", retrieval, model_ref))
    files.append(plots.retrieval_grid(*retrieval["grid"], output_dir / "retrieval_grid.png"))

    probes = _probes(clip, images) if "probe" in set(metadata["split"]) else {}
    for kind, result in probes.items():
        metrics[f"probe_{kind}"] = result["accuracy"]
    if probes:
        accuracy = {kind: r["accuracy"] for kind, r in probes.items()}
        chance = {kind: r["chance"] for kind, r in probes.items()}
        files.append(plots.probe_bars(accuracy, chance, output_dir / "probes.png"))

    for record in benchmark:
        path = output_dir / CLIP_BENCHMARK_DIR / f"{record['dataset']}_{record['task']}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(record, indent=2))
        files.append(path)
    result = {
        "metrics": metrics,
        "zeroshot": {
            name: {
                "split": params.evaluate.zeroshot[name].split,
                "classes": r["classes"],
                "per_template_top1": r["per_template"],
                "confusion": r["confusion"].tolist(),
            }
            for name, r in zeroshot.items()
        },
        "probes": probes,
        "model": str(model_ref),
        "seconds": round(time.perf_counter() - started, 2),
    }
    (output_dir / METRICS_FILE).write_text(json.dumps(result, indent=2))
    (output_dir / SUMMARY_FILE).write_text(markdown_summary(result))
    result["files"] = [str(p) for p in [*files, output_dir / METRICS_FILE, output_dir / SUMMARY_FILE]]
    if mlflow_run_id:
        import mlflow

        with mlflow.start_run(run_id=mlflow_run_id):
            mlflow.log_metrics(metrics)
            mlflow.log_artifacts(str(output_dir), artifact_path="evaluation")
    return result


def _check_run_exists(run_id: str, params: Params) -> None:
    """Fail before the work, not after it, when the run to log to is not in this tracking store."""
    import mlflow
    from mlflow.exceptions import MlflowException

    tracking.setup(params.tracking)
    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        raise ClipflowError(f"MLflow run {run_id} not found at {mlflow.get_tracking_uri()}") from None


class _SplitEmbeddings:
    """Image embeddings per split, computed once and shared by every metric that needs them."""

    def __init__(self, clip: ClipModel, data_dir: Path, batch_size: int):
        self.clip, self.data_dir, self.batch_size = clip, data_dir, batch_size
        self._cache: dict[str, tuple[ShardPairs, torch.Tensor]] = {}

    def __call__(self, split: str) -> tuple[ShardPairs, torch.Tensor]:
        if split not in self._cache:
            try:
                pairs = ShardPairs(self.data_dir, split, self.clip.preprocess, self.clip.tokenizer)
            except FileNotFoundError:
                raise ClipflowError(f"the data has no split {split!r} to evaluate") from None
            embeddings = pairs.embed_images(self.clip.encode_images, self.batch_size, desc=f"evaluate {split}")
            self._cache[split] = (pairs, embeddings)
        return self._cache[split]


def _zeroshot(
    clip: ClipModel, images: _SplitEmbeddings, metadata: pd.DataFrame, spec: ZeroshotSet, default_templates: list[str]
) -> dict[str, Any]:
    if spec.label_field not in metadata.columns:
        raise ClipflowError(f"the metadata has no column {spec.label_field!r} to label zero-shot classes")
    classes = spec.classes or sorted(metadata[spec.label_field].dropna().unique())
    templates = spec.templates or default_templates
    pairs, embeddings = images(spec.split)
    index = {name: i for i, name in enumerate(classes)}
    labels = [pairs.meta(i).get(spec.label_field) for i in range(len(pairs))]
    unknown = sorted({str(label) for label in labels} - set(index))
    if unknown:
        raise ClipflowError(f"split {spec.split!r} has labels outside the class list: {unknown[:5]}")
    targets = torch.tensor([index[label] for label in labels])
    report = classification_report(embeddings @ clip.encode_labels(classes, templates).T, targets, top_k=5)
    # Prompt sensitivity: the same task with each template alone.
    per_template = {t: zeroshot_topk(embeddings, clip.encode_labels(classes, [t]), targets) for t in templates}
    spread = max(per_template.values()) - min(per_template.values())
    return {**report, "classes": classes, "per_template": per_template, "prompt_spread": spread}


def _retrieval(clip: ClipModel, images: _SplitEmbeddings, params: Params) -> dict[str, Any]:
    pairs, image_embeddings = images(params.evaluate.retrieval_split)
    captions = [pairs.caption(i) for i in range(len(pairs))]
    batch = params.evaluate.batch_size
    texts = torch.cat([clip.encode_text(captions[s : s + batch]) for s in range(0, len(captions), batch)])
    ks, chunk = params.evaluate.recall_k, params.evaluate.chunk_size
    i2t = recall_at_k(image_embeddings, texts, ks, chunk_size=chunk)
    t2i = recall_at_k(texts, image_embeddings, ks, chunk_size=chunk)
    metrics = {f"retrieval_i2t_r{k}": v for k, v in i2t.items()} | {f"retrieval_t2i_r{k}": v for k, v in t2i.items()}

    # A handful of distinct captions, each with its top images; an image is a hit when its own
    # caption is the query text (several images share a caption in the built-in data).
    queries = list(dict.fromkeys(captions))[:GRID_QUERIES]
    query_embeddings = clip.encode_text(queries)
    top = (query_embeddings @ image_embeddings.T).topk(min(GRID_TOP_K, len(pairs)), dim=1).indices
    grid_images = [[pairs.image(int(i)) for i in row] for row in top]
    hits = [[captions[int(i)] == query for i in row] for query, row in zip(queries, top, strict=True)]
    return {
        "metrics": metrics,
        "i2t": i2t,
        "t2i": t2i,
        "grid": (queries, grid_images, hits),
    }


def _probes(clip: ClipModel, images: _SplitEmbeddings) -> dict[str, dict[str, float]]:
    """Accuracy of picking the true caption among each probe scene's candidates, per probe kind."""
    pairs, embeddings = images("probe")
    outcomes: dict[str, list[bool]] = {}
    chance: dict[str, float] = {}
    for i in range(len(pairs)):
        meta = pairs.meta(i)
        scores = clip.encode_text(meta["candidates"]) @ embeddings[i]
        outcomes.setdefault(meta["probe"], []).append(int(scores.argmax()) == meta["answer"])
        chance[meta["probe"]] = 1.0 / len(meta["candidates"])
    return {
        kind: {"accuracy": sum(hits) / len(hits), "chance": chance[kind], "samples": len(hits)}
        for kind, hits in outcomes.items()
    }


def _benchmark_record(dataset: str, task: str, result: dict[str, Any], model_ref: str | Path) -> dict[str, Any]:
    """A result in CLIP_benchmark's JSON format, with its metric names."""
    if task == "zeroshot_classification":
        metrics = {key: result[key] for key in ("acc1", "acc5", "mean_per_class_recall")}
    else:
        # CLIP_benchmark names retrieval by what is retrieved: images for a text query.
        metrics = {f"image_retrieval_recall@{k}": v for k, v in result["t2i"].items()}
        metrics |= {f"text_retrieval_recall@{k}": v for k, v in result["i2t"].items()}
    return {"dataset": dataset, "model": str(model_ref), "task": task, "metrics": metrics, "language": "en"}


def markdown_summary(result: dict[str, Any]) -> str:
    """The evaluation in a few Markdown tables."""
    metrics = result["metrics"]
    lines = [
        "# Evaluation",
        "",
        f"Model: `{result['model']}`",
        "",
        "| zero-shot set | top-1 | top-5 | mean per-class recall | chance | prompt spread |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in result["zeroshot"]:
        lines.append(
            f"| {name} | {metrics[f'zeroshot_top1_{name}']:.3f} | {metrics[f'zeroshot_top5_{name}']:.3f} "
            f"| {metrics[f'zeroshot_mean_per_class_recall_{name}']:.3f} | {metrics[f'zeroshot_chance_{name}']:.3f} "
            f"| {metrics[f'prompt_sensitivity_{name}']:.3f} |"
        )
    recall = sorted(k for k in metrics if k.startswith("retrieval_"))
    lines += ["", "| retrieval | value |", "| --- | --- |", *(f"| {k} | {metrics[k]:.3f} |" for k in recall)]
    if result["probes"]:
        lines += ["", "| probe | accuracy | chance |", "| --- | --- | --- |"]
        lines += [f"| {kind} | {r['accuracy']:.3f} | {r['chance']:.3f} |" for kind, r in result["probes"].items()]
    return "\n".join(lines) + "\n"
