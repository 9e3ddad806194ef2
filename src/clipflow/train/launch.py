"""The train step: open an MLflow run, launch the workers under torchrun, log the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from clipflow import model as clip_model
from clipflow import tracking
from clipflow.data.ingest import lineage, read_summary
from clipflow.errors import ClipflowError
from clipflow.params import Params
from clipflow.registry.models import log_clip_model

JOB_FILE = "job.json"
RESULT_FILE = "train.json"


def train(
    data_dir: str | Path,
    output_dir: str | Path,
    params: Params,
    nproc: int | None = None,
    launcher: str = "torchrun",
    data_uri: str | None = None,
) -> dict[str, Any]:
    """Train a model on `data_dir`'s train split with torchrun and log it to MLflow.

    Args:
        data_dir: an ingested data directory.
        output_dir: where the checkpoint (`checkpoint.pt`) is written.
        params: all params; `train` drives the loop, the rest is logged with the run.
        nproc: processes to launch; defaults to `train.nproc`.
        launcher: `torchrun` on this machine, or `trainjob`: a Kubeflow Trainer v2 TrainJob on `cluster.nodes`
            nodes, which reads the data from `data_uri` (the same data in S3).

    Returns:
        `mlflow_run_id`, `model_uri` (the logged MLflow model), `checkpoint`, `data_version`, `seconds`;
        the same is written to `train.json` in `output_dir`.

    Raises:
        ClipflowError: missing data, or a worker that exited with an error.
    """
    import mlflow

    started = time.perf_counter()
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    data_version = read_summary(data_dir)["data_version"]
    nproc = nproc or params.train.nproc
    if params.train.batch_size % nproc:
        raise ClipflowError(f"train.batch_size ({params.train.batch_size}) must be a multiple of --nproc ({nproc})")
    output_dir.mkdir(parents=True, exist_ok=True)

    tracking.setup(params.tracking)
    with mlflow.start_run() as run:
        mlflow.log_params({**params.flat(), "train.nproc": nproc})
        tags = {**lineage(data_dir), "clipflow.step": "train", "profile": params.profile or ""}
        mlflow.set_tags(tags)
        run_id = run.info.run_id

    job = {
        "params": {**asdict(params.train), "nproc": nproc},
        "data_dir": str(data_dir.resolve()),
        "output_dir": str(output_dir.resolve()),
        "mlflow_run_id": run_id,
        "checkpoint_extra": {"params": params.to_dict(), "data_version": data_version, "mlflow_run_id": run_id},
    }
    job_file = output_dir / JOB_FILE
    job_file.write_text(json.dumps(job, indent=2))
    try:
        if launcher == "trainjob":
            from clipflow.deploy import trainjob

            name = trainjob.job_name(run_id)
            spec = trainjob.job_spec(params, name, data_uri or "", run_id, data_version)
            trainjob.run_trainjob(params, spec, name, output_dir)
        else:
            _torchrun(job_file, nproc, params)
    except BaseException:
        mlflow.MlflowClient().set_terminated(run_id, status="FAILED")
        raise

    with mlflow.start_run(run_id=run_id):
        model_uri = log_clip_model(output_dir)
    result = {
        "mlflow_run_id": run_id,
        "model_uri": model_uri,
        "checkpoint": str(clip_model.resolve_checkpoint(output_dir).resolve()),
        "data_version": data_version,
        "seconds": round(time.perf_counter() - started, 2),
    }
    (output_dir / RESULT_FILE).write_text(json.dumps(result, indent=2))
    return result


def _torchrun(job_file: Path, nproc: int, params: Params) -> None:
    """Run the workers on this machine: `nproc` CPU processes under torchrun."""
    import mlflow

    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc),
        "-m", "clipflow.train.worker", str(job_file),
    ]  # fmt: skip
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
        "OMP_NUM_THREADS": str(params.train.threads_per_proc),
    }
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise ClipflowError(f"training failed: torchrun exited with code {result.returncode} (see the log above)")


def read_result(output_dir: str | Path) -> dict[str, Any]:
    """The result a finished `train` wrote beside its checkpoint."""
    path = Path(output_dir) / RESULT_FILE
    if not path.is_file():
        raise ClipflowError(f"not a training output folder (no {RESULT_FILE}): {output_dir}")
    return json.loads(path.read_text())
