"""One training process. torchrun starts N of these; `clipflow train` is the launcher.

Single node, 2 CPU processes (what `clipflow train` runs; failed workers are restarted and
resume from the newest checkpoint):

    torchrun --standalone --nnodes 1 --nproc-per-node 2 --max-restarts 3 -m clipflow.train.worker JOB.json

Two nodes (c10d rendezvous at node 0), one command per node, as `clipflow train --nnodes 2
--node-rank R --rdzv-endpoint HOST:PORT` runs them:

    torchrun --nnodes 2 --node-rank R --nproc-per-node 2 --max-restarts 3 --rdzv-backend c10d \
        --rdzv-endpoint HOST:29400 --rdzv-id clipflow --rdzv-conf is_host=(R == 0) \
        -m clipflow.train.worker JOB.json

JOB.json is written by `clipflow.train.launch`: the resolved params, the data and output
directories, the checkpoint to resume from, and (on node 0) the MLflow run the leader logs to.
With several nodes, `train.checkpoint_dir` must be storage every node reads (S3 or a shared volume).
"""

from __future__ import annotations

import gc
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
from clipflow.train.checkpoint import CheckpointStore, fetch, load_state, rng_state, set_rng_state
from clipflow.train.data import RankBatches, ShardPairs, TrainAugment, rank_loader
from clipflow.train.loss import build_loss
from clipflow.train.metrics import MetricsFile, RunMetrics

MAX_LOGIT_SCALE = math.log(100.0)
# The launcher writes the job once the MLflow run is open: seconds, or minutes while a remote
# tracking server retries. A launcher that died without writing it must not leave workers waiting.
JOB_WAIT_SECONDS = 600


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # open_clip's gather calls an API torch has deprecated; one warning per step buries the log.
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather", category=FutureWarning)
    job = _read_job(Path(argv[0]))
    train(
        TrainParams(**job["params"]),
        data_dir=Path(job["data_dir"]),
        output_dir=Path(job["output_dir"]),
        checkpoint_extra=job["checkpoint_extra"],
        mlflow_run_id=job.get("mlflow_run_id"),
        resume=job.get("resume"),
        metrics_file=job.get("metrics_file"),
    )


def _read_job(path: Path) -> dict[str, Any]:
    """The job file, once the launcher has written it: it opens the MLflow run while torch imports here."""
    deadline = time.monotonic() + JOB_WAIT_SECONDS
    while not path.is_file():
        if time.monotonic() > deadline:
            raise SystemExit(f"clipflow worker: no job file {path} after {JOB_WAIT_SECONDS} s; is the launcher alive?")
        time.sleep(0.05)
    return json.loads(path.read_text())


