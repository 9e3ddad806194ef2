import torch

from clipflow import model as clip_model
from clipflow.train.data import global_batch_indices
from clipflow.train.worker import _cosine_with_warmup, _param_groups


def test_an_epoch_visits_each_sample_at_most_once_and_steps_are_reproducible():
    steps_per_epoch = 100 // 16
    epoch = torch.cat([global_batch_indices(100, 16, step, seed=3) for step in range(steps_per_epoch)])
    assert len(set(epoch.tolist())) == steps_per_epoch * 16
    assert torch.equal(global_batch_indices(100, 16, 4, seed=3), global_batch_indices(100, 16, 4, seed=3))
    # the next epoch is a new order, not a repeat
    assert not torch.equal(global_batch_indices(100, 16, 0, seed=3), global_batch_indices(100, 16, steps_per_epoch, 3))


def test_weight_decay_skips_gains_biases_embeddings_and_logit_scale():
    model = clip_model.create("CLIP-Tiny").model
    decay, no_decay = _param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "token_embedding.weight", "positional_embedding", "ln_final.weight"} <= no_decay_names
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"text_projection", "visual.proj", "visual.conv1.weight"} <= decay_names
    assert not any("bias" in n or "embedding" in n or ".ln" in n for n in decay_names)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_learning_rate_warms_up_then_decays_to_zero():
    factor = _cosine_with_warmup(warmup_steps=10, total_steps=100)
    warmup = [factor(step) for step in range(10)]
    assert warmup == sorted(warmup) and warmup[-1] == 1.0
    assert factor(55) < factor(20) < 1.0
    assert factor(100) == 0.0
