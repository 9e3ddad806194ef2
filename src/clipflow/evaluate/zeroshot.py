"""Zero-shot classification of a split's images into classes written in words, with a prompt ensemble."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch

from clipflow.errors import ClipflowError
from clipflow.evaluate.embeddings import SplitEmbeddings, check_rankable
from clipflow.evaluate.metrics import (
    ClassRecall,
    classification_report,
    per_class_recall,
    topk_hits,
    zeroshot_topk,
)
from clipflow.metric_names import ZEROSHOT_KINDS, prompt_sensitivity_metric, zeroshot_metric
from clipflow.model import ClipModel
from clipflow.params import ZeroshotSet


@dataclass(frozen=True)
class ZeroshotResult:
    """One zero-shot set: accuracy with the whole prompt ensemble, and with each template alone."""

    name: str
    split: str
    classes: list[str]
    acc1: float
    acc5: float
    mean_per_class_recall: float
    confusion: torch.Tensor  # (true class, predicted class) counts, (C, C)
    per_template_top1: dict[str, float]
    # Per image, for the paired bootstrap of the gate: the samples' keys in split order, and whether top-1 was right.
    keys: list[str]
    top1_hits: torch.Tensor  # (N,) bool

    @property
    def chance(self) -> float:
        """The top-1 of guessing: one class in all of them."""
        return 1.0 / len(self.classes)

    @property
    def prompt_spread(self) -> float:
        """Prompt sensitivity: how far top-1 moves between the best and the worst single template."""
        return max(self.per_template_top1.values()) - min(self.per_template_top1.values())

    def per_class(self) -> list[ClassRecall]:
        """Recall and the most frequent mix-up of each class that has images."""
        return per_class_recall(self.confusion, self.classes)

    def metrics(self) -> dict[str, float]:
        values = (self.acc1, self.acc5, self.mean_per_class_recall, self.chance)
        metrics = {zeroshot_metric(kind, self.name): v for kind, v in zip(ZEROSHOT_KINDS, values, strict=True)}
        return metrics | {prompt_sensitivity_metric(self.name): self.prompt_spread}

    def per_item(self) -> dict[str, torch.Tensor]:
        """The metric of `metrics()` that is a mean over the images, as its (N,) hits in `keys` order."""
        return {f"zeroshot_top1_{self.name}": self.top1_hits}

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "classes": self.classes,
            "per_template_top1": self.per_template_top1,
            "confusion": self.confusion.tolist(),
            "per_class": [asdict(each) for each in self.per_class()],
        }


def zeroshot(
    clip: ClipModel,
    images: SplitEmbeddings,
    metadata: pd.DataFrame,
    name: str,
    spec: ZeroshotSet,
    default_templates: list[str],
) -> ZeroshotResult:
    """Classify the images of `spec.split` among `spec.classes` (default: every label in the metadata)."""
    if spec.label_field not in metadata.columns:
        raise ClipflowError(f"the metadata has no column {spec.label_field!r} to label zero-shot classes")
    # Classes are words in prompts: a column of numbers (a Parquet or JSONL manifest's digits) is read as text.
    classes = spec.classes or sorted({str(label) for label in metadata[spec.label_field].dropna()})
    templates = spec.templates or default_templates
    pairs, embeddings = images(spec.split)
    index = {label: i for i, label in enumerate(classes)}
    labels = [str(pairs.meta(i).get(spec.label_field)) for i in range(len(pairs))]
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ClipflowError(f"split {spec.split!r} has labels outside the class list: {unknown[:5]}")
    targets = torch.tensor([index[label] for label in labels])
    classifier = check_rankable(clip.encode_labels(classes, templates), f"class embeddings of zero-shot set {name!r}")
    scores = embeddings @ classifier.T  # (N, C)
    report = classification_report(scores, targets, top_k=5)
    per_template = {t: zeroshot_topk(embeddings, clip.encode_labels(classes, [t]), targets) for t in templates}
    return ZeroshotResult(
        name=name,
        split=spec.split,
        classes=classes,
        acc1=report["acc1"],
        acc5=report["acc5"],
        mean_per_class_recall=report["mean_per_class_recall"],
        confusion=report["confusion"],
        per_template_top1=per_template,
        keys=list(pairs.index.keys),
        top1_hits=topk_hits(scores, targets, 1),
    )
