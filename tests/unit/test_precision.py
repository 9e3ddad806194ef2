"""The serving precision: which one `auto` picks, and a CLIP-Tiny in bf16 against itself in fp32."""

from __future__ import annotations

import logging

import pytest
import torch

from clipflow import model as clip_model
from clipflow.errors import ClipflowError
from clipflow.model.precision import cpu_supports_bf16, resolve_precision
from clipflow.params import load_params
from clipflow.serve.precision_check import check_precision, top1_drop
from tests.support import REPO

TEXTS = ["a", "a red circle", "a small purple star to the left of two large green triangles", "three red stars"]


@pytest.fixture(scope="module")
def fp32() -> clip_model.ClipModel:
    torch.manual_seed(0)
    clip = clip_model.create("CLIP-Tiny")
    clip.model.eval()
    return clip


@pytest.fixture(scope="module")
def bf16(fp32) -> clip_model.ClipModel:
    return fp32.at_precision("bf16")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx512f", "avx512_bf16"}, True),
        ({"amx_bf16", "amx_tile"}, True),
        ({"avx2", "avx512f"}, False),
        (set(), False),
    ],
)
def test_the_cpu_flags_of_native_bf16_are_amx_or_avx512_bf16(flags, expected):
    assert cpu_supports_bf16(flags) is expected


@pytest.mark.parametrize(
    ("requested", "device", "cpu_bf16", "expected"),
    [
        ("auto", "cpu", False, "fp32"),
        ("auto", "cpu", True, "bf16"),
        ("auto", "cuda", False, "bf16"),
        ("auto", "cuda:1", False, "bf16"),
        ("fp32", "cpu", True, "fp32"),
        ("fp32", "cuda", True, "fp32"),
        ("bf16", "cpu", False, "bf16"),
    ],
)
def test_auto_picks_bf16_on_a_gpu_or_a_cpu_with_bf16_and_explicit_settings_are_kept(
    requested, device, cpu_bf16, expected, caplog
):
    with caplog.at_level(logging.INFO, logger="clipflow.model.precision"):
        assert resolve_precision(requested, device, cpu_bf16=cpu_bf16) == expected
    (record,) = caplog.records
    assert record.getMessage().startswith(f"precision {expected} (requested {requested}, on {device}): ")


def test_auto_is_fp32_when_told_the_cpu_lacks_bf16(caplog):
    with caplog.at_level(logging.INFO, logger="clipflow.model.precision"):
        assert resolve_precision("auto", cpu_bf16=False) == "fp32"
    assert "the CPU has neither amx_bf16 nor avx512_bf16" in caplog.text


def test_an_unknown_precision_is_one_clear_error():
    with pytest.raises(ClipflowError, match="precision must be one of auto, fp32, bf16, got 'int4'"):
        resolve_precision("int4")
    assert load_params(REPO / "params.yaml").serve.precision == "auto"


def test_bf16_weights_give_float32_embeddings_close_to_fp32(fp32, bf16):
    images = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    reference, cast = fp32.encode_images(images), bf16.encode_images(images)
    assert cast.dtype == torch.float32 and cast.shape == reference.shape
    assert torch.allclose(cast.norm(dim=-1), torch.ones(8), atol=1e-5)
    assert (reference * cast).sum(dim=-1).min() > 0.999
    texts_fp32, texts_bf16 = fp32.encode_text(TEXTS), bf16.encode_text(TEXTS)
    assert texts_bf16.dtype == torch.float32
    assert (texts_fp32 * texts_bf16).sum(dim=-1).min() > 0.999


def test_bf16_casts_a_copy_and_keeps_the_logit_scale(fp32, bf16):
    assert bf16.precision == "bf16" and bf16.model is not fp32.model
    assert fp32.precision == "fp32" and fp32.model.visual.conv1.weight.dtype == torch.float32
    assert bf16.model.visual.conv1.weight.dtype == torch.bfloat16
    assert bf16.model.logit_scale.dtype == torch.float32
    assert bf16.model.logit_scale.item() == fp32.model.logit_scale.item()
    assert fp32.at_precision("fp32") is fp32
    with pytest.raises(ClipflowError, match="a model runs at fp32 or bf16, not 'fp16'"):
        fp32.at_precision("fp16")


def test_bf16_text_batches_cut_to_their_longest_prompt_match_the_full_context(bf16):
    full = bf16.model.encode_text(bf16.tokenizer(TEXTS[:2])).float()  # every position of the context
    trimmed = bf16.encode_text(TEXTS[:2])
    assert (torch.nn.functional.normalize(full, dim=-1) * trimmed).sum(dim=-1).min() > 0.9995


def test_the_check_passes_bf16_with_its_numbers_and_refuses_it_past_a_threshold(fp32, bf16, small_params):
    numbers = check_precision(fp32, bf16, small_params, data_dir=None)
    assert set(numbers) == {"worst_image_cosine", "worst_text_cosine"}
    assert 0.999 < numbers["worst_image_cosine"] <= 1.0 + 1e-6 and 0.999 < numbers["worst_text_cosine"] <= 1.0 + 1e-6

    strict = load_params(REPO / "params.yaml", ["serve.precision_min_cosine=1.0"], profile="test")
    with pytest.raises(ClipflowError) as refused:
        check_precision(fp32, bf16, strict, data_dir=None)
    message = str(refused.value)
    assert message.startswith("bf16 does not match fp32: worst_image_cosine 0.99")
    assert "< serve.precision_min_cosine 1.0" in message and "serve.precision=fp32" in message


def test_a_top1_drop_of_exactly_the_threshold_passes_and_one_image_more_is_refused():
    # 200 images: fp32 right on 5, bf16 on 3, a drop of two images, which is serve.precision_max_top1_drop 0.01
    numbers, failures = top1_drop("seen", 0.025, 0.015, "bf16", max_drop=0.01)
    assert failures == [] and numbers == {
        "zeroshot_top1_seen_fp32": 0.025,
        "zeroshot_top1_seen_bf16": 0.015,
        "zeroshot_top1_drop_seen": 0.01,
    }
    numbers, failures = top1_drop("seen", 0.025, 0.01, "bf16", max_drop=0.01)
    assert numbers["zeroshot_top1_drop_seen"] == 0.015
    assert failures == [
        "zeroshot_top1_seen_bf16 0.0100 against fp32's 0.0250, a drop of 0.0150 > serve.precision_max_top1_drop 0.01"
    ]