def train(
    params: TrainParams,
    data_dir: Path,
    output_dir: Path,
    checkpoint_extra: dict[str, Any],
    mlflow_run_id: str | None,
    resume: str | None = None,
    metrics_file: str | None = None,
) -> None:
    """Train under the process group torchrun set up.

    The leader (local rank 0 of node 0: the node whose launcher owns the MLflow run) writes
    checkpoints and logs the step metrics: to `metrics_file`, which the launcher relays to the
    MLflow run, or to the run itself when there is no such file. A restarted job (torchrun's
    `--max-restarts`) resumes from the newest checkpoint this MLflow run wrote; a first start
    resumes from `resume` if given.
    """
    torch.set_num_threads(params.threads_per_proc)
    distributed = "WORLD_SIZE" in os.environ
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if distributed:
        # torchrun keeps one store across restarts; a restarted group that read the dead attempt's
        # keys (gloo peer addresses) failed to connect or hung here. Each attempt gets its own keys.
        store, rank, world_size = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            store=dist.PrefixStore(f"clipflow/attempt-{attempt}", store),
            rank=rank,
            world_size=world_size,
        )
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1
    leader = _leader_rank(params.node_rank == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0, device, distributed)

    store = CheckpointStore(params.checkpoint_dir or output_dir / "checkpoints")
    start_from = _agree(_resume_location(store, mlflow_run_id, resume) if rank == leader else None, leader, distributed)

    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    torch.manual_seed(params.seed)
    pretrained = _local_pretrained(params.pretrained, output_dir / "pretrained", distributed)
    clip = clip_model.create(params.model, pretrained=pretrained)
    module = clip.model.to(device)
    if params.lock_image:
        module.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    module.set_grad_checkpointing(params.grad_checkpointing)
    # The fused kernel updates all parameters in one pass: 6x faster than the per-tensor loop on CPU here.
    groups = _param_groups(module, params.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=params.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(params.warmup_steps, params.steps))
    start_step = 0
    if start_from:
        start_step = _restore(start_from, module, optimizer, scheduler, rank, world_size)
        if rank == leader:
            print(f"clipflow train: resuming at step {start_step} from {start_from}", file=sys.stderr, flush=True)
    # Gradients as views into DDP's all-reduce buckets: no copy of every gradient each step (3% here).
    model = DistributedDataParallel(module, gradient_as_bucket_view=True) if distributed else module
    loss_fn = build_loss(params.loss, rank, world_size)
    augment = TrainAugment(clip.preprocess_train)
    pairs = ShardPairs(data_dir, "train", clip.preprocess_train, clip.tokenizer)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if params.precision == "bf16" else nullcontext()

    logger = None
    if rank == leader and mlflow_run_id:
        logger = MetricsFile(metrics_file) if metrics_file else RunMetrics(mlflow_run_id)
    batches = rank_loader(
        RankBatches(pairs, augment, params.batch_size, params.seed, rank, world_size, start_step, params.steps),
        params.data_workers,
        pin_memory=device.type == "cuda",
    )
    window_start, window_samples = time.perf_counter(), 0
    model.train()
    steps = progress(batches, total=params.steps - start_step, desc=f"train from step {start_step}", enabled=rank == 0)
    for step, (images, tokens) in enumerate(steps, start=start_step + 1):
        optimizer.zero_grad(set_to_none=True)
        images = augment.normalize(images.to(device, non_blocking=True))
        loss = backward(model, loss_fn, images, tokens.to(device, non_blocking=True), params.accum_freq, autocast)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            module.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        window_samples += params.batch_size

        if step % params.log_every == 0 or step == params.steps:
            mean_loss = loss.float()
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
        if params.checkpoint_every and (step % params.checkpoint_every == 0 or step == params.steps):
            state = {
                "name": params.model,
                "state_dict": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                # The batch of step s is a function of (seed, s): the step is the data position.
                "samples_seen": step * params.batch_size,
                "rng": _gather(rng_state(), world_size, distributed),
                "clipflow": {**checkpoint_extra, "step": step},
            }
            if rank == leader:
                store.save(step, state, mlflow_run_id)
                store.prune(params.keep_checkpoints)

    if rank == leader:
        clip_model.save_checkpoint(output_dir, module, params.model, {**checkpoint_extra, "step": params.steps})
    if logger:
        logger.close()
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def backward(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    accum_freq: int,
    autocast,
) -> torch.Tensor:
    """Accumulate into `.grad` the gradient of the contrastive loss of this rank's whole batch.

    With `accum_freq` > 1 the batch goes through the model in that many micro-batches, the way
    open_clip's `--accum-freq` does it: first every micro-batch's features without gradients,
    then each micro-batch again with gradients, its live features placed among the cached
    features of the others. Each pass's loss is the full batch's loss, so every pair still meets
    every negative, and the passes' parameter gradients add up to the full-batch gradient:
    activation memory is one micro-batch's. The logit scale (and bias) take their gradient in one
    pass only (open_clip counts it accum_freq times); under DDP that pass is the synchronised last one.

    Args:
        model: the model, DDP-wrapped or not; `model(images, tokens)` returns features then scale(s).
        loss_fn: `loss_fn(image_features, text_features, *scales)`.
        images, tokens: this rank's part of the global batch.
        accum_freq: micro-batches; must divide the batch.
        autocast: the precision context.

    Returns:
        The (detached) loss of the batch.
    """
    # The kernel choice must hold in backward too: gradient checkpointing recomputes attention there.
    with _attention_kernels():
        if accum_freq == 1:
            with autocast:
                image_features, text_features, *scales = model(images, tokens)
                loss = loss_fn(image_features, text_features, *scales)
            loss.backward()
            return loss.detach()

        image_chunks, token_chunks = images.chunk(accum_freq), tokens.chunk(accum_freq)
        with torch.no_grad(), autocast:
            cached = [model(i, t)[:2] for i, t in zip(image_chunks, token_chunks, strict=True)]
        for j, (chunk_images, chunk_tokens) in enumerate(zip(image_chunks, token_chunks, strict=True)):
            last = j == accum_freq - 1
            # Gradients sum locally until the last pass, whose backward all-reduces them once.
            sync = nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync()
            with sync:
                with autocast:
                    image_features, text_features, *scales = model(chunk_images, chunk_tokens)
                    if not last:
                        scales = [scale.detach() for scale in scales]
                    others_before, others_after = cached[:j], cached[j + 1 :]
                    all_images = torch.cat(
                        [c[0] for c in others_before] + [image_features] + [c[0] for c in others_after]
                    )
                    all_texts = torch.cat(
                        [c[1] for c in others_before] + [text_features] + [c[1] for c in others_after]
                    )
                    loss = loss_fn(all_images, all_texts, *scales)
                loss.backward()
        return loss.detach()


def _leader_rank(is_leader: bool, device: torch.device, distributed: bool) -> int:
    """The global rank of the leader: c10d assigns ranks in an order unrelated to node ranks."""
    if not distributed:
        return 0
    flag = torch.tensor([dist.get_rank() if is_leader else 0], device=device)
    dist.all_reduce(flag)
    return int(flag.item())


def _agree(value: Any, src: int, distributed: bool) -> Any:
    """`value` as the rank `src` has it, on every rank."""
    if not distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def _gather(value: Any, world_size: int, distributed: bool) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not distributed:
        return [value]
    values: list[Any] = [None] * world_size
    dist.all_gather_object(values, value)
    return values


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


def _restore(location: str, module, optimizer, scheduler, rank: int, world_size: int) -> int:
    """Load a resumable checkpoint into the model, optimizer and schedule; returns its step."""
    state = load_state(location)
    module.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if len(state["rng"]) == world_size:
        set_rng_state(state["rng"][rank])
    elif rank == 0:
        # Only randomness inside the model (dropout) then differs from an uninterrupted run: the data
        # order and the crops are functions of the step, not of these states.
        print(
            f"clipflow train: checkpoint has RNG states of {len(state['rng'])} ranks, not {world_size}; reseeding",
            file=sys.stderr,
        )
    return int(state["step"])


def _local_pretrained(uri: str, folder: Path, distributed: bool) -> str | None:
    """A local file for `train.pretrained` (fetched by each node's first process), or None."""
    if not uri:
        return None
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        fetch(uri, folder)
    if distributed:
        dist.barrier()
    return str(fetch(uri, folder))  # now a local hit on every process


def _attention_kernels():
    """A fresh context choosing the attention kernel for one forward and backward pass.

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


if __name__ == "__main__":
    main()
    # Nothing is left to free: the interpreter's teardown would still walk every object that
    # torch and open_clip created, 1.6 s per process here; frozen objects are skipped.
    gc.freeze()
