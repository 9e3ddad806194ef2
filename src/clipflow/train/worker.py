"""One training process. torchrun starts N of these; `clipflow train` is the launcher.

Single node, 2 CPU processes (what `clipflow train` runs):

    torchrun --standalone --nproc-per-node 2 -m clipflow.train.worker JOB.json

Two nodes on one host (c10d rendezvous), one command per node:

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \
        --rdzv-endpoint 127.0.0.1:29400 --rdzv-id clip -m clipflow.train.worker JOB.json

JOB.json is written by `clipflow.train.launch`: the resolved params, the data and output
directories, and the MLflow run that rank 0 logs metrics to.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

from clipflow import model as clip_model
from clipflow.params import TrainParams
from clipflow.progress import progress
from clipflow.train.data import ShardPairs, rank_batches
from clipflow.train.loss import build_loss

MAX_LOGIT_SCALE = math.log(100.0)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # open_clip's gather calls an API torch has deprecated; one warning per step buries the log.
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather", category=FutureWarning)
    job = json.loads(Path(argv[0]).read_text())
    train(
        TrainParams(**job["params"]),
        data_dir=Path(job["data_dir"]),
        output_dir=Path(job["output_dir"]),
        checkpoint_extra=job["checkpoint_extra"],
        mlflow_run_id=job.get("mlflow_run_id"),
    )


def train(
    params: TrainParams,
    data_dir: Path,
    output_dir: Path,
    checkpoint_extra: dict[str, Any],
    mlflow_run_id: str | None,
) -> None:
    """Train under the process group torchrun set up; rank 0 writes the checkpoint."""
    torch.set_num_threads(params.threads_per_proc)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1

    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    torch.manual_seed(params.seed)
    clip = clip_model.create(params.model)
    module = clip.model
    model = DistributedDataParallel(module) if distributed else module
    loss_fn = build_loss(params.loss, rank, world_size)
    optimizer = torch.optim.AdamW(_param_groups(module, params.weight_decay), lr=params.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(params.warmup_steps, params.steps))
    dataset = ShardPairs(data_dir, "train", clip.preprocess_train, clip.tokenizer)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if params.precision == "bf16" else nullcontext()

    logger = _MetricLogger(mlflow_run_id) if rank == 0 and mlflow_run_id else None
    batches = rank_batches(dataset, params.batch_size, params.seed, rank, world_size, 0, params.steps)
    window_start, window_samples = time.perf_counter(), 0
    model.train()
    for step, (images, tokens) in enumerate(
        progress(batches, total=params.steps, desc="train", enabled=rank == 0), start=1
    ):
        with autocast, _attention_kernels():
            image_features, text_features, logit_scale = model(images, tokens)
            loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            module.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        window_samples += params.batch_size

        if step % params.log_every == 0 or step == params.steps:
            mean_loss = loss.detach().float()
            if distributed:
                dist.all_reduce(mean_loss)
                mean_loss /= world_size
            elapsed = time.perf_counter() - window_start
            if logger:
                logger.log(
                    step,
                    {
                        "train_loss": mean_loss.item(),
                        "lr": scheduler.get_last_lr()[0],
                        "logit_scale": module.logit_scale.exp().item(),
                        "samples_per_second": window_samples / elapsed,
                    },
                )
            window_start, window_samples = time.perf_counter(), 0

    if rank == 0:
        clip_model.save_checkpoint(output_dir, module, params.model, {**checkpoint_extra, "step": params.steps})
    if logger:
        logger.close()
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def _attention_kernels():
    """A fresh context choosing the attention kernel for one forward pass.

    On CPU the fused (flash) attention kernel's backward is slow for short sequences: the plain
    math kernel trained CLIP-Tiny twice as fast here (17 image tokens, 20 text tokens).
    """
    return nullcontext() if torch.cuda.is_available() else sdpa_kernel([SDPBackend.MATH])


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on gains, biases, embeddings or the logit scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("bias")
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _cosine_with_warmup(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_fraction = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress_fraction)))

    return factor


class _MetricLogger:
    """Rank 0's handle on the MLflow run: step metrics plus system metrics while it trains."""

    def __init__(self, run_id: str):
        import mlflow

        self._mlflow = mlflow
        self._run = mlflow.start_run(run_id=run_id, log_system_metrics=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


if __name__ == "__main__":
    main()
