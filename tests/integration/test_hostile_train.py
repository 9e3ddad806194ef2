"""Hostile and careless input to training, checkpoints and evaluation, met as a user meets it: the CLI.

One `clipflow train` on the test profile writes the checkpoint that every broken one here is
derived from. Each bad input must end in one line (`clipflow: error: ...`) naming what is wrong,
with a non-zero exit that is not 130 (interrupted), and no traceback. A `clipflow train` killed
outright must take its torchrun and every worker along.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from clipflow.data.ingest import ingest
from clipflow.train.metrics import FILE_NAME as METRICS_FILE
from tests.support import REPO
from tests.support.processes import process_group

CLIPFLOW = str(Path(sys.executable).with_name("clipflow"))
PROJECTIONS = ("visual.proj", "text_projection")


def _command(verb: str, *args: str) -> list[str]:
    return [CLIPFLOW, verb, "--profile", "test", *args]


def _clipflow(folder: Path, verb: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(verb, *args), cwd=folder, capture_output=True, text=True, timeout=600)


def _evaluate(folder: Path, checkpoint: Path | str, output: str) -> subprocess.CompletedProcess:
    return _clipflow(folder, "evaluate", "--model", str(checkpoint), "--data", "data", "--output", output)


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a bad input ends in; fails on success, on 'interrupted' and on a traceback."""
    assert result.returncode not in (0, 130), (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("clipflow: error: "), result.stderr[-3000:]
    return last


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, small_params):
    """Ingested test-profile data and one checkpoint trained on it, `model/checkpoint.pt`."""
    root = tmp_path_factory.mktemp("hostile_train")
    ingest("builtin", root / "data", small_params.data)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    result = _clipflow(root, "train", "--data", "data", "--output", "model")
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def trained(workdir) -> dict:
    return torch.load(workdir / "model" / "checkpoint.pt", map_location="cpu", weights_only=True)


def _with_weights(trained: dict, path: Path, change) -> Path:
    """The trained checkpoint with `change(name, tensor)` applied to each projection."""
    weights = dict(trained["state_dict"])
    for name in PROJECTIONS:
        weights[name] = change(name, weights[name])
    torch.save({**trained, "state_dict": weights}, path)
    return path


@pytest.mark.parametrize(
    ("kind", "change", "message"),
    [
        ("zero projections", lambda name, w: torch.zeros_like(w), "the model has collapsed"),
        ("NaN projections", lambda name, w: torch.full_like(w, float("nan")), "not finite"),
        # The image tower is sound: the zero-shot class embeddings are what ties.
        ("zero text projection", lambda name, w: w if name == "visual.proj" else torch.zeros_like(w), "class embed"),
    ],
    ids=["zero", "nan", "zero-text"],
)
def test_a_collapsed_model_fails_evaluation_instead_of_scoring_perfect_recall(workdir, trained, kind, change, message):
    checkpoint = _with_weights(trained, workdir / f"{kind.replace(' ', '-')}.pt", change)
    output = f"evaluation-{kind.replace(' ', '-')}"
    line = _error_line(_evaluate(workdir, checkpoint, output))
    assert message in line, line
    assert not (workdir / output / "metrics.json").exists()


