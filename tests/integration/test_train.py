import io
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import mlflow
import numpy as np
import psutil
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision import transforms

from clipflow import model as clip_model
from clipflow.data.ingest import ingest
from clipflow.data.pairs import ShardPairs
from clipflow.errors import ClipflowError
from clipflow.train.data import (
    DeviceDecoder,
    EncodedImages,
    RankBatches,
    TrainAugment,
    batch_group,
    crop_box,
    data_workers,
    global_batch_indices,
    rank_loader,
)
from clipflow.train.optim import cosine_with_warmup, param_groups
from tests.support import REPO


def test_an_epoch_visits_each_sample_at_most_once_and_steps_are_reproducible():
    steps_per_epoch = 100 // 16
    epoch = torch.cat([global_batch_indices(100, 16, step, seed=3) for step in range(steps_per_epoch)])
    assert len(set(epoch.tolist())) == steps_per_epoch * 16
    assert torch.equal(global_batch_indices(100, 16, 4, seed=3), global_batch_indices(100, 16, 4, seed=3))
    # the next epoch is a new order, not a repeat
    assert not torch.equal(global_batch_indices(100, 16, 0, seed=3), global_batch_indices(100, 16, steps_per_epoch, 3))


def test_grouped_batches_keep_each_twin_pair_together_and_still_cover_the_epoch_once():
    steps_per_epoch = 100 // 16
    epoch = [global_batch_indices(100, 16, step, seed=3, group=2).tolist() for step in range(steps_per_epoch)]
    flat = [i for batch in epoch for i in batch]
    assert len(set(flat)) == len(flat) == steps_per_epoch * 16
    for batch in epoch:  # 2k and 2k + 1 side by side, in a shuffled order of pairs
        assert all(
            first % 2 == 0 and second == first + 1 for first, second in zip(batch[::2], batch[1::2], strict=True)
        )
    assert sorted(flat) != flat
    # one sample a group draws the same order as the ungrouped sampler always did
    assert torch.equal(global_batch_indices(100, 16, 2, seed=3, group=1), global_batch_indices(100, 16, 2, seed=3))


def test_auto_batch_groups_are_the_builtin_datas_twins_and_a_batch_must_hold_whole_groups(tmp_path, small_params):
    ingest("builtin", tmp_path / "data", small_params.data)
    assert batch_group("auto", tmp_path / "data", 64) == 2
    assert batch_group(1, tmp_path / "data", 63) == 1
    with pytest.raises(ClipflowError, match=r"train.batch_size 63 must be a multiple of train.batch_group 2 \(auto"):
        batch_group("auto", tmp_path / "data", 63)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    result = _clipflow_train(tmp_path, "train.batch_size=48", "train.batch_group=32")
    assert result.returncode != 0  # refused before any worker starts
    assert "train.batch_size 48 must be a multiple of train.batch_group 32" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("size", [(64, 64), (97, 41), (23, 80)])
def test_the_batched_augmentation_equals_open_clips_transform_for_the_same_crop(size):
    """Within rounding: torch's uint8 resize follows Pillow's two-pass filters to two levels of 255 on
    noise, and most pixels exactly."""
    clip = clip_model.create("CLIP-Tiny")
    augment = TrainAugment(clip.preprocess_train)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    image = Image.fromarray(pixels.numpy())
    png = io.BytesIO()
    image.save(png, format="PNG")
    for seed in range(5):
        left, top, width, height = crop_box(*size, augment.scale, augment.ratio, random.Random(seed))
        ours = augment.normalize(augment.crop(png.getvalue(), seed)[None])[0]
        with mock.patch.object(transforms.RandomResizedCrop, "get_params", return_value=(top, left, height, width)):
            reference = clip.preprocess_train(image)
        two_levels = 2 / 255 / min(augment.std)
        assert ours.shape == reference.shape and (ours - reference).abs().max() <= two_levels + 1e-5
        assert torch.isclose(ours, reference, atol=1e-5).float().mean() > 0.95


