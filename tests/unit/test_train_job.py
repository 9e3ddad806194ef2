"""The worker job both launchers build, and the process count that reaches it only through the params."""

import json
from dataclasses import replace
from pathlib import Path

from clipflow.cli import main
from clipflow.params import load_params
from clipflow.train.job import WorkerJob, checkpoint_extra
from clipflow.train.launch import torchrun_command
from tests.support import REPO


def test_a_worker_job_reads_back_what_it_wrote_through_json(small_params):
    extra = checkpoint_extra(small_params, "v1", "run-1")
    torchrun = WorkerJob(
        replace(small_params.train, checkpoint_dir="/out/checkpoints"),
        mlflow_run_id="run-1",
        checkpoint_extra=extra,
        data_dir="/data",
        output_dir="/out",
        resume="/out/checkpoints/step-000003.pt",
        metrics_file="/out/metrics.jsonl",
    )
    trainjob = WorkerJob(small_params.train, None, extra, data_uri="s3://b/data", output_uri="s3://b/model")
    for job in (torchrun, trainjob):
        again = WorkerJob.from_dict(json.loads(json.dumps(job.to_dict())))
        assert again == job and again.params == job.params
    assert extra == {"params": small_params.to_dict(), "data_version": "v1", "mlflow_run_id": "run-1"}


def test_nproc_is_a_param_checked_at_load(capsys):
    params = str(REPO / "params.yaml")
    assert main(["train", "--params", params, "--profile", "test", "--nproc", "3", "--data", "/no/such/dir"]) == 1
    assert "must be a multiple of train.nproc x train.nnodes (3)" in capsys.readouterr().err
    # The TrainJob's processes too, whatever cluster.launcher the params name.
    args = ["train", "--params", params, "--profile", "test", "--launcher", "trainjob", "--dry-run"]
    assert main([*args, "--set", "cluster.launcher=torchrun", "--set", "cluster.nodes=3"]) == 1
    assert "must be a multiple of the 24 training processes" in capsys.readouterr().err
    one = load_params(REPO / "params.yaml", ["train.nproc=1"], profile="test")
    command = torchrun_command(one.train, Path("job.json"))
    assert command[command.index("--nproc-per-node") + 1] == "1"
