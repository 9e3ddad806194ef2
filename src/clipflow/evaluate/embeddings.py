"""Image embeddings per split, computed once and shared by every evaluation that needs them."""

from __future__ import annotations

from pathlib import Path

import torch

from clipflow.data.pairs import ShardPairs
from clipflow.errors import ClipflowError
from clipflow.model import ClipModel

# Unit vectors that all lie this close to their mean are one point: every similarity ties, and a
# recall or accuracy of them measures how ties are broken (a zeroed model scored perfect recall
# while ties counted for the pair). A trained model's image embeddings spread far wider than this.
COLLAPSED_SPREAD = 1e-4


class SplitEmbeddings:
    """`images(split)` -> (the split's pairs, their L2-normalised image embeddings), each split embedded once."""

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
            self._cache[split] = (pairs, check_rankable(embeddings, f"image embeddings of split {split!r}"))
        return self._cache[split]


def check_rankable(embeddings: torch.Tensor, what: str) -> torch.Tensor:
    """`embeddings` (N, D), L2-normalised, if a ranking of them can mean anything; a collapsed model's fail.

    Raises:
        ClipflowError: a value is NaN or infinite, a row is a zero vector (normalising keeps it zero),
            or every row is the same point (within `COLLAPSED_SPREAD`).
    """
    count = embeddings.shape[0]
    broken = (~embeddings.isfinite()).any(dim=1).sum().item()
    if broken:
        raise ClipflowError(f"the model is broken: {broken} of {count} {what} are not finite (NaN or infinity)")
    zero = (embeddings.norm(dim=1) < 0.5).sum().item()
    if zero:
        raise ClipflowError(f"the model has collapsed: {zero} of {count} {what} are zero vectors")
    spread = (embeddings - embeddings.mean(dim=0)).norm(dim=1).max().item() if count > 1 else float("inf")
    if spread < COLLAPSED_SPREAD:
        raise ClipflowError(
            f"the model has collapsed: all {count} {what} are one point (within {spread:.1e} of their mean)"
        )
    return embeddings
