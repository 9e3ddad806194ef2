"""The request limits: one list of names, kept by params, the package step and the service alike; their checks."""

from __future__ import annotations

import dataclasses
import io

import pytest
from bentoml.exceptions import InvalidArgument
from PIL import Image

from clipflow.params import ServeParams
from clipflow.serve import package
from clipflow.serve.inputs import (
    LIMITS,
    Limits,
    check_image_count,
    check_item_id,
    check_k,
    check_labels,
    check_query_text,
    check_text_list,
    open_images,
)


def _limits(**changes: int) -> Limits:
    values = dict.fromkeys(LIMITS, 100) | changes
    return Limits(**values)


def test_the_limits_are_named_once_and_params_has_each_of_them(small_params):
    assert tuple(Limits.model_fields) == LIMITS
    assert package.LIMITS is LIMITS  # what the package step stores in the model's metadata
    serve_fields = {field.name: field.type for field in dataclasses.fields(ServeParams)}
    assert {name: serve_fields.get(name) for name in LIMITS} == dict.fromkeys(LIMITS, "int")
    # The packaged metadata, as the service reads it back.
    stored = {key: getattr(small_params.serve, key) for key in LIMITS}
    assert Limits(**stored).model_dump() == stored


def test_each_check_names_the_field_and_the_limit(tmp_path):
    limits = _limits(max_texts=2, max_text_chars=5, max_labels=2, max_batch=1, max_k=3, max_prompts=2)
    assert check_text_list("queries", ["a", "b"], limits) == ["a", "b"]
    with pytest.raises(InvalidArgument, match="queries: 3 given, at most 2 allowed"):
        check_text_list("queries", ["a", "b", "c"], limits)
    with pytest.raises(InvalidArgument, match="text: a text has 6 characters, at most 5"):
        check_query_text("text", "abcdef", limits)
    with pytest.raises(InvalidArgument, match="labels: 3 given, at most 2 allowed"):
        check_labels(["a", "b", "c"], None, limits)
    with pytest.raises(InvalidArgument, match="labels x templates = 4 prompts, at most 2 allowed"):
        check_labels(["a", "b"], ["{}", "a {}"], limits)
    assert check_labels(["a", "b"], ["{}"], limits) == ["a", "b"]
    assert check_k(3, limits) == 3
    for k in (0, 4):
        with pytest.raises(InvalidArgument, match=f"k must be between 1 and 3, got {k}"):
            check_k(k, limits)
    with pytest.raises(InvalidArgument, match="id: 6 characters, at most 5"):
        check_item_id("abcdef", limits)
    with pytest.raises(InvalidArgument, match="images must not be empty"):
        check_image_count("images", [], limits)

    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    good.write_bytes(buffer.getvalue())
    bad.write_bytes(b"not an image")
    (image,) = open_images("candidates", [good], limits)
    assert image.size == (8, 8) and image.mode == "RGB"
    with pytest.raises(InvalidArgument, match="candidates: 2 given, at most 1 allowed"):
        open_images("candidates", [good, good], limits)
    with pytest.raises(InvalidArgument, match=r"candidates\[0\] could not be decoded"):
        open_images("candidates", [bad], _limits(max_image_bytes=1000))
