"""The training step in one process: accumulation, checkpointing, LiT, pretrained weights, RNG, S3 store."""

import copy
import random
import time
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import pytest
import torch

from clipflow import model as clip_model
from clipflow.data.ingest import ingest
from clipflow.errors import ClipflowError
from clipflow.model import precision as precision_module
from clipflow.train import worker
from clipflow.train.checkpoint import CheckpointStore, load_state, rng_state, set_rng_state
from clipflow.train.job import WorkerJob
from clipflow.train.loss import build_loss
from clipflow.train.metrics import POLL_SECONDS, MetricsFile, MetricsRelay
from clipflow.train.step import backward
from tests.support.servers import seaweedfs

BATCH = 16


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, 64, 64, generator=generator)
    tokens = torch.randint(1, 49000, (BATCH, 20), generator=generator)
    return images, tokens


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return clip_model.create("CLIP-Tiny").model


def _gradients(model, images, tokens, accum_freq, loss_kind="clip"):
    model = copy.deepcopy(model)
    loss = backward(model, build_loss(loss_kind, 0, 1), images, tokens, accum_freq, nullcontext())
    return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_kind", ["clip", "tiled"])
def test_accumulated_micro_batches_give_the_full_batch_gradient(tiny, batch, loss_kind):
    full_loss, full = _gradients(tiny, *batch, accum_freq=1, loss_kind=loss_kind)
    for accum_freq in (2, 4):
        loss, accumulated = _gradients(tiny, *batch, accum_freq=accum_freq, loss_kind=loss_kind)
        torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-6)
        assert accumulated.keys() == full.keys()
        for name in full:
            torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_micro_batches_alone_would_lose_negatives(tiny, batch):
    """The check above can fail: averaging two half-batch losses is a different gradient."""
    images, tokens = batch
    _, full = _gradients(tiny, images, tokens, accum_freq=1)
    model = copy.deepcopy(tiny)
    loss_fn = build_loss("clip", 0, 1)
    for chunk_images, chunk_tokens in zip(images.chunk(2), tokens.chunk(2), strict=True):
        (loss_fn(*model(chunk_images, chunk_tokens)) / 2).backward()
    name = "visual.proj"
    assert not torch.allclose(dict(model.named_parameters())[name].grad, full[name], rtol=1e-3, atol=1e-5)


