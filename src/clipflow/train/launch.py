"""The train step: open an MLflow run, launch the workers under torchrun, log the model."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from clipflow import model as clip_model
from clipflow import tracking
from clipflow.artifacts import IngestReport, JsonRecord, TrainReport, lineage
from clipflow.errors import ClipflowError
from clipflow.model.hub import check_cached
from clipflow.params import Params, TrainParams
from clipflow.references import HUB_KINDS
from clipflow.registry.models import local_checkpoint, log_clip_model
from clipflow.storage import Store, is_s3
from clipflow.train import orphans
from clipflow.train.checkpoint import CheckpointStore, load_state
from clipflow.train.data import batch_group
from clipflow.train.job import WorkerJob, checkpoint_extra
from clipflow.train.metrics import FILE_NAME as METRICS_FILE
from clipflow.train.metrics import MetricsRelay, last_logged

# Beside the checkpoint, and an artifact of the run: what torchrun and the workers printed.
TRAIN_LOG = "train.log"
PARAMS_ARTIFACT = "params.yaml"
TRAIN_SPLIT = "train"
# Under the output folder: the start weights of `train.pretrained`, as a local checkpoint.
PRETRAINED_DIR = "pretrained"
# After torchrun exits, how long its output may take to drain; a process it left behind that
# still holds the pipe must not keep the step waiting.
LOG_DRAIN_SECONDS = 30.0


@dataclass(frozen=True)
class NodeReport(JsonRecord):
    """What a node other than node 0 reports: node 0 owns the run and the model."""

    node_rank: int
    seconds: float


def train(
    data_dir: str | Path,
    output_dir: str | Path,
    params: Params,
    resume: str | None = None,
    launcher: str = "torchrun",
    data_uri: str | None = None,
) -> TrainReport | NodeReport:
    """Train a model on `data_dir`'s train split with torchrun and log it to MLflow.

    Node 0 (`train.node_rank`) owns the MLflow run and logs the model; with `train.nnodes` > 1
    every other node runs the same command with its own node rank. torchrun restarts failed
    workers up to `train.max_restarts` times; they resume from the newest checkpoint. With
    `train.steps` 0 no worker starts: the pretrained model is saved and logged as the run's model.

    Args:
        data_dir: an ingested data directory.
        output_dir: where the checkpoint (`checkpoint.pt`) is written.
        params: all params; `train` drives the loop, the rest is logged with the run.
        resume: `latest` (the newest checkpoint in the checkpoint folder) or a checkpoint path/URI.
            The run continues the MLflow run that wrote the checkpoint when the store has it.
        launcher: `torchrun` on this machine, or `trainjob`: a Kubeflow Trainer v2 TrainJob on `cluster.nodes`
            nodes, which reads the data from `data_uri` (the same data in S3).

    Returns:
        On node 0 the report also written to `train.json` in `output_dir`; on the other nodes
        their rank and time.

    Raises:
        ClipflowError: missing data or checkpoint, or a worker that exited with an error.
    """
    started = time.perf_counter()
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    data_version = IngestReport.read(data_dir).data_version
    # On this machine the start weights are made a local checkpoint once, before any worker starts: a missing
    # or unreadable reference fails here in one line, not in every worker and every restart. A TrainJob's
    # nodes fetch them themselves (`clipflow.train.loop`), from train.model_cache on a cluster without network.
    start = _starting_checkpoint(params, output_dir) if launcher == "torchrun" or params.train.steps == 0 else None
    if start is None:
        _check_cached(params.train)
    _check_model(params.train, start)
    if launcher == "torchrun":
        _check_decode(params.train)
    batch_group(params.train.batch_group, data_dir, params.train.batch_size)  # refused here, not in each worker
    if params.train.steps == 0:
        return _register_pretrained(params, data_dir, output_dir, start, data_version, started)
    checkpoint_dir = params.train.checkpoint_dir or str(output_dir.resolve() / "checkpoints")
    start_from, previous_run_id = _resolve_resume(resume, checkpoint_dir) if resume else (None, None)
    output_dir.mkdir(parents=True, exist_ok=True)
    leads = params.train.node_rank == 0

    job_file = output_dir / f"job-node{params.train.node_rank}.json"
    # torchrun and its workers import torch for seconds before the workers read their job: the
    # launcher opens the MLflow run meanwhile, then writes the job, whole, for the workers to find.
    # An earlier job's file in this folder must not be read as this one's.
    job_file.unlink(missing_ok=True)
    log_path = output_dir / TRAIN_LOG
    # A resumed job continues its log; a fresh one in the same folder starts a new one.
    workers = Torchrun(params.train, job_file, log_path, append=bool(resume)) if launcher == "torchrun" else None
    import mlflow

    run_id = None
    try:
        if leads:
            tracking.setup(params.tracking)
            run_id = _open_run(params, data_dir, start_from, previous_run_id, launcher)
        if workers is not None:
            job = WorkerJob(
                # The workers start from the launcher's local copy; the run records the reference as given.
                params=replace(
                    params.train,
                    checkpoint_dir=checkpoint_dir,
                    pretrained=str(start.resolve()) if start else params.train.pretrained,
                ),
                mlflow_run_id=run_id,
                checkpoint_extra=checkpoint_extra(params, data_version, run_id),
                data_dir=str(data_dir.resolve()),
                output_dir=str(output_dir.resolve()),
                resume=start_from,
                # On this node the launcher relays the leader's step metrics to MLflow; a TrainJob's leader logs them.
                metrics_file=str(output_dir.resolve() / METRICS_FILE) if leads else None,
            )
            Store(output_dir).put_bytes(json.dumps(job.to_dict(), indent=2).encode(), job_file.name)
            _wait_for_workers(workers.process, job.metrics_file, run_id)
            workers.drain()
        else:
            from clipflow.train import trainjob

            name = trainjob.job_name(run_id)
            spec = trainjob.job_spec(params, name, data_uri or "", run_id, data_version)
            trainjob.run_trainjob(params, spec, name, output_dir)
    except BaseException:
        if workers is not None:
            workers.stop()
        if run_id:
            client = mlflow.MlflowClient()
            # The log says why it failed; a tracking store that refuses it must not hide the failure.
            with contextlib.suppress(mlflow.exceptions.MlflowException, OSError):
                _log_training_log(client, run_id, log_path)
            client.set_terminated(run_id, status="FAILED")
        raise
    if not leads:
        return NodeReport(node_rank=params.train.node_rank, seconds=round(time.perf_counter() - started, 2))

    with mlflow.start_run(run_id=run_id):
        _log_training_log(mlflow.MlflowClient(), run_id, log_path)
        model_uri = log_clip_model(output_dir, params.train.model)
    final = last_logged(output_dir / METRICS_FILE) if workers is not None else {}
    report = TrainReport(
        mlflow_run_id=run_id,
        model_uri=model_uri,
        checkpoint=str(clip_model.resolve_checkpoint(output_dir).resolve()),
        data_version=data_version,
        seconds=round(time.perf_counter() - started, 2),
        final_loss=final.get("train/loss"),
        samples_per_second=final.get("train/samples_per_second"),
    )
    report.write(output_dir)
    return report


def _starting_checkpoint(params: Params, output_dir: Path) -> Path | None:
    """`train.pretrained` as a local checkpoint in `output_dir/pretrained` (loaded and saved, or downloaded, once)."""
    reference = params.train.starting_reference()
    if reference is None:
        return None
    if reference.kind == "checkpoint" and not is_s3(reference.text) and not Path(reference.text).exists():
        raise ClipflowError(f"pretrained checkpoint not found: {reference.text}")
    if reference.kind == "registry":
        tracking.setup(params.tracking)
    train = params.train
    return local_checkpoint(reference, train.model, train.model_cache, folder=output_dir / PRETRAINED_DIR)


def _check_cached(params: TrainParams) -> None:
    """A TrainJob's nodes read a tag or hf-hub model from `train.model_cache` when set: it must be there."""
    reference = params.starting_reference()
    if reference is not None and reference.kind in HUB_KINDS and params.model_cache:
        check_cached(reference, params.model_cache)


