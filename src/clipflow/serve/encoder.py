"""The model calls behind the served endpoints, spread over the CPU cores in lanes.

On CPU, torch's intra-op threads meet at a barrier after every operator of a forward pass, so
one batch on N threads keeps N cores busy less than N sub-batches, each in its own thread with
one intra-op thread. A lane also preprocesses its own images, so PIL's resizing runs on every
core instead of one. A call either splits its items across the lanes or, when its caller already
runs one call per lane (the batch dispatcher, `clipflow.serving_dispatch`), runs whole on one.
`benchmarks/bench_serve.py` times these same calls for its in-process ceiling, both ways; see the
bench_serve section of benchmarks/README.md for the numbers.

torch and the model code are imported where they are used: the service imports this module to
size its thread pool, and `bentoml build` imports the service only to read its config.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
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