class Payload:
    """Unpickled, it would run a shell command: a checkpoint must never be read that way."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _truncated(trained: dict, path: Path) -> None:
    torch.save(trained, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _without_projections(trained: dict, path: Path) -> None:
    torch.save(
        {**trained, "state_dict": {k: v for k, v in trained["state_dict"].items() if k not in PROJECTIONS}}, path
    )


BAD_CHECKPOINTS = {
    # kind: (how to write it from the trained checkpoint, what the line must say)
    "truncated": (_truncated, "truncated or corrupt"),
    "text": (lambda trained, path: path.write_text("step,loss\n1,0.5\n"), "not a PyTorch checkpoint"),
    "empty": (lambda trained, path: path.write_bytes(b""), "empty"),
    "not a mapping": (lambda trained, path: torch.save(torch.zeros(3), path), "holds a Tensor"),
    "wrong architecture": (lambda trained, path: torch.save({**trained, "name": "ViT-S-32"}, path), "does not fit"),
    "incomplete": (_without_projections, "Missing key(s) in state_dict"),
}


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_a_broken_checkpoint_is_one_line_naming_the_file(workdir, trained, kind):
    write, message = BAD_CHECKPOINTS[kind]
    checkpoint = workdir / f"{kind.replace(' ', '-')}.pt"
    write(trained, checkpoint)
    line = _error_line(_evaluate(workdir, checkpoint.name, f"evaluation-{checkpoint.stem}"))
    assert checkpoint.name in line and message in line, line


def test_a_malicious_checkpoint_is_refused_and_its_payload_never_runs(workdir, trained):
    marker = workdir / "payload-ran"
    checkpoint = workdir / "malicious.pt"
    torch.save({**trained, "extra": Payload(marker)}, checkpoint)
    line = _error_line(_evaluate(workdir, checkpoint.name, "evaluation-malicious"))
    assert checkpoint.name in line and "refused" in line, line
    assert not marker.exists()
    # The file is as hostile as it claims: a plain unpickling runs the command.
    torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_resuming_from_a_checkpoint_without_optimizer_state_is_one_line(workdir):
    """The final `checkpoint.pt` holds weights only; the workers used to fail on it, restarted three times."""
    result = _clipflow(workdir, "train", "--data", "data", "--output", "resumed", "--resume", "model/checkpoint.pt")
    line = _error_line(result)
    assert "model/checkpoint.pt cannot be resumed from" in line and "optimizer" in line, line
    assert not (workdir / "resumed").exists()


@pytest.mark.parametrize(
    ("verb", "setting", "message"),
    [
        ("train", "train.nproc=0", "train.nproc must be positive"),
        ("train", "train.lr=-1", "train.lr must be positive"),
        ("train", "train.lr=.nan", "train.lr must be a finite number"),
        ("train", "train.log_every=0", "train.log_every must be positive"),
        ("train", "train.warmup_steps=-5", "train.warmup_steps must not be negative"),
        ("train", "train.weight_decay=-0.1", "train.weight_decay must not be negative"),
        ("train", "train.model=CLIP-Huge", "unknown model config 'CLIP-Huge'"),
        ("train", "train.pretrained=missing.pt", "pretrained checkpoint not found: missing.pt"),
        ("evaluate", "evaluate.batch_size=0", "evaluate.batch_size must be positive"),
    ],
)
def test_a_bad_param_fails_before_the_step_starts(workdir, verb, setting, message):
    output = f"{verb}-{setting.partition('=')[0]}"
    if verb == "train":
        result = _clipflow(workdir, "train", "--data", "data", "--output", output, "--set", setting)
    else:
        result = _clipflow(
            workdir, "evaluate", "--model", "model", "--data", "data", "--output", output, "--set", setting
        )
    assert message in _error_line(result)
    assert not (workdir / output).exists()  # nothing started: the step creates its output first


def _alive(process: psutil.Process) -> bool:
    """Running and not a zombie: a killed process whose parent died waits for init to reap it."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _training_processes(launcher: subprocess.Popen, metrics: Path, nproc: int) -> list[psutil.Process]:
    """torchrun and its workers, once the leader has logged a step."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert launcher.poll() is None, f"clipflow train exited with {launcher.returncode} before training"
        processes = psutil.Process(launcher.pid).children(recursive=True)
        if len(processes) == 1 + nproc and metrics.is_file() and metrics.stat().st_size:
            return processes
        time.sleep(0.2)
    raise AssertionError("the workers never logged a step")


@pytest.mark.parametrize("victim", ["launcher", "torchrun"])
def test_a_killed_launcher_or_torchrun_takes_every_worker_along(workdir, small_params, victim):
    output = workdir / f"killed-{victim}"
    output.mkdir()
    command = _command("train", "--data", "data", "--output", output.name, "--set", "train.log_every=1")
    command += ["--set", "train.steps=100000", "--set", "train.checkpoint_every=0"]  # never done before the kill
    processes: list[psutil.Process] = []
    with (output / "stderr.log").open("w") as log, process_group(command, cwd=workdir, stderr=log) as launcher:
        try:
            processes = _training_processes(launcher, output / METRICS_FILE, small_params.train.nproc)
            torchrun = next(p for p in processes if p.ppid() == launcher.pid)
            os.kill(launcher.pid if victim == "launcher" else torchrun.pid, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while any(_alive(p) for p in processes) and time.monotonic() < deadline:
                time.sleep(0.2)
            left = [p.pid for p in processes if _alive(p)]
            assert not left, f"{left} still run after the {victim} was killed: {(output / 'stderr.log').read_text()}"
        finally:  # the workers are in sessions of their own, out of the launcher's group
            for process in processes:
                if _alive(process):
                    process.kill()