def _check_decode(params: TrainParams) -> None:
    """`train.decode: gpu` needs the GPU the workers on this machine would decode on."""
    import torch

    if params.decode == "gpu" and not torch.cuda.is_available():
        raise ClipflowError("train.decode gpu needs a GPU and this machine has none (use cpu or auto)")


def _check_model(params: TrainParams, start: Path | None) -> None:
    """The model must be one open_clip can build, and the sigmoid loss needs one built with a logit bias.

    The model is `train.model`, or the one the start checkpoint `start` records (its config with it).
    """
    name, config = params.model, clip_model.model_config(params.model)
    if start is not None:
        info = clip_model.read_checkpoint_info(start)
        name = info.get("name") or params.model
        config = (info.get(clip_model.OPEN_CLIP_CONFIG_KEY) or {}).get("model_cfg") or clip_model.model_config(name)
    if config is None:  # else each worker would fail on it, and torchrun restart them to fail again
        raise ClipflowError(f"train.model: unknown model config {name!r}")
    if params.loss == "siglip" and "init_logit_bias" not in config:
        raise ClipflowError(
            f"train.loss=siglip needs a model with a logit bias; {name!r} has none"
            " (use CLIP-Tiny-Sigmoid, or a config with init_logit_bias)"
        )


def _register_pretrained(
    params: Params, data_dir: Path, output_dir: Path, start: Path, data_version: str, started: float
) -> TrainReport | NodeReport:
    """`train.steps: 0`: the pretrained model as the run's model, saved and logged as a trained one is."""
    if params.train.node_rank != 0:
        return NodeReport(node_rank=params.train.node_rank, seconds=round(time.perf_counter() - started, 2))
    import mlflow

    tracking.setup(params.tracking)
    run_id = _open_run(params, data_dir, None, None, "torchrun")
    clip = clip_model.load(start, params.train.model)
    extra = {**checkpoint_extra(params, data_version, run_id), "step": 0}
    checkpoint = clip_model.save_checkpoint(output_dir, clip.model, clip.name, extra)
    del clip
    with mlflow.start_run(run_id=run_id):
        model_uri = log_clip_model(checkpoint)
    report = TrainReport(
        mlflow_run_id=run_id,
        model_uri=model_uri,
        checkpoint=str(checkpoint.resolve()),
        data_version=data_version,
        seconds=round(time.perf_counter() - started, 2),
    )
    report.write(output_dir)
    return report


