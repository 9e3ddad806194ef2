"""Behavioural tests of a trained model, in the spirit of Made-With-ML's `tests/model`.

A model trained on the built-in data (the test profile, trained long enough to learn) must lower
its loss, classify seen compositions clearly above chance, rank its images as well for a
paraphrased caption as for the original (invariance), and prefer its own colour over the same
shape in another colour (direction). The same checks run on a model whose optimiser does
nothing: each must fail there, or it could not catch the bug it is for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from clipflow import model as clip_model
from clipflow.data.ingest import ingest
from clipflow.data.pairs import ShardPairs
from clipflow.params import Params, load_params
from clipflow.train import worker
from clipflow.train.job import WorkerJob
from tests.support import REPO

# The test profile's 12 steps only show that training runs; these give a model that has learnt.
LEARNING = ["train.steps=150", "train.lr=0.0005", "train.warmup_steps=20", "train.log_every=10"]
SPLIT = "test"  # seen compositions, renders not trained on
ORIGINAL, PARAPHRASE = "a {color} {shape}", "the {shape} is {color}"  # two of the training captions' forms

# What "learnt" means here, with margins well inside what the trained model reaches on this data
# (top-1 about 10x chance, direction about 0.9) and far outside what an untrained one does.
MIN_LOSS_DROP = 0.2  # the last logged loss at most 80% of the first
MIN_TOP1_OVER_CHANCE = 4.0
MAX_PARAPHRASE_GAP = 0.1  # top-1 with the paraphrase within this of the original's
MIN_DIRECTION = 0.7  # pairs (own colour, other colour) where the own colour scores higher; chance 0.5


@dataclass(frozen=True)
class Behaviour:
    first_loss: float
    last_loss: float
    chance: float
    top1: dict[str, float]  # caption form -> zero-shot top-1 over the split's compositions
    direction: float

    def problems(self) -> set[str]:
        """The checks this model fails; empty for a model that has learnt."""
        failed = set()
        if self.last_loss > (1 - MIN_LOSS_DROP) * self.first_loss:
            failed.add("loss")
        if self.top1["original"] < MIN_TOP1_OVER_CHANCE * self.chance:
            failed.add("above chance")
        # Two captions the model cannot read are equally bad: invariance only counts where it reads them.
        paraphrase_ok = self.top1["paraphrase"] >= MIN_TOP1_OVER_CHANCE * self.chance
        if not paraphrase_ok or abs(self.top1["paraphrase"] - self.top1["original"]) > MAX_PARAPHRASE_GAP:
            failed.add("invariance")
        if self.direction < MIN_DIRECTION:
            failed.add("direction")
        return failed


def measure(checkpoint: Path, data_dir: Path, metrics_file: Path) -> Behaviour:
    clip = clip_model.load(checkpoint)
    clip.model.eval()
    losses = [json.loads(line)["metrics"]["train/loss"] for line in metrics_file.read_text().splitlines()]
    pairs = ShardPairs(data_dir, SPLIT, clip.preprocess, clip.tokenizer)
    images = pairs.embed_images(clip.encode_images, 100, desc="behaviour")
    facts = [pairs.meta(i) for i in range(len(pairs))]
    compositions = sorted({(fact["color"], fact["shape"]) for fact in facts})
    truth = torch.tensor([compositions.index((fact["color"], fact["shape"])) for fact in facts])
    top1 = {}
    for form, template in (("original", ORIGINAL), ("paraphrase", PARAPHRASE)):
        classes = clip.encode_text([template.format(color=color, shape=shape) for color, shape in compositions])
        top1[form] = (images @ classes.T).argmax(dim=1).eq(truth).float().mean().item()

    colors = sorted({color for color, _ in compositions})
    wins = []
    for image, fact in zip(images, facts, strict=True):
        scores = image @ clip.encode_text([ORIGINAL.format(color=c, shape=fact["shape"]) for c in colors]).T
        own = colors.index(fact["color"])
        wins += [bool(scores[own] > scores[other]) for other in range(len(colors)) if other != own]
    return Behaviour(losses[0], losses[-1], 1 / len(compositions), top1, sum(wins) / len(wins))


def _train(params: Params, data_dir: Path, output_dir: Path) -> Behaviour:
    metrics_file = output_dir / "metrics.jsonl"
    # The leader logs its steps for a run; with a metrics file it writes them there, and MLflow is never called.
    job = WorkerJob(
        replace(params.train, nproc=1), "behaviour-test", checkpoint_extra={}, metrics_file=str(metrics_file)
    )
    worker.train(job, data_dir, output_dir)
    return measure(output_dir / clip_model.CHECKPOINT_FILE, data_dir, metrics_file)


@pytest.fixture(scope="module")
def learning(tmp_path_factory):
    params = load_params(REPO / "params.yaml", overrides=LEARNING, profile="test")
    data_dir = tmp_path_factory.mktemp("behaviour") / "data"
    ingest("builtin", data_dir, params.data)
    return params, data_dir


def test_a_trained_model_learns_reads_paraphrases_and_tells_colours_apart(learning, tmp_path):
    params, data_dir = learning
    behaviour = _train(params, data_dir, tmp_path / "model")
    assert behaviour.problems() == set(), behaviour


def test_the_behaviour_checks_catch_an_optimiser_that_does_nothing(learning, tmp_path, monkeypatch):
    params, data_dir = learning
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)
    behaviour = _train(params, data_dir, tmp_path / "model")
    assert behaviour.problems() == {"loss", "above chance", "invariance", "direction"}, behaviour
