"""The request limits: one list of names, kept by params, the package step and the service alike; their checks."""

from __future__ import annotations

import base64
import dataclasses
import io

import pytest
from bentoml.exceptions import InvalidArgument
from PIL import Image

from clipflow.errors import ClipflowError
from clipflow.params import ServeParams
from clipflow.prompts import split_template
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
    decode_base64_images,
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
    (image,) = open_images("candidates", [good], limits, 8)
    assert image.size == (8, 8) and image.mode == "RGB"
    with pytest.raises(InvalidArgument, match="candidates: 2 given, at most 1 allowed"):
        open_images("candidates", [good, good], limits, 8)
    with pytest.raises(InvalidArgument, match=r"candidates\[0\] could not be decoded"):
        open_images("candidates", [bad], _limits(max_image_bytes=1000), 8)


VALID_TEMPLATES = {
    "{}": ("", ""),
    "a photo of a {}.": ("a photo of a ", "."),
    "{{{}}}": ("{", "}"),
    "{{}} is {}, {{literal}}": ("{} is ", ", {literal}"),
}


@pytest.mark.parametrize(("template", "parts"), VALID_TEMPLATES.items(), ids=VALID_TEMPLATES)
def test_a_template_is_the_literal_text_around_one_bare_field(template, parts):
    assert split_template(template) == parts
    # Filling puts the label in as it is: braces and format specs in a label stay text.
    (prompt,) = _prompts(["{0:x>99}"], [template])
    assert prompt == parts[0] + "{0:x>99}" + parts[1]


def _prompts(labels: list[str], templates: list[str]) -> list[str]:
    from clipflow.model import prompt_ensemble

    seen: list[str] = []

    def encode(texts: list[str]):
        import torch

        seen.extend(texts)
        return torch.ones(len(texts), 4)

    prompt_ensemble(encode, labels, templates)
    return seen


INVALID_TEMPLATES = {
    "no-field": "a photo",
    "escaped-only": "{{}}",
    "padding-spec": "{{}}{:x>40000000}",
    "precision-cuts-the-label": "{{}} {:.1}",
    "conversion": "a {!r}",
    "named": "{name}",
    "positional": "{0}",
    "two-fields": "{} and {}",
    "nested-field-in-spec": "{:{}}",
    "attribute": "{.upper}",
    "lone-open": "a { b {}",
    "lone-close": "a {} }",
}


@pytest.mark.parametrize("template", INVALID_TEMPLATES.values(), ids=INVALID_TEMPLATES)
def test_a_template_with_anything_but_one_bare_field_is_refused_with_one_clear_line(template):
    with pytest.raises(ClipflowError, match=r"must contain '\{\}' exactly once for the label") as raised:
        split_template(template)
    assert "\n" not in str(raised.value)
    with pytest.raises(InvalidArgument, match=r"^templates: template .* must contain '\{\}' exactly once"):
        check_labels(["cat"], [template], _limits())


def test_a_filled_prompt_is_bounded_by_max_text_chars():
    limits = _limits(max_text_chars=20)
    check_labels(["x" * 10], ["{}" + "y" * 10], limits)
    with pytest.raises(InvalidArgument, match="makes a prompt of 21 characters, at most 20"):
        check_labels(["x" * 10, "x" * 11], ["{}" + "y" * 10], limits)


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "blue").save(buffer, format="JPEG")
    return buffer.getvalue()


def test_the_request_pixel_budget_counts_every_image_before_any_is_decoded(tmp_path):
    limits = _limits(max_image_pixels=10_000, max_request_pixels=25_000, max_batch=4, max_image_bytes=100_000)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(_png((100, 100)))
    # Each reduced by an integer factor to a shorter side of at least 8, under twice that.
    assert [8 <= min(image.size) < 16 for image in open_images("images", paths[:2], limits, 8)] == [True, True]
    with pytest.raises(InvalidArgument, match=r"images: 30000 pixels to decode in this request, at most 25000"):
        open_images("images", paths, limits, 8)
    texts = [base64.b64encode(_png((100, 100))).decode()] * 3
    with pytest.raises(InvalidArgument, match="30000 pixels to decode"):
        decode_base64_images("images", texts, limits, 8)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_and_costs_what_it_decodes_at(tmp_path):
    limits = _limits(max_image_pixels=800 * 600, max_request_pixels=100 * 75, max_image_bytes=1_000_000)
    path = tmp_path / "photo.jpg"
    path.write_bytes(_jpeg((800, 600)))
    # 1/8 scale keeps the shorter side at least 64: 100 x 75 pixels decoded, within the budget.
    (image,) = open_images("images", [path], limits, 64)
    assert image.size == (100, 75) and image.mode == "RGB"
    with pytest.raises(InvalidArgument, match="30000 pixels to decode"):  # 1/4 scale for a side of 150
        open_images("images", [path], limits, 150)
