"""The served tokenizer's bounds: the same tokens as open_clip's within them, bounded memory and work beyond."""

from __future__ import annotations

import random
import string

import pytest
from open_clip.tokenizer import SimpleTokenizer

from clipflow import model as clip_model


def _texts(rng: random.Random, count: int) -> list[str]:
    alphabet = string.ascii_letters + string.digits + "éü中文&;.,!?'- "
    texts = []
    for _ in range(count):
        words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14))) for _ in range(rng.randint(0, 150))]
        texts.append(rng.choice([" ", "  ", "\n\t"]).join(words))
    return texts


@pytest.mark.parametrize("context_length", [20, 77])
def test_texts_within_the_bound_get_open_clips_own_tokens(context_length):
    reference = SimpleTokenizer(context_length=context_length)
    bounded = clip_model.bounded_tokenizer(SimpleTokenizer(context_length=context_length))
    rng = random.Random(context_length)
    texts = _texts(rng, 300) + [
        "a photo of a cat.",
        "",
        "   ",
        "&amp;lt;b&amp;gt; html entities",
        "can't won't I'm we'll",
        "中文的句子没有空格" * 4,  # one word of 108 bytes
        "x" * clip_model.MAX_WORD_BYTES,
        " ".join(["word"] * 500),
    ]
    assert (bounded(texts) == reference(texts)).all()


def test_a_word_longer_than_the_bound_is_cut_before_bpe():
    bounded = clip_model.bounded_tokenizer(SimpleTokenizer(context_length=77))
    reference = SimpleTokenizer(context_length=77)
    rng = random.Random(0)
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(1000))
    assert (bounded([word]) == reference([word[: clip_model.MAX_WORD_BYTES]])).all()


def test_the_word_cache_keeps_the_words_used_last_and_no_more(monkeypatch):
    monkeypatch.setattr(clip_model, "TOKENIZER_CACHE_WORDS", 50)
    tokenizer = clip_model.bounded_tokenizer(SimpleTokenizer(context_length=77))
    reference = SimpleTokenizer(context_length=77)
    rng = random.Random(1)
    texts = [
        " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(7)) for _ in range(60)) for _ in range(20)
    ]
    for text in texts:
        assert (tokenizer([text]) == reference([text])).all()
    assert len(tokenizer.cache) == 50
    tokenizer(["zebra"])
    assert list(tokenizer.cache)[-1] == "zebra"
    # The start and end markers stay however many words came since.
    marked = ["<start_of_text> a zebra <end_of_text>"]
    assert (tokenizer(marked) == reference(marked)).all()


def test_a_model_built_here_has_the_bounded_tokenizer():
    clip = clip_model.create("CLIP-Tiny")
    assert isinstance(clip.tokenizer.cache, clip_model._WordCache)
    assert clip_model.image_side("CLIP-Tiny") == 64
