"""The evaluation's files: metrics.json, CLIP_benchmark's result format, the Markdown summary and the figures."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipflow.artifacts import METRICS_FILE
from clipflow.evaluate import plots
from clipflow.evaluate.probes import ProbeResult
from clipflow.evaluate.retrieval import RetrievalResult
from clipflow.evaluate.zeroshot import ZeroshotResult

SUMMARY_FILE = "summary.md"
CLIP_BENCHMARK_DIR = "clip_benchmark"


@dataclass(frozen=True)
class Evaluation:
    """Everything the evaluate step measured on one model; `to_dict()` is what metrics.json holds."""

    model: str
    zeroshot: dict[str, ZeroshotResult]
    retrieval: RetrievalResult
    probes: dict[str, ProbeResult]
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for result in self.zeroshot.values():
            metrics |= result.metrics()
        metrics |= self.retrieval.metrics()
        return metrics | {f"probe_{kind}": result.accuracy for kind, result in self.probes.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "zeroshot": {name: result.to_dict() for name, result in self.zeroshot.items()},
            "probes": {kind: result.to_dict() for kind, result in self.probes.items()},
            "model": self.model,
            "seconds": self.seconds,
        }


def write_figures(evaluation: Evaluation, output_dir: Path) -> list[Path]:
    """The confusion matrices, the retrieval grid, the probe bars and the CLIP_benchmark files; returns their paths."""
    files = [
        plots.confusion_matrix(
            result.confusion,
            result.classes,
            f"zero-shot '{name}' ({result.split})",
            output_dir / f"confusion_{name}.png",
        )
        for name, result in evaluation.zeroshot.items()
    ]
    grid = evaluation.retrieval.grid
    files.append(plots.retrieval_grid(grid.queries, grid.images, grid.hits, output_dir / "retrieval_grid.png"))
    if evaluation.probes:
        accuracy = {kind: r.accuracy for kind, r in evaluation.probes.items()}
        chance = {kind: r.chance for kind, r in evaluation.probes.items()}
        files.append(plots.probe_bars(accuracy, chance, output_dir / "probes.png"))
    for record in clip_benchmark_records(evaluation):
        path = output_dir / CLIP_BENCHMARK_DIR / f"{record['dataset']}_{record['task']}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(record, indent=2))
        files.append(path)
    return files


def write_results(evaluation: Evaluation, output_dir: Path) -> list[Path]:
    """metrics.json and summary.md, written last so that they carry the step's whole time."""
    (output_dir / METRICS_FILE).write_text(json.dumps(evaluation.to_dict(), indent=2))
    (output_dir / SUMMARY_FILE).write_text(markdown_summary(evaluation))
    return [output_dir / METRICS_FILE, output_dir / SUMMARY_FILE]


def clip_benchmark_records(evaluation: Evaluation) -> list[dict[str, Any]]:
    """The results in CLIP_benchmark's JSON format, with its metric names."""

    def record(dataset: str, task: str, metrics: dict[str, float]) -> dict[str, Any]:
        return {"dataset": dataset, "model": evaluation.model, "task": task, "metrics": metrics, "language": "en"}

    records = [
        record(
            name,
            "zeroshot_classification",
            {"acc1": r.acc1, "acc5": r.acc5, "mean_per_class_recall": r.mean_per_class_recall},
        )
        for name, r in evaluation.zeroshot.items()
    ]
    retrieval = evaluation.retrieval
    # CLIP_benchmark names retrieval by what is retrieved: images for a text query.
    metrics = {f"image_retrieval_recall@{k}": v for k, v in retrieval.t2i.items()}
    metrics |= {f"text_retrieval_recall@{k}": v for k, v in retrieval.i2t.items()}
    return [*records, record(retrieval.split, "zeroshot_retrieval", metrics)]


def markdown_summary(evaluation: Evaluation) -> str:
    """The evaluation in a few Markdown tables (the Kubeflow UI shows it)."""
    lines = [
        "# Evaluation",
        "",
        f"Model: `{evaluation.model}`",
        "",
        "| zero-shot set | top-1 | top-5 | mean per-class recall | chance | prompt spread |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in evaluation.zeroshot.items():
        lines.append(
            f"| {name} | {r.acc1:.3f} | {r.acc5:.3f} | {r.mean_per_class_recall:.3f} | {1.0 / len(r.classes):.3f} "
            f"| {r.prompt_spread:.3f} |"
        )
    metrics = evaluation.retrieval.metrics()
    lines += ["", "| retrieval | value |", "| --- | --- |", *(f"| {k} | {metrics[k]:.3f} |" for k in sorted(metrics))]
    if evaluation.probes:
        lines += ["", "| probe | accuracy | chance |", "| --- | --- | --- |"]
        lines += [f"| {kind} | {r.accuracy:.3f} | {r.chance:.3f} |" for kind, r in evaluation.probes.items()]
    return "\n".join(lines) + "\n"
