"""The model calls behind the served endpoints, spread over the CPU cores in lanes, and the scores made of them.

On CPU, torch's intra-op threads meet at a barrier after every operator of a forward pass, so
one batch on N threads keeps N cores busy less than N sub-batches, each in its own thread with
one intra-op thread. A lane also preprocesses its own images, so PIL's resizing runs on every
core instead of one. A call either splits its items across the lanes or, when its caller already
runs one call per lane (the batch dispatcher, `clipflow.serve.dispatch`), runs whole on one.
`benchmarks/bench_serve.py` times these same calls for its in-process ceiling, both ways; see the
bench_serve section of benchmarks/README.md for the numbers.

`classify` and `rank` turn L2-normalised embeddings into what the endpoints answer: cosines,
the softmax of the model's logit scale times them, and the order, as plain frozen dataclasses.

torch and the model code are imported where they are used: the service imports this module to
size its thread pool, and `bentoml build` imports the service only to read its config.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import PIL.Image
    import torch

    from clipflow.model import ClipModel

ItemT = TypeVar("ItemT")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity, which a container's cpuset narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Encoder:
    """L2-normalised embeddings of texts and decoded images, computed in `lanes` threads.

    Every call runs in the lanes, so however many callers there are, at most `lanes` forward
    passes run at once. `one_lane=True` keeps a call's items together in one lane.
    """

    def __init__(self, clip: ClipModel, lanes: int = 1) -> None:
        self.clip = clip
        self.lanes = lanes
        # The model's learned temperature, exp(logit_scale): what `classify` and `rank` scale cosines by.
        self.logit_scale: float = clip.model.logit_scale.exp().item()
        self._pool = ThreadPoolExecutor(lanes, thread_name_prefix="clipflow-lane") if lanes > 1 else None

    @classmethod
    def per_core(cls, clip: ClipModel) -> Encoder:
        """One lane per usable core. Sets torch to one intra-op thread for the whole process."""
        import torch

        torch.set_num_threads(1)
        return cls(clip, usable_cores())

    def texts(self, texts: list[str], one_lane: bool = False) -> torch.Tensor:
        """(N, D) embeddings of `texts`."""
        return self._run(self.clip.encode_text, texts, one_lane)

    def images(self, images: list[PIL.Image.Image], one_lane: bool = False) -> torch.Tensor:
        """(N, D) embeddings of decoded images, through the model's eval preprocess."""
        return self._run(self._preprocess_and_encode, images, one_lane)

    def labels(self, labels: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Zero-shot classifier weights for `labels`, (L, D): see `clipflow.model.prompt_ensemble`."""
        from clipflow.model import prompt_ensemble

        return prompt_ensemble(self.texts, labels, templates)

    def _preprocess_and_encode(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        import torch

        return self.clip.encode_images(torch.stack([self.clip.preprocess(image) for image in images]))

    def _run(self, encode: Callable[[list[ItemT]], torch.Tensor], items: list[ItemT], one_lane: bool) -> torch.Tensor:
        if self._pool is None:
            return encode(items)
        if one_lane or len(items) < 2:
            return self._pool.submit(encode, items).result()
        import torch

        size = -(-len(items) // self.lanes)
        parts = [items[start : start + size] for start in range(0, len(items), size)]
        return torch.cat(list(self._pool.map(encode, parts)))


@dataclass(frozen=True)
class LabelScore:
    """A zero-shot label: its probability among the labels of one call, and its cosine with the image."""

    label: str
    probability: float
    cosine: float


@dataclass(frozen=True)
class CandidateScore:
    """A ranked candidate: its index in the candidates of one call, its cosine and its probability."""

    index: int
    cosine: float
    probability: float


def classify(
    image_features: torch.Tensor, label_features: torch.Tensor, labels: Sequence[str], logit_scale: float
) -> list[LabelScore]:
    """Zero-shot classify one image: every label with its probability, most likely first.

    Args:
        image_features: the image's L2-normalised embedding, (1, D) or (D,).
        label_features: the labels' classifier weights, (L, D), row i for `labels[i]`
            (`Encoder.labels`: each label's normalised prompt ensemble).
        labels: the L labels.
        logit_scale: the model's temperature (`Encoder.logit_scale`).

    Returns:
        L scores; `probability` is the softmax over labels of `logit_scale` times the cosine,
        so they sum to 1. Ordered by probability, descending; equal ones keep the labels' order.
    """
    image_features = image_features.reshape(1, -1)  # (1, D)
    # (logit_scale * image) @ labels.T, in this order: the last bits of the probabilities depend on it.
    probabilities = (logit_scale * image_features @ label_features.T).softmax(dim=-1)[0].tolist()  # (L,)
    cosines = (image_features @ label_features.T)[0].tolist()  # (L,)
    scores = [
        LabelScore(label=label, probability=p, cosine=c)
        for label, p, c in zip(labels, probabilities, cosines, strict=True)
    ]
    return sorted(scores, key=lambda score: score.probability, reverse=True)


def rank(
    query_features: torch.Tensor, candidate_features: torch.Tensor, logit_scale: float
) -> list[list[CandidateScore]]:
    """Rank every candidate for each query, by the cosine of their L2-normalised embeddings.

    Args:
        query_features: (Q, D) query embeddings (texts for images, or images for texts).
        candidate_features: (C, D) candidate embeddings.
        logit_scale: the model's temperature (`Encoder.logit_scale`).

    Returns:
        Q lists, in query order, each of all C candidates, most probable first: `index` in the
        candidates, `cosine`, and `probability`, the softmax over candidates of `logit_scale`
        times the cosine. Equal probabilities keep the candidates' order.
    """
    cosines = query_features @ candidate_features.T  # (Q, C)
    probabilities = (logit_scale * cosines).softmax(dim=-1)  # (Q, C)
    order = probabilities.argsort(dim=-1, descending=True, stable=True).tolist()
    cosine_rows, probability_rows = cosines.tolist(), probabilities.tolist()
    return [
        [CandidateScore(index=c, cosine=cosine_rows[q][c], probability=probability_rows[q][c]) for c in row]
        for q, row in enumerate(order)
    ]
