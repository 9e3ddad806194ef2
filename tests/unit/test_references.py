"""Model references: every kind parses from its text alone; a malformed one fails in one line."""

from __future__ import annotations

import pytest

from clipflow.errors import ClipflowError
from clipflow.params import load_params
from clipflow.references import ModelReference, parse_reference
from tests.support import REPO


@pytest.mark.parametrize(
    ("text", "config", "expected"),
    [
        (
            "ViT-B-32:laion2b_s34b_b79k",
            None,
            ModelReference("ViT-B-32:laion2b_s34b_b79k", "tag", config="ViT-B-32", tag="laion2b_s34b_b79k"),
        ),
        # A bare tag belongs to the fallback config (train.model beside train.pretrained).
        ("openai", "ViT-B-32", ModelReference("ViT-B-32:openai", "tag", config="ViT-B-32", tag="openai")),
        # A reference that names its own config wins over the fallback.
        ("ViT-B-32:openai", "CLIP-Tiny", ModelReference("ViT-B-32:openai", "tag", config="ViT-B-32", tag="openai")),
        ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None, None),
        (
            "local-dir:/models/clip",
            None,
            ModelReference("local-dir:/models/clip", "local-dir", location="/models/clip"),
        ),
        (
            "outputs/model",
            "CLIP-Tiny",
            ModelReference("outputs/model", "checkpoint", "CLIP-Tiny", location="outputs/model"),
        ),
        ("tiny.pt", None, ModelReference("tiny.pt", "checkpoint", location="tiny.pt")),
        (
            "s3://bucket/models/tiny.pt",
            None,
            ModelReference("s3://bucket/models/tiny.pt", "checkpoint", location="s3://bucket/models/tiny.pt"),
        ),
        (
            "models:/clip@champion",
            None,
            ModelReference("models:/clip@champion", "registry", location="models:/clip@champion"),
        ),
        ("models:/clip/3", None, ModelReference("models:/clip/3", "registry", location="models:/clip/3")),
        ("runs:/abc123/model", None, ModelReference("runs:/abc123/model", "registry", location="runs:/abc123/model")),
        ("CLIP-Tiny", None, ModelReference("CLIP-Tiny", "config", config="CLIP-Tiny")),
    ],
)
def test_every_kind_parses_from_its_text(text, config, expected):
    parsed = parse_reference(text, config)
    if expected is None:  # hf-hub: the repository id is the location
        expected = ModelReference(text, "hf-hub", location=text.removeprefix("hf-hub:"))
    assert parsed == expected
    assert parsed.pretrained == (parsed.kind != "config")
    assert ":" not in parsed.cache_name and "/" not in parsed.cache_name


def test_cache_names_tell_references_apart():
    names = {
        parse_reference(text).cache_name
        for text in ("hf-hub:a/b", "hf-hub:a/c", "ViT-B-32:openai", "ViT-B-32:laion2b_s34b_b79k")
    }
    assert len(names) == 4
    assert parse_reference("hf-hub:clipflow-test/clip-tiny").cache_name == "hf-hub--clipflow-test--clip-tiny"


@pytest.mark.parametrize(
    ("text", "config", "message"),
    [
        ("", None, "a model reference must be a non-empty string"),
        ("   ", None, "a model reference must be a non-empty string"),
        ("hf-hub:", None, "hf-hub: takes a repository id org/repo, got ''"),
        ("hf-hub:just-a-name", None, "hf-hub: takes a repository id org/repo"),
        ("hf-hub:org/repo/extra", None, "hf-hub: takes a repository id org/repo"),
        ("local-dir:", None, "local-dir: takes a folder in open_clip's layout"),
        ("models:/", None, "an MLflow model is models:/NAME@ALIAS"),
        ("models:/clip@", None, "an MLflow model is models:/NAME@ALIAS"),
        ("runs:/", None, "an MLflow model is models:/NAME@ALIAS"),
        ("s3://bucket-only", None, "an S3 checkpoint is s3://bucket/key"),
        ("ViT-B-32:laion2b_s34b_b80k", None, "unknown pretrained tag 'laion2b_s34b_b80k' for model config 'ViT-B-32'"),
        ("nonsense", "ViT-B-32", "unknown pretrained tag 'nonsense' for model config 'ViT-B-32'"),
        ("CLIP-Tiny:openai", None, "unknown pretrained tag 'openai' for model config 'CLIP-Tiny'"),
        ("ViT-Z-99:openai", None, "unknown model config 'ViT-Z-99'"),
        ("ViT-Z-99", None, "unknown model config 'ViT-Z-99'"),
    ],
)
def test_a_malformed_reference_fails_in_one_line(text, config, message):
    with pytest.raises(ClipflowError) as raised:
        parse_reference(text, config)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_an_unknown_tag_lists_the_tags_open_clip_knows_for_that_config():
    with pytest.raises(ClipflowError, match="its known tags: .*laion2b_s34b_b79k"):
        parse_reference("ViT-B-32:nope")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.pretrained=laion2b_s34b_b79k"],
            "train.pretrained: unknown pretrained tag 'laion2b_s34b_b79k' for model config 'CLIP-Tiny'",
        ),
        (["train.pretrained=hf-hub:nope"], "train.pretrained: model reference 'hf-hub:nope'"),
        (["train.steps=0"], "train.steps: 0 serves a pretrained model as it is: set train.pretrained"),
        (["train.steps=-1"], "train.steps must not be negative"),
    ],
)
def test_train_pretrained_is_checked_when_params_load(overrides, message):
    with pytest.raises(ClipflowError) as raised:
        load_params(REPO / "params.yaml", overrides)
    assert message in str(raised.value)


def test_params_accept_every_kind_of_starting_model_and_steps_0_with_one():
    params = load_params(
        REPO / "params.yaml",
        ["train.model=ViT-B-32", "train.pretrained=laion2b_s34b_b79k", "train.steps=0", "train.model_cache=s3://m/c"],
    )
    assert params.train.starting_reference().text == "ViT-B-32:laion2b_s34b_b79k"
    assert params.train.model_cache == "s3://m/c"
    for text in ("hf-hub:org/repo", "local-dir:/models/clip", "models:/clip@champion", "outputs/model"):
        assert load_params(REPO / "params.yaml", [f"train.pretrained={text}"]).train.starting_reference().text == text
    assert load_params(REPO / "params.yaml").train.starting_reference() is None