def _photo_like(width: int, height: int, seed: int) -> bytes:
    """A JPEG at q95 (as ingest stores images) with a photo's mix of smooth regions and texture."""
    rng = np.random.default_rng(seed)
    colours = Image.fromarray((rng.random((8, 10, 3)) * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    texture = np.asarray(colours).astype(np.int16) + rng.normal(0, 18, (height, width, 3)).astype(np.int16)
    photo = Image.fromarray(texture.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))
    encoded = io.BytesIO()
    photo.save(encoded, format="JPEG", quality=95)
    return encoded.getvalue()


def test_the_device_decode_path_gives_the_pillow_paths_crops():
    """`train.decode: gpu`'s tensor path, run on the CPU: the same boxes for the same seeds, and pixels
    equal within rounding where both decode at full scale. Where the crop lets a JPEG decode at 1/2 to
    1/8 scale, libjpeg's scaled IDCT (Pillow) and a box average of the full decode (device) differ by a
    fraction of a level on average, a few at most."""
    clip = clip_model.create("ViT-B-32")
    augment = TrainAugment(clip.preprocess_train)
    decoder = DeviceDecoder(augment, torch.device("cpu"))
    # Smaller than the crop: upscaled, as the built-in renders are.
    png = io.BytesIO()
    Image.open(io.BytesIO(_photo_like(120, 90, 3))).save(png, format="PNG")
    files = {
        "png": png.getvalue(),
        **{f"jpeg{w}x{h}": _photo_like(w, h, w) for w, h in [(300, 260), (640, 512), (2000, 1800)]},
    }
    reductions = {}
    for name, payload in files.items():
        seeds = range(4)
        encoded = [augment.encoded(payload, seed) for seed in seeds]
        on_device = decoder(EncodedImages([p for p, _ in encoded], torch.tensor([plan for _, plan in encoded])))
        assert on_device.shape == (len(seeds), 3, 224, 224) and on_device.dtype == torch.uint8
        for seed, (_, plan), device_crop in zip(seeds, encoded, on_device, strict=True):
            pillow_crop = augment.crop(payload, seed)
            difference = (pillow_crop.int() - device_crop.int()).abs()
            reductions.setdefault(name, set()).add(plan.reduction)
            if plan.reduction == 1:
                assert difference.max() <= 2, (name, seed)
            else:
                assert difference.float().mean() < 1.0 and difference.max() <= 10, (name, seed, plan)
    assert reductions["png"] == {1} and reductions["jpeg300x260"] == {1}
    assert reductions["jpeg640x512"] == {2} and reductions["jpeg2000x1800"] <= {4, 8}


def test_crop_boxes_keep_to_the_scale_and_ratio_bounds():
    scale, ratio = (0.3, 1.0), (3 / 4, 4 / 3)
    for seed in range(200):
        left, top, width, height = crop_box(120, 90, scale, ratio, random.Random(seed))
        assert left >= 0 and top >= 0 and left + width <= 120 and top + height <= 90
        assert scale[0] - 0.05 <= width * height / (120 * 90) <= scale[1]
        assert ratio[0] - 0.05 <= width / height <= ratio[1] + 0.05
    # No box of this ratio fits a 1000 x 10 strip: the fallback is its central crop at the widest ratio.
    assert crop_box(1000, 10, scale, ratio, random.Random(0)) == (493, 0, 13, 10)


def test_a_batch_is_the_same_whatever_the_process_layout_workers_or_resume_point(tmp_path, small_params):
    ingest("builtin", tmp_path / "data", small_params.data)
    clip = clip_model.create("CLIP-Tiny")
    augment = TrainAugment(clip.preprocess_train)
    pairs = ShardPairs(tmp_path / "data", "train", clip.preprocess_train, clip.tokenizer)

    def batches(rank, world_size, start_step, workers):
        loader = rank_loader(RankBatches(pairs, augment, 16, 7, rank, world_size, start_step, 5), workers, False)
        return list(loader)

    one_process = batches(0, 1, 0, 0)
    assert one_process[0][0].dtype == torch.uint8 and one_process[0][0].shape == (16, 3, 64, 64)
    assert one_process[0][1].shape == (16, clip.model.context_length)
    two_processes = list(zip(batches(0, 2, 0, 0), batches(1, 2, 0, 2), strict=True))
    for (images, tokens), ((images_0, tokens_0), (images_1, tokens_1)) in zip(one_process, two_processes, strict=True):
        assert torch.equal(images, torch.cat([images_0, images_1]))
        assert torch.equal(tokens, torch.cat([tokens_0, tokens_1]))
    resumed = batches(0, 1, 3, 0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one_process[3:], resumed, strict=True))


