"""A linear probe: multinomial logistic regression on frozen image features.

The CLIP paper's linear probes are scikit-learn's L-BFGS logistic regression with the L2 penalty swept
on a validation split, and CLIP_benchmark's `linear_probe` task does the same in torch. This fits the
same model with torch's L-BFGS on features already in memory: each penalty of `evaluate.linear_probe.l2`
on four fifths of the images, scored on the fifth held back, and the best refitted on all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from clipflow.errors import ClipflowError

# Fewer images leave a held-back fifth too small to choose a penalty on.
MIN_TRAIN_IMAGES = 10


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe: `classes[argmax(features @ weight + bias)]` is its answer."""

    classes: list[str]
    weight: torch.Tensor  # (D, C)
    bias: torch.Tensor  # (C,)
    l2: float  # the chosen penalty
    samples: int  # images it was fitted on
    validation_top1: dict[float, float]  # penalty -> top-1 on the held-back fifth

    def top1_hits(self, features: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
        """(N,) bool: whether the probe answers each row's label; a label it never saw is always missed."""
        return _predict(features, self.weight, self.bias) == _targets(self.classes, labels)


def fit_linear_probe(
    features: torch.Tensor, labels: Sequence[str], l2: Sequence[float], max_iter: int, seed: int = 0
) -> LinearProbe:
    """Fit the probe on (N, D) `features` labelled `labels`, its penalty chosen among `l2`.

    Raises:
        ClipflowError: fewer than `MIN_TRAIN_IMAGES` images, or fewer than two labels among them.
    """
    classes = sorted(set(labels))
    if len(labels) < MIN_TRAIN_IMAGES or len(classes) < 2:
        raise ClipflowError(
            f"a linear probe needs at least {MIN_TRAIN_IMAGES} images of at least 2 labels, "
            f"got {len(labels)} of {len(classes)}"
        )
    features = features.float()
    targets = _targets(classes, labels)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held, fitted = order[: len(labels) // 5], order[len(labels) // 5 :]
    validation = {}
    for penalty in l2:
        weight, bias = _fit(features[fitted], targets[fitted], len(classes), penalty, max_iter)
        validation[penalty] = (_predict(features[held], weight, bias) == targets[held]).float().mean().item()
    # Ties go to the stronger penalty: the simpler model, as the sweep's coarse grid cannot tell them apart.
    chosen = max(l2, key=lambda penalty: (validation[penalty], penalty))
    weight, bias = _fit(features, targets, len(classes), chosen, max_iter)
    return LinearProbe(classes, weight, bias, chosen, len(labels), validation)


def _fit(
    features: torch.Tensor, targets: torch.Tensor, classes: int, l2: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.zeros(features.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(features @ weight + bias, targets) + l2 * weight.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():  # the evaluation around it may run under no_grad
        optimizer.step(loss)
    return weight.detach(), bias.detach()


def _targets(classes: list[str], labels: Sequence[str]) -> torch.Tensor:
    """Each label's class index; -1 for a label outside `classes`, which no prediction equals."""
    index = {label: i for i, label in enumerate(classes)}
    return torch.tensor([index.get(label, -1) for label in labels])


def _predict(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return (features.float() @ weight + bias).argmax(dim=1)
