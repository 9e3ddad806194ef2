"""The evaluation's files: metrics.json, CLIP_benchmark's result format, the Markdown summary and the figures."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipflow.artifacts import BASELINE_PREFIX, METRICS_FILE, SUMMARY_FILE
from clipflow.evaluate import plots
from clipflow.evaluate.probes import ProbeResult
from clipflow.evaluate.retrieval import RetrievalResult
from clipflow.evaluate.shift import ShiftReport
from clipflow.evaluate.wiseft import WISEFT_PLOT, WiseftCurve
from clipflow.evaluate.zeroshot import ZeroshotResult
from clipflow.metric_names import ZEROSHOT_CHANCE, probe_metric

CLIP_BENCHMARK_DIR = "clip_benchmark"
RETRIEVAL_GRID_FILE = "retrieval_grid.png"
PROBES_FILE = "probes.png"


@dataclass(frozen=True)
class Evaluation:
    """Everything the evaluate step measured on one model; `to_dict()` is what metrics.json holds."""

    model: str
    zeroshot: dict[str, ZeroshotResult]
    retrieval: RetrievalResult
    probes: dict[str, ProbeResult]
    shift: ShiftReport | None = None  # None: the data has no `shift` split
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    # When fine-tuning started from a model: that model on the same sets with the same prompts, ...
    baseline: Evaluation | None = None
    # ... the WiSE-FT curve (None: not run), and the logged MLflow model of the evaluated weights, when a
    # WiSE-FT mix was chosen and logged (None: the model evaluated is the one given).
    wiseft: WiseftCurve | None = None
    model_uri: str | None = None

    @property
    def metrics(self) -> dict[str, float]:
        """Every metric by its clipflow name, then the baseline's as `baseline_<name>` (chance levels once)."""
        metrics = self.own_metrics
        if self.baseline:
            own = self.baseline.own_metrics
            metrics |= {
                f"{BASELINE_PREFIX}{name}": v for name, v in own.items() if not name.startswith(ZEROSHOT_CHANCE)
            }
        return metrics

    @property
    def own_metrics(self) -> dict[str, float]:
        """The metrics of this model alone."""
        metrics: dict[str, float] = {}
        for result in self.zeroshot.values():
            metrics |= result.metrics()
        metrics |= self.retrieval.metrics()
        metrics |= {probe_metric(kind): result.accuracy for kind, result in self.probes.items()}
        return metrics | (self.shift.metrics() if self.shift else {})

    def to_dict(self) -> dict[str, Any]:
        """metrics.json; `baseline` (its model and per-set details) and `wiseft` only when they were measured."""
        values = {
            "metrics": self.metrics,
            "zeroshot": {name: result.to_dict() for name, result in self.zeroshot.items()},
            "probes": {kind: result.to_dict() for kind, result in self.probes.items()},
            "shift": self.shift.to_dict() if self.shift else None,
            "model": self.model,
            "seconds": self.seconds,
        }
        if self.baseline:
            values["baseline"] = {key: self.baseline.to_dict()[key] for key in ("model", "zeroshot", "probes", "shift")}
        if self.wiseft:
            values["wiseft"] = self.wiseft.to_dict() | {"model_uri": self.model_uri}
        return values


def confusion_file(name: str) -> str:
    return f"confusion_{name}.png"


def write_figures(evaluation: Evaluation, output_dir: Path) -> list[Path]:
    """The confusion matrices, the retrieval grid, the probe bars and the CLIP_benchmark files; returns their paths."""
    files = [
        plots.confusion_matrix(
            result.confusion,
            result.classes,
            f"zero-shot '{name}' ({result.split})",
            output_dir / confusion_file(name),
        )
        for name, result in evaluation.zeroshot.items()
    ]
    files.append(plots.retrieval_grid(evaluation.retrieval.grid, output_dir / RETRIEVAL_GRID_FILE))
    if evaluation.probes:
        files.append(plots.probe_bars(evaluation.probes, output_dir / PROBES_FILE))
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