def test_weight_decay_skips_gains_biases_embeddings_and_logit_scale():
    model = clip_model.create("CLIP-Tiny").model
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "token_embedding.weight", "positional_embedding", "ln_final.weight"} <= no_decay_names
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"text_projection", "visual.proj", "visual.conv1.weight"} <= decay_names
    assert not any("bias" in n or "embedding" in n or ".ln" in n for n in decay_names)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_learning_rate_warms_up_then_decays_to_zero():
    factor = cosine_with_warmup(warmup_steps=10, total_steps=100)
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
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
        assert [m.step for m in history] == list(range(4, small_params.train.steps + 1, 4))
    finally:
        mlflow.set_tracking_uri(None)


def test_a_tracking_store_that_fails_stops_the_started_workers(tmp_path, small_params):
    """torchrun starts before the MLflow run is opened: when that fails, no worker is left behind."""
    ingest("builtin", tmp_path / "data", small_params.data)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    stale_job = tmp_path / "model" / "job-node0.json"  # an earlier run's job: never this run's
    stale_job.parent.mkdir()
    stale_job.write_text(json.dumps({"stale": True}))
    result = _clipflow_train(tmp_path, "tracking.uri=bogus://nowhere")
    assert result.returncode == 1
    assert "cannot use the MLflow tracking store bogus://nowhere" in result.stderr.strip().splitlines()[-1]
    assert not stale_job.exists()
    # torchrun and its workers run in the folder `clipflow train` ran in (their command lines hold only relative paths).
    left = [p.info for p in psutil.process_iter(["pid", "cmdline", "cwd"]) if p.info["cwd"] == str(tmp_path)]
    assert not left, left


def test_decoding_on_a_gpu_that_is_not_there_is_refused_before_any_worker_starts(tmp_path, small_params):
    ingest("builtin", tmp_path / "data", small_params.data)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    result = _clipflow_train(tmp_path, "train.decode=gpu")
    assert result.returncode != 0
    assert "train.decode gpu needs a GPU and this machine has none" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    ("setting", "processes", "threads", "cores", "workers"),
    [
        ("auto", 2, 1, 2, 0),  # this machine's default layout: batches in line
        ("auto", 1, 4, 16, 12),  # one GPU process on a 16-core node
        ("auto", 8, 1, 16, 1),
        (3, 2, 1, 2, 3),  # a number is kept, whatever the cores
    ],
)
def test_auto_data_workers_take_the_cores_beyond_the_training_threads(
    setting, processes, threads, cores, workers, monkeypatch
):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert data_workers(setting, processes, threads) == workers


def test_the_sigmoid_loss_refuses_a_model_without_a_logit_bias(tmp_path, small_params):
    ingest("builtin", tmp_path / "data", small_params.data)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    result = _clipflow_train(tmp_path, "train.loss=siglip", "train.model=CLIP-Tiny")
    assert result.returncode != 0
    assert "train.loss=siglip needs a model with a logit bias" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "model").exists()
