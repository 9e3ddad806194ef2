"""WiSE-FT: interpolating two state dicts, mixing two models, and the rule that picks the mix."""

import dataclasses

import pytest
import torch

from clipflow import model as clip_model
from clipflow.errors import ClipflowError
from clipflow.evaluate.wiseft import WiseftPoint, choose, interpolate, mix, target_set
from clipflow.params import ZeroshotSet


def _state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "weight": torch.randn(4, 3, generator=generator),
        "half": torch.randn(5, generator=generator).to(torch.bfloat16),
        "steps": torch.tensor([seed, seed + 1]),  # an integer buffer
    }


def test_the_ends_are_the_two_models_exactly_and_the_middle_is_their_mean():
    pretrained, finetuned = _state(0), _state(1)
    start = interpolate(pretrained, finetuned, 0.0)
    end = interpolate(pretrained, finetuned, 1.0)
    assert torch.equal(start["weight"], pretrained["weight"]) and torch.equal(start["half"], pretrained["half"])
    assert torch.equal(end["weight"], finetuned["weight"]) and torch.equal(end["half"], finetuned["half"])
    middle = interpolate(pretrained, finetuned, 0.25)
    assert torch.allclose(middle["weight"], 0.75 * pretrained["weight"] + 0.25 * finetuned["weight"])
    assert middle["half"].dtype == torch.bfloat16
    # integers are not mixed: between the ends they are the fine-tuned model's
    assert torch.equal(start["steps"], pretrained["steps"]) and torch.equal(middle["steps"], finetuned["steps"])
    # the inputs are left as they were
    assert torch.equal(pretrained["weight"], _state(0)["weight"])


def test_state_dicts_of_other_architectures_are_refused_in_one_line():
    pretrained, finetuned = _state(0), _state(1)
    with pytest.raises(ClipflowError, match="differ in 1 tensors, such as 'extra'"):
        interpolate(pretrained, {**finetuned, "extra": torch.zeros(1)}, 0.5)
    with pytest.raises(ClipflowError, match=r"'weight' is \(4, 3\) in the starting model and \(2,\) in the fine-tuned"):
        interpolate(pretrained, {**finetuned, "weight": torch.zeros(2)}, 0.5)


def test_a_mixed_model_embeds_between_its_two_ends():
    torch.manual_seed(0)
    pretrained, finetuned = clip_model.create("CLIP-Tiny"), clip_model.create("CLIP-Tiny")
    for clip in (pretrained, finetuned):
        clip.model.eval()
    texts = ["a red circle", "two blue stars"]
    assert torch.equal(mix(pretrained, finetuned, 0.0).encode_text(texts), pretrained.encode_text(texts))
    assert torch.equal(mix(pretrained, finetuned, 1.0).encode_text(texts), finetuned.encode_text(texts))
    halfway = mix(pretrained, finetuned, 0.5)
    weights = {name: tensor for name, tensor in halfway.model.state_dict().items() if tensor.is_floating_point()}
    for name, tensor in weights.items():
        expected = 0.5 * pretrained.model.state_dict()[name] + 0.5 * finetuned.model.state_dict()[name]
        assert torch.allclose(tensor, expected), name
    assert halfway.model is not finetuned.model  # the fine-tuned model itself is untouched


def _points(*rows):
    return [WiseftPoint(alpha, target, retention) for alpha, target, retention in rows]


def test_the_rule_takes_the_best_target_among_the_mixes_that_retain_enough():
    points = _points((0.0, 0.40, 0.70), (0.5, 0.60, 0.695), (0.75, 0.65, 0.68), (1.0, 0.70, 0.50))
    # retention may fall 0.01 below the starting model's 0.70: a = 0.75 (0.02 below) is out, 0.5 the best left
    assert choose(points, 0.70, 0.01).alpha == 0.5
    assert choose(points, 0.70, 0.02).alpha == 0.75
    # no retention set: the best target top-1
    assert choose(_points((0.0, 0.4, None), (1.0, 0.7, None)), None, 0.01).alpha == 1.0
    # a tie goes to the smaller departure from the starting weights
    assert choose(_points((0.0, 0.5, None), (0.5, 0.6, None), (1.0, 0.6, None)), None, 0.01).alpha == 0.5
    # fine-tuning that helped nowhere gives back the starting weights
    assert choose(_points((0.0, 0.5, None), (1.0, 0.5, None)), None, 0.01).alpha == 0.0


def test_without_a_qualifying_mix_the_rule_says_to_add_a_zero():
    with pytest.raises(ClipflowError, match=r"add 0.0 to evaluate.wiseft.alphas"):
        choose(_points((0.5, 0.6, 0.5), (1.0, 0.7, 0.4)), 0.70, 0.01)


def test_the_target_is_the_named_set_else_the_gated_one_else_the_first(small_params):
    sets = {name: ZeroshotSet(split="test", label_field="label") for name in ("first", "digits")}

    def with_settings(target=None, retention=None, floors=None):
        wiseft = dataclasses.replace(small_params.evaluate.wiseft, target=target, retention=retention)
        promote = dataclasses.replace(small_params.promote, floors=floors or {}, min_over_chance={})
        return dataclasses.replace(
            small_params, evaluate=dataclasses.replace(small_params.evaluate, wiseft=wiseft), promote=promote
        )

    assert target_set(with_settings(), sets) == "first"
    assert target_set(with_settings(floors={"zeroshot_top1_digits": 0.2}), sets) == "digits"
    assert target_set(with_settings(target="first", floors={"zeroshot_top1_digits": 0.2}), sets) == "first"
    with pytest.raises(ClipflowError, match="evaluate.wiseft.retention 'general' is no zero-shot set of this data"):
        target_set(with_settings(retention="general"), sets)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "evaluate.wiseft={alphas: [0.0, 1.5], target: null, retention: null, max_retention_drop: 0.01}",
            r"evaluate.wiseft.alphas must be fractions in \[0, 1\], got 1.5",
        ),
        (
            "evaluate.wiseft={alphas: [0.5], target: null, retention: null, max_retention_drop: -0.1}",
            r"evaluate.wiseft.max_retention_drop must be a fraction in \[0, 1\], got -0.1",
        ),
        (
            "evaluate.wiseft={alphas: [0.5], target: general, retention: null, max_retention_drop: 0.01}",
            "evaluate.wiseft.target names no zero-shot set: 'general'",
        ),
        (
            "promote.min_over_chance={retrieval_i2t_r1: 0.1}",
            "promote.min_over_chance names zeroshot_top1_<set> metrics, got 'retrieval_i2t_r1'",
        ),
        (
            "promote.min_over_chance={zeroshot_top1_seen: 2}",
            "promote.min_over_chance.zeroshot_top1_seen must be a fraction",
        ),
        ("promote.bootstrap_samples=0", "promote.bootstrap_samples must be positive, got 0"),
        ("promote.confidence=1.0", r"promote.confidence must be a level in \(0, 1\), got 1.0"),
    ],
)
def test_wiseft_and_gate_settings_are_checked_when_the_params_load(override, message):
    from clipflow.params import load_params
    from tests.support import REPO

    with pytest.raises(ClipflowError, match=message):
        load_params(REPO / "params.yaml", [override])
    # the built-in data's own set may be named: whether the data has it is checked after ingest
    load_params(
        REPO / "params.yaml",
        ["evaluate.wiseft={alphas: [0.5], target: heldout, retention: seen, max_retention_drop: 0.01}"],
    )