class Torchrun:
    """This node's torchrun, whose workers wait for the job file, with its output copied to the training log.

    torchrun and the workers write to a pipe; a thread copies every line to this process's stderr,
    as before, and to the log file, which becomes an artifact of the run. torchrun stops its
    workers when this process ends, killed or not.
    """

    def __init__(self, params: TrainParams, job_file: Path, log_path: Path, append: bool):
        env = {**os.environ, "OMP_NUM_THREADS": str(params.threads_per_proc)}
        launcher = os.getpid()
        self.process = subprocess.Popen(
            torchrun_command(params, job_file),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            preexec_fn=lambda: orphans.end_with_parent(signal.SIGTERM, launcher),
        )
        log = log_path.open("a" if append else "w", encoding="utf-8")  # noqa: SIM115 - closed by the copying thread
        self._copier = threading.Thread(
            target=_copy_lines, args=(self.process.stdout, log), name="clipflow-train-log", daemon=True
        )
        self._copier.start()

    def drain(self) -> None:
        """Wait until the log holds everything torchrun printed (it has exited)."""
        self._copier.join(LOG_DRAIN_SECONDS)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # torchrun stops its workers
            self.process.wait()
        self.drain()


def _copy_lines(source: IO[str], log: IO[str]) -> None:
    """Every line of `source` to stderr and to `log`, as it comes (progress bars' updates each end a line)."""
    with source, log:
        for line in source:
            log.write(line)
            log.flush()
            # A closed terminal must not stop the copying: torchrun would block on the full pipe.
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(line)
                sys.stderr.flush()


def _log_training_log(client, run_id: str, log_path: Path) -> None:
    """The training log as an artifact of the run; a TrainJob's launcher writes none (its nodes log in the cluster)."""
    if log_path.is_file():
        client.log_artifact(run_id, str(log_path))


def _wait_for_workers(workers: subprocess.Popen, metrics_file: str | None, run_id: str | None) -> None:
    """Wait for torchrun to end; on the node that leads, relay the workers' step metrics to the run meanwhile."""
    relay = MetricsRelay(metrics_file, run_id) if metrics_file and run_id else None
    try:
        returncode = workers.wait()
    finally:
        if relay:
            relay.close()
    if returncode != 0:
        raise ClipflowError(f"training failed: torchrun exited with code {returncode} (see the log above)")


