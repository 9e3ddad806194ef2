"""Fault tolerance and multi-node training with real torchrun processes and real gloo groups.

One uninterrupted `clipflow train` (1 node x 2 processes) is the reference; a run resumed
from its mid-epoch checkpoint, a run whose worker is SIGKILLed, and a 2 nodes x 1 process run
must all end with the same weights, bit for bit (CPU ops here are deterministic).
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch

from clipflow.data.ingest import ingest
from clipflow.train.checkpoint import CheckpointStore, load_state
from clipflow.train.metrics import FILE_NAME as METRICS_FILE
from tests.support import REPO
from tests.support.processes import process_group
from tests.support.servers import free_port, seaweedfs

CLIPFLOW = str(Path(sys.executable).with_name("clipflow"))
STEPS = 10
CHECKPOINT_EVERY = 3
# steps_per_epoch = 1200 // 64 = 18: every checkpoint here is mid-epoch.
SETTINGS = [f"train.steps={STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.log_every=1"]
SETTINGS += ["train.keep_checkpoints=5", "train.max_restarts=2"]
METRICS = ("train/loss", "train/lr", "train/logit_scale", "train/samples_per_second")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, small_params):
    root = tmp_path_factory.mktemp("resume")
    ingest("builtin", root / "data", small_params.data)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    return root


def _train_command(output: str, *extra: str) -> list[str]:
    command = [CLIPFLOW, "train", "--data", "data", "--output", output, "--profile", "test", "--nproc"]
    command += ["1" if "--nnodes" in extra else "2"]
    for setting in SETTINGS:
        command += ["--set", setting]
    return command + list(extra)


def _run(workdir: Path, output: str, *extra: str) -> dict:
    result = subprocess.run(_train_command(output, *extra), cwd=workdir, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((workdir / output / "train.json").read_text())


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_weights(a: Path, b: Path) -> None:
    first, second = _weights(a), _weights(b)
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _history(workdir: Path, run_id: str) -> dict[str, list[int]]:
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        return {key: [m.step for m in client.get_metric_history(run_id, key)] for key in METRICS}
    finally:
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def reference(workdir):
    """An uninterrupted run: its checkpoints, final weights and MLflow run."""
    return _run(workdir, "reference")


def test_checkpoints_are_written_every_n_steps_and_load_weights_only(workdir, reference):
    store = CheckpointStore(workdir / "reference" / "checkpoints")
    assert store.latest().step == STEPS and store.latest().run_id == reference["mlflow_run_id"]
    names = sorted(path.name for path in (workdir / "reference" / "checkpoints").glob("step-*.pt"))
    assert names == [f"step-{step:06d}.pt" for step in (3, 6, 9, 10)]
    state = torch.load(workdir / "reference/checkpoints/step-000003.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 3 and state["samples_seen"] == 3 * 64
    assert len(state["rng"]) == 2 and set(state["rng"][0]) == {"torch", "numpy", "python"}
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 3
    assert _history(workdir, reference["mlflow_run_id"]) == {key: list(range(1, STEPS + 1)) for key in METRICS}


def test_resuming_from_a_mid_epoch_checkpoint_reproduces_the_uninterrupted_run(workdir, reference):
    checkpoint = workdir / "reference" / "checkpoints" / "step-000003.pt"
    # The reference built its batches in line (auto on 2 cores, 2 processes); these come from data-loader workers.
    resumed = _run(workdir, "resumed", "--resume", str(checkpoint), "--set", "train.data_workers=2")
    _assert_same_weights(Path(resumed["checkpoint"]), Path(reference["checkpoint"]))
    # The checkpoint's MLflow run is continued; its steps were all logged already, so none twice.
    assert resumed["mlflow_run_id"] == reference["mlflow_run_id"]
    assert _history(workdir, reference["mlflow_run_id"]) == {key: list(range(1, STEPS + 1)) for key in METRICS}


def test_resume_latest_continues_from_the_newest_checkpoint_in_the_output(workdir, reference):
    """What an interrupted run left: its checkpoint folder, pointing at step 6."""
    mid_run = load_state(workdir / "reference" / "checkpoints" / "step-000006.pt")
    CheckpointStore(workdir / "latest" / "checkpoints").save(6, mid_run, reference["mlflow_run_id"])
    result = subprocess.run(
        _train_command("latest", "--resume", "latest"), cwd=workdir, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming at step 6" in result.stderr
    resumed = json.loads((workdir / "latest" / "train.json").read_text())
    _assert_same_weights(Path(resumed["checkpoint"]), Path(reference["checkpoint"]))
    assert resumed["mlflow_run_id"] == reference["mlflow_run_id"]


def test_resume_from_s3_with_checkpoints_written_to_s3(workdir, reference, tmp_path):
    with seaweedfs(tmp_path / "s3") as s3:
        client = s3.client()
        client.create_bucket(Bucket="ckpt")
        client.upload_file(str(workdir / "reference" / "checkpoints" / "step-000003.pt"), "ckpt", "old/step-3.pt")
        command = _train_command("from-s3", "--resume", "s3://ckpt/old/step-3.pt")
        command += ["--set", "train.checkpoint_dir=s3://ckpt/run"]
        result = subprocess.run(
            command, cwd=workdir, env={**os.environ, **s3.env}, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, result.stderr[-4000:]
        assert "resuming at step 3" in result.stderr
        with pytest.MonkeyPatch.context() as patch:
            for key, value in s3.env.items():
                patch.setenv(key, value)
            latest = CheckpointStore("s3://ckpt/run").latest()
        assert latest.step == STEPS and latest.location == f"s3://ckpt/run/step-{STEPS:06d}.pt"
    resumed = json.loads((workdir / "from-s3" / "train.json").read_text())
    _assert_same_weights(Path(resumed["checkpoint"]), Path(reference["checkpoint"]))


def test_a_killed_worker_is_restarted_and_resumes_without_gaps_or_duplicates(workdir, reference):
    """SIGKILL a worker after a checkpoint and after later steps were logged: torchrun restarts both."""
    output = workdir / "faulty"
    command = _train_command("faulty")
    with process_group(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as launcher:
        _kill_a_worker_after_a_checkpoint(launcher, output)
        _, stderr = launcher.communicate(timeout=900)
    assert launcher.returncode == 0, stderr[-20000:]
    assert "resuming at step" in stderr, stderr[-4000:]
    result = json.loads((output / "train.json").read_text())
    _assert_same_weights(Path(result["checkpoint"]), Path(reference["checkpoint"]))
    assert _history(workdir, result["mlflow_run_id"]) == {key: list(range(1, STEPS + 1)) for key in METRICS}


def _kill_a_worker_after_a_checkpoint(launcher: subprocess.Popen, output: Path) -> None:
    # The leader's metrics file, not MLflow: the launcher relays it to MLflow only every
    # POLL_SECONDS, longer than this whole run can take on a fast CPU.
    deadline = time.monotonic() + 600
    store = CheckpointStore(output / "checkpoints")
    while time.monotonic() < deadline and launcher.poll() is None:
        latest = store.latest()
        if latest is not None and latest.step < STEPS and _last_logged_step(output / METRICS_FILE) > latest.step:
            workers = [
                child
                for child in psutil.Process(launcher.pid).children(recursive=True)
                if "clipflow.train.worker" in child.cmdline() and "torch.distributed.run" not in child.cmdline()
            ]
            assert workers, "no worker process found"
            os.kill(workers[-1].pid, signal.SIGKILL)
            return
        time.sleep(0.005)
    pytest.fail(f"no checkpoint before the end (launcher exit {launcher.poll()})")


def _last_logged_step(metrics_file: Path) -> int:
    text = metrics_file.read_text(encoding="utf-8") if metrics_file.is_file() else ""
    # Only lines with their newline: the last one may be half-written while the leader appends it.
    complete = text.splitlines()[: text.count("\n")]
    return json.loads(complete[-1])["step"] if complete else 0


def test_two_nodes_rendezvous_and_match_one_node_with_as_many_processes(workdir, reference):
    endpoint = f"127.0.0.1:{free_port()}"
    with contextlib.ExitStack() as running:
        nodes = [
            running.enter_context(
                process_group(
                    _train_command("two-nodes", "--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", endpoint),
                    cwd=workdir,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            for rank in (0, 1)
        ]
        outputs = [node.communicate(timeout=900) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr[-4000:]
    leader = json.loads((workdir / "two-nodes" / "train.json").read_text())
    _assert_same_weights(Path(leader["checkpoint"]), Path(reference["checkpoint"]))
    assert _history(workdir, leader["mlflow_run_id"]) == {key: list(range(1, STEPS + 1)) for key in METRICS}


def test_a_trainjob_node_trains_from_s3_and_uploads_the_same_model(workdir, reference, tmp_path):
    """The TrainJob's own command on one node of 2 processes: the node copies the data from S3, trains
    with its checkpoints in S3, and uploads the model, which is the uninterrupted local run's, bit for bit."""
    from clipflow.params import load_params
    from clipflow.storage import download_tree, upload_tree
    from clipflow.train import trainjob

    overrides = [*SETTINGS, "train.nproc=2", "cluster.launcher=trainjob", "cluster.scratch_uri=s3://scratch/runs"]
    params = load_params(workdir / "params.yaml", overrides, profile="test")
    with seaweedfs(tmp_path / "s3") as s3, pytest.MonkeyPatch.context() as patch:
        for key, value in s3.env.items():
            patch.setenv(key, value)
        for bucket in ("data", "scratch"):
            s3.client().create_bucket(Bucket=bucket)
        upload_tree(workdir / "data", "s3://data/v1")
        job = trainjob.job_spec(params, "clipflow-train-test", "s3://data/v1", None, "v1")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1"]
        command += ["--nproc-per-node", "2", "-m", "clipflow.train.node"]
        node_env = {trainjob.JOB_ENV: json.dumps(job.to_dict()), "CLIPFLOW_WORKDIR": str(tmp_path / "node")}
        with process_group(
            command, env={**os.environ, **node_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as node:
            _, stderr = node.communicate(timeout=900)
        assert node.returncode == 0, stderr[-4000:]
        assert CheckpointStore(job.params.checkpoint_dir).latest().step == STEPS
        download_tree(job.output_uri, tmp_path / "uploaded")
    _assert_same_weights(tmp_path / "uploaded" / "checkpoint.pt", Path(reference["checkpoint"]))
