"""The training loop of one process: resume, build the model, step through the batches, checkpoint, log."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from clipflow import model as clip_model
from clipflow.errors import ClipflowError
from clipflow.model.precision import resolve_precision
from clipflow.params import TrainParams
from clipflow.progress import progress
from clipflow.registry.models import local_checkpoint
from clipflow.train.checkpoint import CheckpointStore, load_state, rng_state, set_rng_state
from clipflow.train.data import (
    DeviceDecoder,
    RankBatches,
    ShardPairs,
    TrainAugment,
    batch_group,
    data_workers,
    rank_loader,
)
from clipflow.train.group import Group, local_rank, local_world_size
from clipflow.train.job import WorkerJob
from clipflow.train.loss import build_loss
from clipflow.train.metrics import MetricsFile, RunMetrics
from clipflow.train.optim import build_optimizer
from clipflow.train.step import optimizer_step, precision_context


def run(job: WorkerJob, data_dir: Path, output_dir: Path, group: Group) -> None:
    """Train `job.params.steps` steps on `data_dir`'s train split and write the checkpoint to `output_dir`.

    The leader writes checkpoints and logs the step metrics: to `job.metrics_file`, which the
    launcher relays to the MLflow run, or to the run itself when there is no such file. A
    restarted job (torchrun's `--max-restarts`) resumes from the newest checkpoint this MLflow
    run wrote; a first start resumes from `job.resume` if given.
    """
    params = job.params
    store = CheckpointStore(params.checkpoint_dir or output_dir / "checkpoints")
    start_from = group.agree(_resume_location(store, job.mlflow_run_id, job.resume) if group.leads else None)

    clip = _create_model(params, output_dir / "pretrained", group)
    module = clip.model
    optimizer, scheduler = build_optimizer(module, params)
    start_step = 0
    if start_from:
        start_step = _restore(start_from, module, optimizer, scheduler, group)
        if group.leads:
            print(f"clipflow train: resuming at step {start_step} from {start_from}", file=sys.stderr, flush=True)
    # Gradients as views into DDP's all-reduce buckets: no copy of every gradient each step (3% here).
    model = DistributedDataParallel(module, gradient_as_bucket_view=True) if group.distributed else module
    loss_fn = build_loss(params.loss, group.rank, group.world_size)
    augment = TrainAugment(clip.preprocess_train)
    pairs = ShardPairs(data_dir, "train", clip.preprocess_train, clip.tokenizer)
    # Where bf16 is emulated (a CPU without AMX or AVX512-BF16) autocast would make every step far slower.
    precision = resolve_precision(params.precision, str(group.device))
    autocast = precision_context(precision, group.device)
    if group.leads:
        print(f"clipflow train: {precision} (train.precision {params.precision})", file=sys.stderr, flush=True)

    logger = None
    if group.leads and job.mlflow_run_id:
        logger = MetricsFile(job.metrics_file) if job.metrics_file else RunMetrics(job.mlflow_run_id)
    on_device = _decodes_on_device(params.decode, group.device)
    decoder = DeviceDecoder(augment, group.device) if on_device else None
    workers = data_workers(params.data_workers, local_world_size(), params.threads_per_proc)
    batches = rank_loader(
        RankBatches(
            pairs,
            augment,
            params.batch_size,
            params.seed,
            group.rank,
            group.world_size,
            start_step,
            params.steps,
            encoded=on_device,
            group=batch_group(params.batch_group, data_dir, params.batch_size),
        ),
        workers,
        pin_memory=group.device.type == "cuda",
    )
    if group.leads:
        where = f"decoded on {group.device}" if on_device else "decoded by Pillow"
        print(f"clipflow train: images {where}, {workers} data-loader workers per process", file=sys.stderr, flush=True)
    window_start, window_samples = time.perf_counter(), 0
    model.train()
    steps = progress(
        batches, total=params.steps - start_step, desc=f"train from step {start_step}", enabled=group.rank == 0
    )
    for step, (images, tokens) in enumerate(steps, start=start_step + 1):
        images = decoder(images) if decoder else images.to(group.device, non_blocking=True)
        images = augment.normalize(images)
        tokens = tokens.to(group.device, non_blocking=True)
        loss = optimizer_step(model, module, optimizer, scheduler, loss_fn, images, tokens, params.accum_freq, autocast)
        window_samples += params.batch_size

        if step % params.log_every == 0 or step == params.steps:
            mean_loss = group.mean(loss.float())
            elapsed = time.perf_counter() - window_start
            if logger:
                # `train/`: MLflow charts the run's metrics in groups by the part before the slash.
                logger.log(
                    step,
                    {
                        "train/loss": mean_loss.item(),
                        "train/lr": scheduler.get_last_lr()[0],
                        "train/logit_scale": module.logit_scale.exp().item(),
                        "train/samples_per_second": window_samples / elapsed,
                    },
                )
            window_start, window_samples = time.perf_counter(), 0
        if params.checkpoint_every and (step % params.checkpoint_every == 0 or step == params.steps):
            state = _resumable_state(step, job, clip.name, module, optimizer, scheduler, group)
            if group.leads:
                store.save(step, state, job.mlflow_run_id)
                store.prune(params.keep_checkpoints)

    if group.leads:
        clip_model.save_checkpoint(output_dir, module, clip.name, {**job.checkpoint_extra, "step": params.steps})
    if logger:
        logger.close()


def _create_model(params: TrainParams, pretrained_folder: Path, group: Group) -> clip_model.ClipModel:
    """The model to train, on this process's device: random or pretrained weights, LiT's locked tower.

    A pretrained model is the one its checkpoint records (config and preprocessing), whatever `train.model` says.
    """
    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    torch.manual_seed(params.seed)
    pretrained = _local_pretrained(params, pretrained_folder, group)
    clip = clip_model.load(pretrained, params.model) if pretrained else clip_model.create(params.model)
    clip.model.to(group.device)
    if params.lock_image:
        clip.model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    clip.model.set_grad_checkpointing(params.grad_checkpointing)
    return clip


def _resumable_state(step: int, job: WorkerJob, name: str, module, optimizer, scheduler, group: Group) -> dict:
    """Everything a restart needs to continue after `step` as if uninterrupted; every rank must call it."""
    return {
        "name": name,
        "state_dict": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        # The batch of step s is a function of (seed, s): the step is the data position.
        "samples_seen": step * job.params.batch_size,
        "rng": group.gather(rng_state()),  # a collective: each rank's generators
        "clipflow": {**job.checkpoint_extra, "step": step},
    }


def _resume_location(store: CheckpointStore, mlflow_run_id: str | None, resume: str | None) -> str | None:
    """Where this start of the job resumes from.

    torchrun restarts failed workers with the same arguments, so a restart is told apart by
    TORCHELASTIC_RESTART_COUNT: it continues from the newest checkpoint of this MLflow run.
    A first start follows `resume` (a checkpoint location, resolved by the launcher), if any.
    """
    latest = store.latest()
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
    if restarted and latest is not None and latest.run_id == mlflow_run_id:
        return latest.location
    return resume


def _restore(location: str, module, optimizer, scheduler, group: Group) -> int:
    """Load a resumable checkpoint into the model, optimizer and schedule; returns its step."""
    state = load_state(location)
    module.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if len(state["rng"]) == group.world_size:
        set_rng_state(state["rng"][group.rank])
    elif group.rank == 0:
        # Only randomness inside the model (dropout) then differs from an uninterrupted run: the data
        # order and the crops are functions of the step, not of these states.
        ranks = len(state["rng"])
        print(
            f"clipflow train: checkpoint has RNG states of {ranks} ranks, not {group.world_size}; reseeding",
            file=sys.stderr,
        )
    return int(state["step"])


def _local_pretrained(params: TrainParams, folder: Path, group: Group) -> Path | None:
    """A local checkpoint of `train.pretrained` (made by each node's first process), or None.

    Under `clipflow train` it is the launcher's local copy already; a TrainJob's node fetches or loads the
    reference here, from `train.model_cache` where set.
    """
    if not params.pretrained:
        return None
    if local_rank() == 0:
        local_checkpoint(params.pretrained, params.model, params.model_cache, folder)
    group.barrier()
    return local_checkpoint(params.pretrained, params.model, params.model_cache, folder)  # a local hit now


def _decodes_on_device(decode: str, device: torch.device) -> bool:
    """Whether `train.decode` has the training device decode the images: gpu, or auto on a GPU."""
    if decode == "gpu" and device.type != "cuda":
        raise ClipflowError(f"train.decode gpu needs a CUDA device; this process trains on {device}")
    return decode == "gpu" or (decode == "auto" and device.type == "cuda")
