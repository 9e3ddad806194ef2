"""One training process on a TrainJob node, started by the job's `torchrun -m clipflow.train.node`.

The launcher passes the job (a `WorkerJob`) in $CLIPFLOW_JOB. Local rank 0 of each node copies
the data from S3 to the node's disk while the node's other processes wait; every process trains;
global rank 0 uploads the checkpoint folder to S3, where the launcher picks it up.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

from clipflow import storage
from clipflow.train import worker
from clipflow.train.group import local_rank
from clipflow.train.job import WorkerJob
from clipflow.train.trainjob import JOB_ENV

WORKDIR = Path(os.environ.get("CLIPFLOW_WORKDIR", "/tmp/clipflow"))


def main() -> None:
    job = WorkerJob.from_dict(json.loads(os.environ[JOB_ENV]))
    data_dir, output_dir, ready = WORKDIR / "data", WORKDIR / "model", WORKDIR / "data.ready"
    if local_rank() == 0:
        storage.download_tree(job.data_uri, data_dir)
        ready.touch()
    while not ready.exists():
        time.sleep(1)
    # The torch runtime numbers the nodes (PET_NODE_RANK); node 0's first process leads.
    job = replace(job, params=replace(job.params, node_rank=int(os.environ.get("PET_NODE_RANK", "0"))))
    worker.train(job, data_dir, output_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        storage.upload_tree(output_dir, job.output_uri)


if __name__ == "__main__":
    main()
