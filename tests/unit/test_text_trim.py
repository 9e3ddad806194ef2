"""Text batches run on their longest prompt's length and give the embeddings of the full context."""

from __future__ import annotations

import open_clip
import pytest
import torch

from clipflow import model as clip_model
from clipflow.model.text_length import trimmable

SHORT = ["a red circle", "two blue squares", "a star"]
MIXED = ["a", "a small purple star to the left of two large green triangles", "three red circles"]


@pytest.fixture(scope="module")
def clip() -> clip_model.ClipModel:
    clip = clip_model.create("CLIP-Tiny")
    clip.model.eval()
    return clip


def positions_seen(clip: clip_model.ClipModel, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
    """`clip.encode_text(texts)` and the sequence lengths its text transformer ran on."""
    lengths: list[int] = []
    hook = clip.model.transformer.register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
    try:
        return clip.encode_text(texts), lengths
    finally:
        hook.remove()


def full_context(clip: clip_model.ClipModel, texts: list[str]) -> torch.Tensor:
    """The embeddings of open_clip's own `encode_text`, on every position of the context."""
    with torch.no_grad():
        return torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(texts)), dim=-1)


@pytest.mark.parametrize("texts", [SHORT, MIXED, SHORT[:1]], ids=["short", "mixed", "one"])
def test_a_batch_runs_on_its_longest_prompt_with_the_full_context_embeddings(clip, texts):
    embeddings, lengths = positions_seen(clip, texts)
    real = int((clip.tokenizer(texts) != 0).sum(dim=1).max())  # start, words and end of the longest prompt
    assert lengths == [real] and real < clip.model.context_length
    assert (embeddings - full_context(clip, texts)).abs().max() < 1e-5


def test_a_prompt_filling_the_context_runs_the_whole_context(clip):
    texts = [*SHORT, " ".join(["circle"] * 100)]  # cut by the tokenizer, its end token at the last position
    embeddings, lengths = positions_seen(clip, texts)
    assert lengths == [clip.model.context_length]
    assert (embeddings - full_context(clip, texts)).abs().max() < 1e-5


def test_a_custom_text_tower_is_cut_the_same_way():
    clip = clip_model.create("CLIP-Tiny")
    clip.model = open_clip.create_model("CLIP-Tiny", force_custom_text=True).eval()
    assert type(clip.model.text) is open_clip.transformer.TextTransformer and trimmable(clip.model)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(clip.model.encode_text(clip.tokenizer(MIXED)), dim=-1)
    assert (clip.encode_text(MIXED) - expected).abs().max() < 1e-5
    clip.model.text.pool_type = "last"
    assert not trimmable(clip.model)


@pytest.mark.parametrize(
    "change",
    [
        lambda model: setattr(model, "text_pool_type", "last"),
        lambda model: setattr(model, "text_pool_type", "first"),
        lambda model: setattr(model, "attn_mask", None),  # bidirectional attention
        lambda model: setattr(model, "attn_mask", torch.zeros_like(model.attn_mask)),
    ],
    ids=["pool-last", "pool-first", "no-mask", "not-causal"],
)
def test_towers_that_do_not_pool_the_end_token_causally_keep_the_full_context(change):
    clip = clip_model.create("CLIP-Tiny")
    clip.model.eval()
    change(clip.model)
    seen: list[int] = []
    encode_text = clip.model.encode_text

    def recorded(tokens: torch.Tensor) -> torch.Tensor:
        seen.append(tokens.shape[1])
        return encode_text(tokens)

    clip.model.encode_text = recorded
    assert not trimmable(clip.model)
    assert clip.encode_text(SHORT).shape == (len(SHORT), 128)
    assert seen == [clip.model.context_length]
