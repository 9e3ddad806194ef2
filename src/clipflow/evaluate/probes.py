"""Probes of CLIP's known weak spots: counting, spatial relations, attribute binding.

Each probe scene's metadata lists candidate captions and the index of the true one; the model
is right when the true caption scores highest. A probe of a few dozen scenes is noisy, so each
result carries a 95% interval, and it is read against chance only when the interval clears it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from clipflow.data.builtin import PROBE_SPLIT
from clipflow.evaluate.embeddings import SplitEmbeddings
from clipflow.evaluate.metrics import wilson_interval
from clipflow.model import ClipModel


@dataclass(frozen=True)
class ProbeResult:
    """One kind of probe: how often the true caption won, with its 95% Wilson interval."""

    description: str  # what the probe asks, with an example from the data
    accuracy: float
    chance: float
    samples: int
    ci_low: float
    ci_high: float

    @property
    def versus_chance(self) -> str:
        """'below', 'at' or 'above' chance: where the whole interval lies, 'at' when it holds chance."""
        if self.ci_high < self.chance:
            return "below"
        return "above" if self.ci_low > self.chance else "at"

    @property
    def below_chance(self) -> bool:
        """The model prefers a wrong caption more often than guessing would, beyond the noise of n."""
        return self.versus_chance == "below"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"versus_chance": self.versus_chance, "below_chance": self.below_chance}


def probe_result(description: str, correct: int, samples: int, chance: float) -> ProbeResult:
    """A probe's result from its count of correct answers out of `samples` scenes."""
    low, high = wilson_interval(correct, samples)
    return ProbeResult(description, correct / samples, chance, samples, low, high)


def probes(clip: ClipModel, images: SplitEmbeddings) -> dict[str, ProbeResult]:
    """Accuracy of picking the true caption among each probe scene's candidates, per probe kind."""
    pairs, embeddings = images(PROBE_SPLIT)
    outcomes: dict[str, list[bool]] = {}
    chance: dict[str, float] = {}
    example: dict[str, dict] = {}
    for i in range(len(pairs)):
        meta = pairs.meta(i)
        scores = clip.encode_text(meta["candidates"]) @ embeddings[i]
        outcomes.setdefault(meta["probe"], []).append(int(scores.argmax()) == meta["answer"])
        chance[meta["probe"]] = 1.0 / len(meta["candidates"])
        example.setdefault(meta["probe"], meta)
    return {
        kind: probe_result(_describe(example[kind]), sum(hits), len(hits), chance[kind])
        for kind, hits in outcomes.items()
    }


def _describe(meta: dict) -> str:
    """The probe's task in one line, shown on its first scene: the true caption against the others."""
    candidates = meta["candidates"]
    true = candidates[meta["answer"]]
    others = ", ".join(f"“{c}”" for c in candidates if c != true)
    return f"the true caption among {len(candidates)}, e.g. “{true}” against {others}"
