"""The distribution-shift report: zero-shot and a linear probe, in distribution and under shift.

As the CLIP paper set zero-shot CLIP beside a logistic regression fitted on ImageNet and read both on
ImageNet-Sketch and the other shifted sets, this reads both on the built-in test split and on its shifted
variant, the `shift` split (outlines only, textured backgrounds, other sizes: `clipflow.data.builtin`):

- zero-shot classifies among every label of the data with the default templates, as the `seen` set does;
- the linear probe is fitted on the frozen image features of up to `evaluate.linear_probe.max_train`
  training images, evenly spread over the split (`clipflow.evaluate.linear_probe`).

Effective robustness here is how much less top-1 zero-shot loses under the shift than the probe does on the
same features, `(zs_shifted - zs_in) - (probe_shifted - probe_in)`: positive when zero-shot is the more robust.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from clipflow.data.builtin import SHIFT_SPLIT
from clipflow.data.pairs import ShardPairs
from clipflow.evaluate.embeddings import SplitEmbeddings
from clipflow.evaluate.linear_probe import LinearProbe, fit_linear_probe
from clipflow.evaluate.zeroshot import zeroshot
from clipflow.metric_names import EFFECTIVE_ROBUSTNESS, SHIFT_METHODS, shift_metric
from clipflow.model import ClipModel
from clipflow.params import EvaluateParams, ZeroshotSet

IN_DISTRIBUTION_SPLIT = "test"
TRAIN_SPLIT = "train"
LABEL_FIELD = "label"


@dataclass(frozen=True)
class ShiftReport:
    """Top-1 per method (`zeroshot`, `linear_probe`) and where: `in_distribution`, `shifted`, each kind of shift."""

    top1: dict[str, dict[str, float]]
    samples: dict[str, int]  # images per where
    probe_train_images: int
    probe_l2: float

    @property
    def effective_robustness(self) -> float:
        zeroshot, probe = self.top1["zeroshot"], self.top1["linear_probe"]
        return (zeroshot["shifted"] - zeroshot["in_distribution"]) - (probe["shifted"] - probe["in_distribution"])

    def metrics(self) -> dict[str, float]:
        metrics = {shift_metric(method, where): v for method in SHIFT_METHODS for where, v in self.top1[method].items()}
        return metrics | {EFFECTIVE_ROBUSTNESS: self.effective_robustness}

    def to_dict(self) -> dict:
        return asdict(self) | {"effective_robustness": self.effective_robustness}


def shift_report(
    clip: ClipModel, images: SplitEmbeddings, data_dir: Path, metadata: pd.DataFrame, settings: EvaluateParams
) -> ShiftReport:
    """Zero-shot and the linear probe on the test split and on the `shift` split of `data_dir`."""
    probe_settings = settings.linear_probe
    # Labels and kinds come from the metadata table in memory, not from each sample's record in the shards.
    facts = metadata.set_index("key")
    train = ShardPairs(data_dir, TRAIN_SPLIT, clip.preprocess, clip.tokenizer)
    count = min(probe_settings.max_train, len(train))
    positions = torch.linspace(0, len(train) - 1, count).round().long().unique().tolist()
    features = train.embed_images(clip.encode_images, settings.batch_size, "linear probe train", positions)
    labels = _labels(facts, [train.index.keys[i] for i in positions])
    probe = fit_linear_probe(features, labels, probe_settings.l2, probe_settings.max_iter)
    in_distribution = _hits(clip, images, metadata, facts, settings, probe, IN_DISTRIBUTION_SPLIT)
    shifted = _hits(clip, images, metadata, facts, settings, probe, SHIFT_SPLIT)
    pairs, _ = images(SHIFT_SPLIT)
    kinds = facts.loc[list(pairs.index.keys), "shift"].tolist()
    masks = {"shifted": torch.ones(len(kinds), dtype=torch.bool)}
    masks |= {kind: torch.tensor([k == kind for k in kinds]) for kind in dict.fromkeys(kinds)}
    top1 = {
        method: {"in_distribution": in_distribution[method].float().mean().item()}
        | {where: shifted[method][mask].float().mean().item() for where, mask in masks.items()}
        for method in SHIFT_METHODS
    }
    samples = {"in_distribution": len(in_distribution["zeroshot"])} | {w: int(m.sum()) for w, m in masks.items()}
    return ShiftReport(top1, samples, probe.samples, probe.l2)


def _hits(
    clip: ClipModel,
    images: SplitEmbeddings,
    metadata: pd.DataFrame,
    facts: pd.DataFrame,
    settings: EvaluateParams,
    probe: LinearProbe,
    split: str,
) -> dict[str, torch.Tensor]:
    """Per method, whether its top-1 is right on each image of `split`: (N,) bool."""
    spec = ZeroshotSet(split=split, label_field=LABEL_FIELD)
    pairs, embeddings = images(split)
    return {
        "zeroshot": zeroshot(clip, images, metadata, split, spec, settings.templates).top1_hits,
        "linear_probe": probe.top1_hits(embeddings, _labels(facts, list(pairs.index.keys))),
    }


def _labels(facts: pd.DataFrame, keys: list[str]) -> list[str]:
    """The label of each sample key, as text (as zero-shot reads labels)."""
    return facts.loc[keys, LABEL_FIELD].astype(str).tolist()
