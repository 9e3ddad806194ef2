"""The worker job: what every training process is told, by either launcher.

`clipflow.train.launch` writes one to a file for the torchrun workers on its machine
(`clipflow.train.worker`); `clipflow.train.trainjob` ships one as JSON in a TrainJob's
environment for the processes on its nodes (`clipflow.train.node`). Both read it back here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from clipflow.params import Params, TrainParams


@dataclass(frozen=True)
class WorkerJob:
    """One training job, as every process of it reads it.

    Attributes:
        params: the train params every process runs with; `checkpoint_dir` is resolved.
        mlflow_run_id: the run the leader logs to; None when no run is open (a dry run, a test).
        checkpoint_extra: written into every checkpoint's `clipflow` entry (see `checkpoint_extra`).
        data_dir: torchrun: the ingested data directory on this machine.
        output_dir: torchrun: where the checkpoint is written on this machine.
        resume: torchrun: the checkpoint a first start resumes from, resolved by the launcher.
        metrics_file: torchrun: where the leader writes its step metrics for the launcher to relay
            to MLflow; None to log them to the run directly.
        data_uri: TrainJob: the ingested data in S3, which each node copies to its disk.
        output_uri: TrainJob: where node 0 uploads the checkpoint folder for the launcher.
    """

    params: TrainParams
    mlflow_run_id: str | None
    checkpoint_extra: dict[str, Any]
    data_dir: str | None = None
    output_dir: str | None = None
    resume: str | None = None
    metrics_file: str | None = None
    data_uri: str | None = None
    output_uri: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The job as a JSON-ready mapping; `from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> WorkerJob:
        """The job that `to_dict` wrote."""
        return cls(**{**values, "params": TrainParams(**values["params"])})


def checkpoint_extra(params: Params, data_version: str, mlflow_run_id: str | None) -> dict[str, Any]:
    """What every checkpoint of the job records: all params, the data version and the MLflow run."""
    return {"params": params.to_dict(), "data_version": data_version, "mlflow_run_id": mlflow_run_id}
