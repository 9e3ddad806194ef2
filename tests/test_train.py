import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from clipflow import model as clip_model
from clipflow.data.ingest import ingest
from clipflow.train.data import global_batch_indices
from clipflow.train.worker import _cosine_with_warmup, _param_groups

REPO = Path(__file__).resolve().parents[1]


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


def _clipflow_train(folder: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("clipflow")), "train", "--data", "data", "--output", "model"]
    command += ["--profile", "test", "--nproc", "2"]
    for override in overrides:
        command += ["--set", override]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(("loss", "model"), [("tiled", "CLIP-Tiny"), ("siglip", "CLIP-Tiny-Sigmoid")])
def test_clipflow_train_with_a_tiled_loss_on_two_processes(tmp_path, small_params, loss, model):
    """`clipflow train` as a user runs it: torchrun, 2 gloo processes, a checkpoint and an MLflow run."""
    ingest("builtin", tmp_path / "data", small_params.data)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    result = _clipflow_train(tmp_path, f"train.loss={loss}", f"train.model={model}")
    assert result.returncode == 0, result.stderr[-3000:]
    trained = json.loads((tmp_path / "model/train.json").read_text())
    assert clip_model.read_checkpoint_info(trained["checkpoint"])["clipflow"]["step"] == small_params.train.steps
    weights = clip_model.load(trained["checkpoint"]).model
    if loss == "siglip":  # the bias is trained, from the config's -10
        assert weights.logit_bias.item() != -10.0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        run = mlflow.get_run(trained["mlflow_run_id"])
        assert run.data.params["train.loss"] == loss and run.data.params["train.nproc"] == "2"
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")
        assert [m.step for m in history] == list(range(4, small_params.train.steps + 1, 4))
    finally:
        mlflow.set_tracking_uri(None)


def test_the_sigmoid_loss_refuses_a_model_without_a_logit_bias(tmp_path, small_params):
    ingest("builtin", tmp_path / "data", small_params.data)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    result = _clipflow_train(tmp_path, "train.loss=siglip", "train.model=CLIP-Tiny")
    assert result.returncode != 0
    assert "train.loss=siglip needs a model with a logit bias" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "model").exists()
