"""Probes of CLIP's known weak spots: counting, spatial relations, attribute binding.

Each probe scene's metadata lists candidate captions and the index of the true one; the model
is right when the true caption scores highest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from clipflow.evaluate.embeddings import SplitEmbeddings
from clipflow.model import ClipModel

PROBE_SPLIT = "probe"


@dataclass(frozen=True)
class ProbeResult:
    accuracy: float
    chance: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probes(clip: ClipModel, images: SplitEmbeddings) -> dict[str, ProbeResult]:
    """Accuracy of picking the true caption among each probe scene's candidates, per probe kind."""
    pairs, embeddings = images(PROBE_SPLIT)
    outcomes: dict[str, list[bool]] = {}
    chance: dict[str, float] = {}
    for i in range(len(pairs)):
        meta = pairs.meta(i)
        scores = clip.encode_text(meta["candidates"]) @ embeddings[i]
        outcomes.setdefault(meta["probe"], []).append(int(scores.argmax()) == meta["answer"])
        chance[meta["probe"]] = 1.0 / len(meta["candidates"])
    return {
        kind: ProbeResult(accuracy=sum(hits) / len(hits), chance=chance[kind], samples=len(hits))
        for kind, hits in outcomes.items()
    }
