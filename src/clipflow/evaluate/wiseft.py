"""WiSE-FT (Wortsman et al., 2022): mix the fine-tuned weights with the ones fine-tuning started from.

Fine-tuning a CLIP on one task gains there and forgets elsewhere. The weights
`(1 - a) * pretrained + a * fine-tuned` trade the two smoothly: `a = 0` is the starting model,
`a = 1` the fine-tuned one, and between them the mix often beats both on the task while keeping
most of what the starting model knew. The evaluate step scores each `a` of `evaluate.wiseft.alphas`
on a target zero-shot set and, when one is named, a retention set, and picks by `choose`:

    the best target top-1 among the `a` whose retention top-1 is at most `max_retention_drop`
    below the starting model's (a = 0); ties go to the smaller `a`, the smaller departure.

`a = 0` always qualifies, so fine-tuning that helped nowhere gives back the starting weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from clipflow.errors import ClipflowError
from clipflow.evaluate.embeddings import SplitEmbeddings
from clipflow.evaluate.zeroshot import ZeroshotResult, zeroshot
from clipflow.model import ClipModel
from clipflow.params import EvaluateParams, Params, ZeroshotSet

if TYPE_CHECKING:
    import torch

WISEFT_FILE = "wiseft.json"
WISEFT_PLOT = "wiseft.png"


@dataclass(frozen=True)
class WiseftPoint:
    """One mix: its `a` and the top-1 it reached on the target set and (when named) the retention set."""

    alpha: float
    target_top1: float
    retention_top1: float | None


@dataclass(frozen=True)
class WiseftCurve:
    """Every `a` scored, and the one `choose` picked; `to_dict()` is what wiseft.json holds."""

    target: str
    retention: str | None
    max_retention_drop: float
    points: list[WiseftPoint]
    chosen: float
    pretrained_retention_top1: float | None  # the starting model's, which each point's retention is held to

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, folder: Path) -> Path:
        path = folder / WISEFT_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def interpolate(
    pretrained: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """The state dict `(1 - alpha) * pretrained + alpha * finetuned`, tensor by tensor.

    `alpha` 0 and 1 give copies of the two ends exactly (the float arithmetic of a mix would not quite);
    between them, tensors that are not floating point (integer buffers) are the fine-tuned model's.

    Raises:
        ClipflowError: the two state dicts are not of one architecture (other names or shapes).
    """
    if pretrained.keys() != finetuned.keys():
        names = sorted(pretrained.keys() ^ finetuned.keys())
        raise ClipflowError(
            f"WiSE-FT mixes weights of one architecture; the starting and the fine-tuned model differ in "
            f"{len(names)} tensors, such as {names[0]!r}"
        )
    mixed = {}
    for name, end in finetuned.items():
        start = pretrained[name]
        if start.shape != end.shape:
            raise ClipflowError(
                f"WiSE-FT mixes weights of one architecture; {name!r} is {tuple(start.shape)} in the starting "
                f"model and {tuple(end.shape)} in the fine-tuned one"
            )
        if alpha == 0.0:
            mixed[name] = start.clone()
        elif alpha == 1.0 or not end.is_floating_point():
            mixed[name] = end.clone()
        else:
            mixed[name] = ((1.0 - alpha) * start.float() + alpha * end.float()).to(end.dtype)
    return mixed


def mix(pretrained: ClipModel, finetuned: ClipModel, alpha: float) -> ClipModel:
    """The fine-tuned model (its transforms and tokenizer) with the weights of `interpolate`."""
    mixed = dataclasses.replace(finetuned, model=copy.deepcopy(finetuned.model))
    mixed.model.load_state_dict(interpolate(pretrained.model.state_dict(), finetuned.model.state_dict(), alpha))
    mixed.model.eval()
    return mixed


def choose(points: list[WiseftPoint], pretrained_retention: float | None, max_retention_drop: float) -> WiseftPoint:
    """The rule of the module docstring: the best target top-1 among the points that retain enough.

    Args:
        points: the scored mixes.
        pretrained_retention: the starting model's retention top-1; None: no retention constraint.
        max_retention_drop: how far below it a point's retention top-1 may be.

    Raises:
        ClipflowError: no point qualifies (possible only when `a = 0` is not among them).
    """
    allowed = [
        point
        for point in points
        if pretrained_retention is None or point.retention_top1 >= pretrained_retention - max_retention_drop
    ]
    if not allowed:
        raise ClipflowError(
            f"no WiSE-FT mix keeps retention top-1 within {max_retention_drop} of the starting model's "
            f"{pretrained_retention:.4f}: add 0.0 to evaluate.wiseft.alphas"
        )
    return max(allowed, key=lambda point: (point.target_top1, -point.alpha))


def target_set(params: Params, sets: dict[str, ZeroshotSet]) -> str:
    """`evaluate.wiseft.target`, else the zero-shot set whose top-1 the gate reads, else the first of `sets`.

    Raises:
        ClipflowError: a target or retention set that this data's evaluation does not have.
    """
    wiseft = params.evaluate.wiseft
    for role, name in (("target", wiseft.target), ("retention", wiseft.retention)):
        if name is not None and name not in sets:
            raise ClipflowError(f"evaluate.wiseft.{role} {name!r} is no zero-shot set of this data: {sorted(sets)}")
    return wiseft.target or params.gated_set(sets)


def curve(
    pretrained: ClipModel,
    finetuned: ClipModel,
    finetuned_images: SplitEmbeddings,
    baseline: dict[str, ZeroshotResult],
    data_dir: Path,
    metadata: pd.DataFrame,
    settings: EvaluateParams,
    target: str,
) -> WiseftCurve:
    """Score every `a` of `settings.wiseft.alphas` on the target and retention sets and choose one.

    Args:
        pretrained: the model fine-tuning started from.
        finetuned: the fine-tuned model, and `finetuned_images` its image embeddings (shared with the
            step, which evaluates it in full when `a = 1` is chosen).
        baseline: the starting model's zero-shot results: they are the point `a = 0`.
        data_dir: the ingested data; `metadata` its table.
        settings: the evaluate params, with the zero-shot sets of this data's evaluation.
        target: the zero-shot set to improve (see `target_set`).
    """
    wiseft = settings.wiseft
    names = [target] + ([wiseft.retention] if wiseft.retention and wiseft.retention != target else [])

    def score(clip: ClipModel, images: SplitEmbeddings) -> dict[str, ZeroshotResult]:
        return {
            name: zeroshot(clip, images, metadata, name, settings.zeroshot[name], settings.templates) for name in names
        }

    points = []
    for alpha in sorted(set(wiseft.alphas)):
        if alpha == 0.0:
            results = baseline
        elif alpha == 1.0:
            results = score(finetuned, finetuned_images)
        else:
            mixed = mix(pretrained, finetuned, alpha)
            results = score(mixed, SplitEmbeddings(mixed, data_dir, settings.batch_size))
        retention = results[wiseft.retention].acc1 if wiseft.retention else None
        points.append(WiseftPoint(alpha, results[target].acc1, retention))
    pretrained_retention = baseline[wiseft.retention].acc1 if wiseft.retention else None
    chosen = choose(points, pretrained_retention, wiseft.max_retention_drop)
    return WiseftCurve(target, wiseft.retention, wiseft.max_retention_drop, points, chosen.alpha, pretrained_retention)