def torchrun_command(params: TrainParams, job_file: Path) -> list[str]:
    """The torchrun command line of this node: `params.nproc` processes, alone or one of `params.nnodes` nodes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(params.nproc)]
    command += ["--max-restarts", str(params.max_restarts)]
    if params.nnodes == 1:
        command += ["--standalone", "--nnodes", "1"]
    else:
        command += ["--nnodes", str(params.nnodes), "--node-rank", str(params.node_rank)]
        command += ["--rdzv-backend", "c10d", "--rdzv-endpoint", params.rdzv_endpoint, "--rdzv-id", "clipflow"]
        # Node 0 hosts the rendezvous store; on one host every node would otherwise try to.
        command += ["--rdzv-conf", f"is_host={str(params.node_rank == 0).lower()}"]
    return command + ["-m", "clipflow.train.worker", str(job_file)]


def _resolve_resume(resume: str, checkpoint_dir: str) -> tuple[str, str | None]:
    """The checkpoint location for `--resume` and the MLflow run that wrote it.

    `latest` is the newest complete checkpoint in `checkpoint_dir`; its pointer names the run,
    so the launcher need not read the whole checkpoint, which the workers load anyway.
    """
    if resume != "latest":
        return resume, load_state(resume)["clipflow"].get("mlflow_run_id")
    latest = CheckpointStore(checkpoint_dir).latest()
    if latest is None:
        raise ClipflowError(f"--resume latest: no checkpoint in {checkpoint_dir}")
    return latest.location, latest.run_id


def _open_run(
    params: Params, data_dir: Path, start_from: str | None, previous_run_id: str | None, launcher: str
) -> str:
    """The MLflow run to train in: the one that wrote `start_from` if this store has it, else a new one.

    A new run is named and described by what it trains on which data, logs the params of the
    sections that apply to it (the cluster's only for a TrainJob), the resolved params whole as
    `params.yaml`, and the train split as its training dataset.
    """
    import mlflow
    import yaml

    if previous_run_id:
        try:
            return mlflow.MlflowClient().get_run(previous_run_id).info.run_id
        except mlflow.exceptions.MlflowException:
            pass  # trained against another tracking store: start a run of its own here
    data = IngestReport.read(data_dir)
    name = f"train {params.train.model} on data {data.data_version[:8]}"
    with mlflow.start_run(run_name=name, description=run_description(params, data, launcher, start_from)) as run:
        sections = {"train", "cluster"} if launcher == "trainjob" else {"train"}
        mlflow.log_params({key: value for key, value in params.flat().items() if key.split(".")[0] in sections})
        mlflow.log_text(yaml.safe_dump(params.to_dict(), sort_keys=False), PARAMS_ARTIFACT)
        tracking.log_data(data_dir, [TRAIN_SPLIT], "training")
        tags = {**lineage(data_dir), "clipflow.step": "train", "profile": params.profile or ""}
        if start_from:
            tags["resumed_from"] = start_from
        mlflow.set_tags(tags)
        return run.info.run_id


def run_description(params: Params, data: IngestReport, launcher: str, start_from: str | None) -> str:
    """The training run's description in MLflow (Markdown): the model, how it trains, on which data."""
    train = params.train
    start = f"from `{train.pretrained}`" if train.pretrained else "from random weights"
    if launcher == "trainjob":
        processes = f"a Kubeflow TrainJob of {params.cluster.nodes} nodes x {params.procs_per_node()} processes"
    elif train.nnodes > 1:
        processes = f"{train.nnodes} nodes x {train.nproc} torchrun processes"
    else:
        processes = f"{train.nproc} torchrun processes"
    trains = (
        f"Trains `{train.model}` {start} for {train.steps} steps of {train.batch_size} image-text pairs"
        f" ({train.loss} loss, {train.precision}) on {processes}."
    )
    if train.steps == 0:
        trains = f"Registers `{train.pretrained}` as it is (`train.steps: 0`): no training."
    lines = [
        trains,
        "",
        f"Data: the `{TRAIN_SPLIT}` split ({data.counts.get(TRAIN_SPLIT, 0)} pairs) of data version"
        f" `{data.data_version}`, ingested from `{tracking.source_name(data.source)}`.",
    ]
    if start_from:
        lines += ["", f"Resumed from the checkpoint `{start_from}`."]
    lines += ["", "`clipflow evaluate` adds its metrics (`eval/...`) and report (`evaluation/`) to this run."]
    return "\n".join(lines)