def _block_forwards(model) -> list[int]:
    """Counts forward passes of the first image-tower block, which checkpointing runs again in backward.

    A pre-hook: torch's checkpoint stops a recomputation once it has the tensors backward needs,
    before the block's forward returns, so a forward (post) hook would not see it.
    """
    calls = [0]
    block = model.visual.transformer.resblocks[0]
    block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_gradient_checkpointing_keeps_the_gradients(tiny, batch):
    plain_model = copy.deepcopy(tiny)
    plain_calls = _block_forwards(plain_model)
    _, plain = _gradients(plain_model, *batch, accum_freq=1)
    checkpointed = copy.deepcopy(tiny)
    checkpointed.set_grad_checkpointing(True)
    recomputed_calls = _block_forwards(checkpointed)
    _, recomputed = _gradients(checkpointed, *batch, accum_freq=1)
    # Proof that checkpointing was on: the block's activations were recomputed in backward.
    assert recomputed_calls[0] == 2 * plain_calls[0] > 0
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    torch.save({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    again = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("weed")) as server:
        server.client().create_bucket(Bucket="ckpt")
        yield server


def _resumable(step: int) -> dict:
    """A state with every part a resumed run reads (`load_state` refuses less), its weights telling the steps apart."""
    weights = {"w": torch.full((3,), float(step))}
    optimizer = {"state": {}, "param_groups": []}
    return {"step": step, "state_dict": weights, "optimizer": optimizer, "scheduler": {}, "rng": [], "clipflow": {}}


def test_checkpoint_store_on_s3_points_at_the_newest_and_prunes(s3, monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    store = CheckpointStore("s3://ckpt/run-a")
    assert store.latest() is None
    for step in (2, 4, 6):
        store.save(step, _resumable(step), run_id="r1")
    store.prune(keep=2)
    latest = store.latest()
    assert (latest.location, latest.step, latest.run_id) == ("s3://ckpt/run-a/step-000006.pt", 6, "r1")
    assert torch.equal(load_state(latest.location)["state_dict"]["w"], torch.full((3,), 6.0))
    keys = sorted(obj["Key"] for obj in s3.client().list_objects_v2(Bucket="ckpt")["Contents"])
    assert keys == ["run-a/latest", "run-a/step-000004.pt", "run-a/step-000006.pt"]


def test_checkpoint_store_in_a_folder_points_at_the_newest_and_prunes(tmp_path):
    store = CheckpointStore(tmp_path / "run-a")
    assert store.latest() is None
    for step in (2, 4, 6):
        store.save(step, _resumable(step), run_id="r1")
    store.prune(keep=2)
    latest = store.latest()
    assert (latest.location, latest.step, latest.run_id) == (f"{tmp_path}/run-a/step-000006.pt", 6, "r1")
    assert torch.equal(load_state(latest.location)["state_dict"]["w"], torch.full((3,), 6.0))
    # No temporary file left behind, and readable by the other nodes' users.
    files = sorted((tmp_path / "run-a").iterdir())
    assert [path.name for path in files] == ["latest", "step-000004.pt", "step-000006.pt"]
    assert {path.stat().st_mode & 0o777 for path in files} == {0o644}


def test_training_from_s3_pretrained_weights_with_a_locked_image_tower(s3, monkeypatch, tmp_path, small_params):
    """LiT through the real loop: the image tower keeps the pretrained weights, the text tower learns."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    torch.manual_seed(42)  # not the training seed: weights that a random init could not reproduce
    pretrained = clip_model.create("CLIP-Tiny").model
    clip_model.save_checkpoint(tmp_path / "pretrained.pt", pretrained, "CLIP-Tiny", {})
    s3.client().upload_file(str(tmp_path / "pretrained.pt"), "ckpt", "models/tiny.pt")

    ingest("builtin", tmp_path / "data", small_params.data)
    params = replace(
        small_params.train, steps=2, pretrained="s3://ckpt/models/tiny.pt", lock_image=True, checkpoint_every=0
    )
    worker.train(WorkerJob(params, mlflow_run_id=None, checkpoint_extra={}), tmp_path / "data", tmp_path / "out")

    trained = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["state_dict"]
    start = pretrained.state_dict()
    visual = [name for name in start if name.startswith("visual.")]
    assert visual and all(torch.equal(trained[name], start[name]) for name in visual)
    assert not torch.equal(trained["text_projection"], start["text_projection"])


@pytest.mark.parametrize(("cpu_flags", "chosen"), [({"avx2", "fma"}, "fp32"), ({"avx2", "avx512_bf16"}, "bf16")])
def test_auto_precision_trains_as_the_cpu_s_native_precision_would(
    cpu_flags, chosen, tmp_path, small_params, monkeypatch, capfd
):
    """`train.precision: auto` gives the very weights of the precision it picks from the CPU's flags."""
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset(cpu_flags))
    ingest("builtin", tmp_path / "data", small_params.data)
    other = {"fp32": "bf16", "bf16": "fp32"}[chosen]
    weights = {}
    for setting in ("auto", chosen, other):
        params = replace(small_params.train, nproc=1, steps=1, precision=setting, checkpoint_every=0)
        worker.train(WorkerJob(params, mlflow_run_id=None, checkpoint_extra={}), tmp_path / "data", tmp_path / setting)
        weights[setting] = torch.load(tmp_path / setting / "checkpoint.pt", weights_only=True)["state_dict"]
    assert f"clipflow train: {chosen} (train.precision auto)" in capfd.readouterr().err
    assert weights["auto"].keys() == weights[chosen].keys()
    assert all(torch.equal(weights["auto"][name], weights[chosen][name]) for name in weights[chosen])
    assert not all(torch.equal(weights["auto"][name], weights[other][name]) for name in weights[other])


def test_the_metrics_relay_forwards_complete_lines_once_and_reports_a_refusing_store(tmp_path):
    import mlflow

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 7, "metrics": {"train_loss": 9.0}}\n')  # an earlier job's line: not this run's
    # Other tests in this process may have left MLflow on another store and experiment.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        run_id = client.create_run(experiment_id="0").info.run_id
        relay = MetricsRelay(path, run_id)
        leader = MetricsFile(path)
        leader.log(1, {"train_loss": 3.0, "lr": 0.1})
        with path.open("a") as file:  # a step written in two parts is forwarded once, when complete
            file.write('{"step": 2, "metrics": {"train_')
            file.flush()
            time.sleep(2 * POLL_SECONDS)
            file.write('loss": 2.0}}\n')
        leader.log(2, {"train_loss": 2.5})  # a restarted leader replaying a logged step
        leader.log(3, {"train_loss": 1.0})
        leader.close()
        relay.close()
        history = {m.step: m.value for m in client.get_metric_history(run_id, "train_loss")}
        assert history == {1: 3.0, 2: 2.0, 3: 1.0}
        assert [m.step for m in client.get_metric_history(run_id, "lr")] == [1]

        relay = MetricsRelay(path, "no-such-run")
        with pytest.raises(ClipflowError, match="could not log the step metrics to MLflow"):
            relay.close()
    finally:
        mlflow.set_tracking_uri(None)