def markdown_summary(evaluation: Evaluation, figures_in: str | None = None) -> str:
    """The evaluation as Markdown: tables per zero-shot set, class, retrieval direction and probe, with the figures.

    The figures are linked relative to the summary, so they show where the folder is read as a whole.
    `clipflow promote` appends its decision and the registered model's URI as a last section.

    Args:
        evaluation: what the evaluate step measured.
        figures_in: for a copy read away from the folder (the Kubeflow UI's Markdown view), the
            folder's location: each figure is then named there instead of shown.
    """

    def figure(alt: str, name: str) -> str:
        return f"![{alt}]({name})" if figures_in is None else f"Figure: {alt}, `{name}` in `{figures_in}`."

    lines = [
        "# Evaluation",
        "",
        f"Model: `{evaluation.model}`",
        "",
        "`clipflow promote` appends the promotion decision and the registered model URI at the end.",
        "",
        "## Zero-shot classification",
        "",
        "Each set holds the images of one split, classified among the values of its label column;"
        " chance is the top-1 of guessing, 1 / classes.",
        "",
        "| zero-shot set | split | images | classes | top-1 | chance | top-5 | mean per-class recall | prompt spread |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in evaluation.zeroshot.items():
        lines.append(
            f"| {name} | {r.split} | {int(r.confusion.sum())} | {len(r.classes)} | {r.acc1:.3f} | {r.chance:.3f} "
            f"| {r.acc5:.3f} | {r.mean_per_class_recall:.3f} | {r.prompt_spread:.3f} |"
        )
    for name, r in evaluation.zeroshot.items():
        lines += [
            "",
            f"### {name}: per class",
            "",
            figure(f"confusion matrix of {name}", confusion_file(name)),
            "",
            "| class | images | recall | most often taken for | share |",
            "| --- | --- | --- | --- | --- |",
        ]
        for each in r.per_class():
            mixed = f"{each.confused_with} | {each.confused_share:.3f}" if each.confused_with else "- | -"
            lines.append(f"| {each.label} | {each.samples} | {each.recall:.3f} | {mixed} |")
    lines += [*_retrieval_lines(evaluation.retrieval), "", figure("retrieval grid", RETRIEVAL_GRID_FILE)]
    lines += _baseline_lines(evaluation)
    if evaluation.wiseft:
        lines += [*_wiseft_lines(evaluation.wiseft), "", figure("WiSE-FT curve", WISEFT_PLOT)]
    if evaluation.probes:
        lines += [
            "",
            "## Probes",
            "",
            "Where the 95% interval lies against chance: below, at (it holds chance) or above.",
            "",
            "| probe | what it asks | n | accuracy | 95% interval | chance | against chance |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {kind} | {r.description} | {r.samples} | {r.accuracy:.3f} | {r.ci_low:.3f}–{r.ci_high:.3f} "
            f"| {r.chance:.3f} | {'**below**' if r.below_chance else r.versus_chance} |"
            for kind, r in evaluation.probes.items()
        ]
        lines += ["", figure("probe accuracies", PROBES_FILE)]
    if evaluation.shift:
        lines += _shift_lines(evaluation.shift)
    return "\n".join(lines) + "\n"


def _shift_lines(shift: ShiftReport) -> list[str]:
    lines = [
        "",
        "## Distribution shift",
        "",
        "Top-1 on the test split and on its shifted variant (split `shift`), zero-shot and by a linear probe "
        f"(logistic regression on the frozen image features of {shift.probe_train_images} training images, "
        f"L2 {shift.probe_l2:g}). Effective robustness: how much less zero-shot loses under the shift than the "
        f"probe, **{shift.effective_robustness:+.3f}**.",
        "",
        "| images | n | zero-shot | linear probe |",
        "| --- | --- | --- | --- |",
    ]
    zeroshot, probe = shift.top1["zeroshot"], shift.top1["linear_probe"]
    for where, samples in shift.samples.items():
        lines.append(f"| {where.replace('_', ' ')} | {samples} | {zeroshot[where]:.3f} | {probe[where]:.3f} |")
    return lines


def _retrieval_lines(retrieval: RetrievalResult) -> list[str]:
    columns = {"image → text, pair": retrieval.i2t, "text → image, pair": retrieval.t2i}
    meaning = "Recall@k: the share of queries whose own pair is among their k best matches"
    if retrieval.i2t_label:
        columns = {
            "image → text, pair": retrieval.i2t,
            "image → text, label": retrieval.i2t_label,
            "text → image, pair": retrieval.t2i,
            "text → image, label": retrieval.t2i_label,
        }
        meaning += f"; by label, whose k best hold any item of the query's `{retrieval.grid.label_field}`"
    lines = [
        "",
        f"## Retrieval on split `{retrieval.split}`",
        "",
        f"{meaning}.",
        "",
        "| k | " + " | ".join(columns) + " |",
        "| --- " * (len(columns) + 1) + "|",
    ]
    lines += [f"| {k} | " + " | ".join(f"{values[k]:.3f}" for values in columns.values()) + " |" for k in retrieval.i2t]
    return lines


def _baseline_lines(evaluation: Evaluation) -> list[str]:
    """Each metric of the evaluated model beside the starting model's, and the difference."""
    if evaluation.baseline is None:
        return []
    baseline = evaluation.baseline.own_metrics
    lines = [
        "",
        "## Against the starting model",
        "",
        f"The starting model `{evaluation.baseline.model}` on the same sets with the same prompts.",
        "",
        "| metric | fine-tuned | baseline | difference |",
        "| --- | --- | --- | --- |",
    ]
    for name, value in evaluation.own_metrics.items():
        if name in baseline and not name.startswith(ZEROSHOT_CHANCE):
            lines.append(f"| `{name}` | {value:.3f} | {baseline[name]:.3f} | {value - baseline[name]:+.3f} |")
    return lines


def _wiseft_lines(curve: WiseftCurve) -> list[str]:
    retention = f"retention set `{curve.retention}`" if curve.retention else "no retention set"
    lines = [
        "",
        "## WiSE-FT",
        "",
        f"Weights (1 - a) x starting + a x fine-tuned, on target set `{curve.target}` and {retention}; "
        f"chosen: **a = {curve.chosen:g}**, the best target top-1"
        + (
            f" whose retention top-1 is within {curve.max_retention_drop} of the starting model's."
            if curve.retention
            else "."
        ),
        "",
        "| a | target top-1 | retention top-1 |",
        "| --- | --- | --- |",
    ]
    for point in curve.points:
        retained = "-" if point.retention_top1 is None else f"{point.retention_top1:.3f}"
        mark = " (chosen)" if point.alpha == curve.chosen else ""
        lines.append(f"| {point.alpha:g}{mark} | {point.target_top1:.3f} | {retained} |")
    return lines
