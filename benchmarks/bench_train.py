"""clipflow's training loop against open_clip's trainer, side by side in one run.

Both train CLIP-Tiny from scratch on the same WebDataset shards (written by clipflow's ingest),
with the same global batch, steps, learning rate, warmup and cosine schedule, AdamW betas, eps
and weight decay, on the CPUs of this machine. Measured for each:

- samples_per_s: samples trained / wall time of the whole training command (start-up, data
  loading and decoding, checkpoint writing included; clipflow's also logs to MLflow);
- zeroshot_top1: held-out zero-shot top-1 of the resulting checkpoint, by `clipflow evaluate`'s code.

Each side runs at its best precision: clipflow bf16 autocast (2 gloo processes x 1 thread, its
default), open_clip_train once per `--peer-precisions` (one process, 2 threads, 1 data-loader
worker: its standard single-device setup) and the faster one is reported.

    python benchmarks/bench_train.py [--steps 100] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "bench_train.json"
MODEL = "CLIP-Tiny"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--peer-precisions", default="amp_bf16,fp32")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    args = parser.parse_args(argv)

    from clipflow.data.ingest import ingest
    from clipflow.params import load_params

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_train-"))
    work.mkdir(parents=True, exist_ok=True)
    samples = args.steps * args.batch_size
    overrides = [
        f"data.num_train={samples}",  # exactly one epoch: both trainers see every sample once
        f"train.batch_size={args.batch_size}",
        f"train.steps={args.steps}",
        "train.checkpoint_every=0",
        "train.log_every=10",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
    ]
    params = load_params(REPO / "params.yaml", overrides)
    data = work / "data"
    if not (data / "ingest.json").is_file():
        ingest("builtin", data, params.data)

    runs = [_clipflow(work, data, overrides)]
    runs += [_open_clip(work, data, params.train, precision) for precision in args.peer_precisions.split(",")]
    for run in runs:
        run["zeroshot_top1"] = _zeroshot(run["checkpoint"], data, work / f"eval-{run['name']}", params)
        print(json.dumps(run), file=sys.stderr)

    ours = runs[0]
    peer = max(runs[1:], key=lambda run: run["samples_per_s"])
    cases = [
        _case("samples_per_s", "samples/s", ours, peer),
        _case("zeroshot_top1", "fraction", ours, peer),
    ]
    result = {
        "benchmark": "bench_train",
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, no GPU",
        "command": "python benchmarks/bench_train.py" + (" " + " ".join(argv) if argv else ""),
        "setup": {
            "model": MODEL,
            "steps": args.steps,
            "global_batch": args.batch_size,
            "samples": samples,
            "schedule": f"lr {params.train.lr}, warmup {params.train.warmup_steps}, cosine, AdamW wd "
            f"{params.train.weight_decay}, betas (0.9, 0.98), eps 1e-6",
        },
        "runs": [{key: value for key, value in run.items() if key != "checkpoint"} for run in runs],
        "cases": cases,
        "note": "Wall-clock numbers on a 2-core machine shared with other jobs: compare the ratio within one run.",
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def _case(metric: str, unit: str, ours: dict, peer: dict) -> dict:
    return {
        "case": MODEL,
        "metric": metric,
        "unit": unit,
        "clipflow": round(ours[metric], 4),
        "peer": f"open_clip_train --precision {peer['precision']}",
        "peer_value": round(peer[metric], 4),
        "ratio": round(ours[metric] / peer[metric], 4) if peer[metric] else None,
    }


def _clipflow(work: Path, data: Path, overrides: list[str]) -> dict:
    output = work / "clipflow"
    command = [str(Path(sys.executable).with_name("clipflow")), "train", "--data", str(data), "--output", str(output)]
    command += ["--params", str(REPO / "params.yaml")]
    for item in overrides:
        command += ["--set", item]
    seconds = _timed(command, work / "clipflow.log")
    steps, batch = _setting(overrides, "train.steps"), _setting(overrides, "train.batch_size")
    return {
        "name": "clipflow",
        "precision": "bf16",
        "seconds": round(seconds, 1),
        "samples_per_s": steps * batch / seconds,
        "checkpoint": output / "checkpoint.pt",
    }


def _open_clip(work: Path, data: Path, train, precision: str) -> dict:
    shards = sorted(json.loads((data / "train" / "sizes.json").read_text()))
    pattern = str(data / "train" / f"train-{{{shards[0][6:12]}..{shards[-1][6:12]}}}.tar")
    samples = train.steps * train.batch_size
    name = f"open_clip-{precision}"
    command = [sys.executable, str(REPO / "benchmarks" / "open_clip_train_clipflow.py")]
    command += ["--model", MODEL, "--train-data", pattern, "--dataset-type", "webdataset"]
    command += ["--train-num-samples", str(samples), "--batch-size", str(train.batch_size), "--epochs", "1"]
    command += ["--lr", str(train.lr), "--warmup", str(train.warmup_steps), "--wd", str(train.weight_decay)]
    command += ["--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--precision", precision, "--seed", "0"]
    command += ["--workers", "1", "--device", "cpu", "--logs", str(work / "open_clip"), "--name", name]
    command += ["--save-frequency", "1", "--log-every-n-steps", "10", "--report-to", ""]
    seconds = _timed(command, work / f"{name}.log")
    return {
        "name": name,
        "precision": precision,
        "seconds": round(seconds, 1),
        "samples_per_s": samples / seconds,
        "checkpoint": work / "open_clip" / name / "checkpoints" / "epoch_1.pt",
    }


def _timed(command: list[str], log: Path) -> float:
    path = os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    started = time.perf_counter()
    with log.open("w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{command[1]} failed ({result.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return seconds


def _zeroshot(checkpoint: Path, data: Path, output: Path, params) -> float:
    from clipflow.evaluate.step import evaluate

    return evaluate(checkpoint, data, output, params, model_config=MODEL)["metrics"]["zeroshot_top1_heldout"]


def _setting(overrides: list[str], key: str) -> int:
    return int(next(item.partition("=")[2] for item in overrides if item.startswith(key + "=")))


if __name__ == "__main__":
    main(sys.argv[1:])
