"""One training process. torchrun starts N of these; `clipflow train` is the launcher.

Single node, 2 CPU processes (what `clipflow train` runs; failed workers are restarted and
resume from the newest checkpoint):

    torchrun --standalone --nnodes 1 --nproc-per-node 2 --max-restarts 3 -m clipflow.train.worker JOB.json

Two nodes (c10d rendezvous at node 0), one command per node, as `clipflow train --nnodes 2
--node-rank R --rdzv-endpoint HOST:PORT` runs them:

    torchrun --nnodes 2 --node-rank R --nproc-per-node 2 --max-restarts 3 --rdzv-backend c10d \
        --rdzv-endpoint HOST:29400 --rdzv-id clipflow --rdzv-conf is_host=(R == 0) \
        -m clipflow.train.worker JOB.json

JOB.json is a `WorkerJob` written by `clipflow.train.launch`: the resolved params, the data and
output directories, the checkpoint to resume from, and (on node 0) the MLflow run the leader logs to.
With several nodes, `train.checkpoint_dir` must be storage every node reads (S3 or a shared volume).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

from clipflow.train import orphans

if __name__ == "__main__":
    # First, before torch's import takes seconds: a torchrun killed meanwhile would leave this
    # process behind. Only the interpreter's own start goes unwatched.
    orphans.end_with_parent(signal.SIGKILL, os.getppid())

import torch  # noqa: E402

from clipflow.train import group, loop  # noqa: E402
from clipflow.train.job import WorkerJob  # noqa: E402

# The launcher writes the job once the MLflow run is open: seconds, or minutes while a remote
# tracking server retries. A launcher that died without writing it must not leave workers waiting.
JOB_WAIT_SECONDS = 600


def main(argv: list[str] | None = None) -> None:
    """Read the job file named by `argv[0]` and train."""
    argv = sys.argv[1:] if argv is None else argv
    job = read_job(Path(argv[0]))
    train(job, Path(job.data_dir), Path(job.output_dir))


def read_job(path: Path) -> WorkerJob:
    """The job file, once the launcher has written it: it opens the MLflow run while torch imports here."""
    deadline = time.monotonic() + JOB_WAIT_SECONDS
    while not path.is_file():
        if time.monotonic() > deadline:
            raise SystemExit(f"clipflow worker: no job file {path} after {JOB_WAIT_SECONDS} s; is the launcher alive?")
        time.sleep(0.05)
    return WorkerJob.from_dict(json.loads(path.read_text()))


def train(job: WorkerJob, data_dir: Path, output_dir: Path) -> None:
    """Train `job` in this process, under the process group torchrun set up (or alone without torchrun).

    The leader (local rank 0 of node 0: the node whose launcher owns the MLflow run) writes the
    checkpoints and logs; see `clipflow.train.loop.run`.

    Args:
        job: what to train and where the leader logs.
        data_dir: the ingested data directory on this machine.
        output_dir: where the checkpoint is written on this machine.
    """
    # open_clip's gather calls an API torch has deprecated; one warning per step buries the log.
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather", category=FutureWarning)
    torch.set_num_threads(job.params.threads_per_proc)
    processes = group.join(job.params.node_rank)
    loop.run(job, data_dir, output_dir, processes)
    group.leave(processes)


if __name__ == "__main__":
    main()
    # Nothing is left to free: the interpreter's teardown would still walk every object that
    # torch and open_clip created, which takes seconds; frozen objects are skipped.
    gc.freeze()
