"""clipflow's training loop against open_clip's trainer, side by side in one run.

Both train CLIP-Tiny from scratch on the same WebDataset shards (written by clipflow's ingest),
with the same global batch, steps, learning rate, warmup and cosine schedule, AdamW betas, eps
and weight decay, on the CPUs of this machine. Measured for each:

- samples_per_s: samples trained / wall time of the whole training command (start-up, data
  loading and decoding, checkpoint writing included; clipflow's also logs to MLflow);
- samples_per_cpu_s: samples trained / CPU seconds of the command's whole process tree, a figure
  that other jobs on a shared machine disturb far less than wall time;
- zeroshot_top1: held-out zero-shot top-1 of the resulting checkpoint, by `clipflow evaluate`'s
  code (colour-shape compositions never trained on), and zeroshot_top1_seen on seen ones.

After 100 steps the held-out figure swings by 0.1 between seeds or precisions of one trainer,
so every figure is the mean over `--seeds` training seeds (per-seed values are in `runs`).
Each side is reported at its best precision: on the first seed every candidate precision trains
in full and the faster one per trainer is kept for the other seeds. clipflow runs bf16 autocast
(2 gloo processes x 1 thread, its default layout; `--precisions bf16,fp32` adds fp32),
open_clip_train `--precision amp_bf16` and `fp32` (one process, 2 threads, 1 data-loader
worker: its standard single-device setup). Short probes cannot rank them here: start-up takes
longer than 10 steps.

    python benchmarks/bench_train.py [--steps 100] [--batch-size 256] [--seeds 3] [--precisions bf16,fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import case, write_results

REPO = Path(__file__).resolve().parents[1]
MODEL = "CLIP-Tiny"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per trainer; figures are means")
    parser.add_argument("--precisions", default="bf16", help="clipflow's candidate precisions")
    parser.add_argument("--peer-precisions", default="amp_bf16,fp32", help="open_clip_train's candidates")
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
        "train.checkpoint_every=0",
        "train.log_every=10",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
    ]
    params = load_params(REPO / "params.yaml", overrides)
    data = work / "data"
    if not (data / "ingest.json").is_file():
        ingest("builtin", data, params.data)

    candidates = [
        _clipflow(work, data, overrides, p, args.steps, args.batch_size, 0) for p in args.precisions.split(",")
    ]
    candidates += [
        _open_clip(work, data, params.train, p, args.steps, args.batch_size, 0) for p in args.peer_precisions.split(",")
    ]
    best = {
        trainer: max((run for run in candidates if run["trainer"] == trainer), key=lambda run: run["samples_per_s"])
        for trainer in ("clipflow", "open_clip")
    }
    seeded = {trainer: [run] for trainer, run in best.items()}
    for seed in range(1, args.seeds):
        seeded["clipflow"].append(
            _clipflow(work, data, overrides, best["clipflow"]["precision"], args.steps, args.batch_size, seed)
        )
        seeded["open_clip"].append(
            _open_clip(work, data, params.train, best["open_clip"]["precision"], args.steps, args.batch_size, seed)
        )
    for run in seeded["clipflow"] + seeded["open_clip"]:
        zeroshot = _zeroshot(run["checkpoint"], data, work / f"eval-{run['name']}", params)
        run["zeroshot_top1"], run["zeroshot_top1_seen"] = zeroshot
        print(json.dumps(run, default=str), file=sys.stderr)

    peer = f"open_clip_train --precision {best['open_clip']['precision']} (clipflow: {best['clipflow']['precision']})"
    peer += f", mean of {args.seeds} seeds"
    cases = [
        case(MODEL, metric, unit, _mean(seeded["clipflow"], metric), peer, _mean(seeded["open_clip"], metric))
        for metric, unit in (
            ("samples_per_s", "samples/s"),
            ("samples_per_cpu_s", "samples/CPU-s"),
            ("zeroshot_top1", "fraction"),
            ("zeroshot_top1_seen", "fraction"),
        )
    ]
    result = {
        "setup": {
            "model": MODEL,
            "steps": args.steps,
            "global_batch": args.batch_size,
            "samples": samples,
            "seeds": args.seeds,
            "schedule": f"lr {params.train.lr}, warmup {params.train.warmup_steps}, cosine, AdamW wd "
            f"{params.train.weight_decay}, betas (0.9, 0.98), eps 1e-6",
        },
        "runs": [
            {key: value for key, value in run.items() if key != "checkpoint"}
            for run in candidates + seeded["clipflow"][1:] + seeded["open_clip"][1:]
        ],
        "note": f"1-minute load average {os.getloadavg()[0]:.1f} at the end (2 cores: above 2 means other work"
        " shared the machine); compare the ratios within one run.",
    }
    command = "python benchmarks/bench_train.py" + (" " + " ".join(argv) if argv else "")
    print(write_results("bench_train", command, cases, **result).read_text())


def _mean(runs: list[dict], metric: str) -> float:
    return round(sum(run[metric] for run in runs) / len(runs), 4)


def _clipflow(work: Path, data: Path, overrides: list[str], precision: str, steps: int, batch: int, seed: int) -> dict:
    name = f"clipflow-{precision}-{steps}-seed{seed}"
    output = work / name
    command = [str(Path(sys.executable).with_name("clipflow")), "train", "--data", str(data), "--output", str(output)]
    command += ["--params", str(REPO / "params.yaml")]
    for item in [*overrides, f"train.precision={precision}", f"train.steps={steps}", f"train.seed={seed}"]:
        command += ["--set", item]
    return _timed("clipflow", name, precision, steps * batch, command, work, output / "checkpoint.pt")


def _open_clip(work: Path, data: Path, train, precision: str, steps: int, batch: int, seed: int) -> dict:
    shards = sorted(json.loads((data / "train" / "sizes.json").read_text()))
    pattern = str(data / "train" / f"train-{{{shards[0][6:12]}..{shards[-1][6:12]}}}.tar")
    name = f"open_clip-{precision}-{steps}-seed{seed}"
    command = [sys.executable, str(REPO / "benchmarks" / "open_clip_train_clipflow.py")]
    command += ["--model", MODEL, "--train-data", pattern, "--dataset-type", "webdataset"]
    command += ["--train-num-samples", str(steps * batch), "--batch-size", str(batch), "--epochs", "1"]
    command += ["--lr", str(train.lr), "--warmup", str(train.warmup_steps), "--wd", str(train.weight_decay)]
    command += ["--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--precision", precision, "--seed", str(seed)]
    command += ["--workers", "1", "--device", "cpu", "--logs", str(work / "open_clip"), "--name", name]
    command += ["--save-frequency", "1", "--log-every-n-steps", "10", "--report-to", ""]
    checkpoint = work / "open_clip" / name / "checkpoints" / "epoch_1.pt"
    return _timed("open_clip", name, precision, steps * batch, command, work, checkpoint)


def _timed(
    trainer: str,
    name: str,
    precision: str,
    samples: int,
    command: list[str],
    work: Path,
    checkpoint: Path,
):
    """Run a training command; wall and CPU time of its process tree (every process is waited for)."""
    log = work / f"{name}.log"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with log.open("w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed ({result.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    run = {"trainer": trainer, "name": name, "precision": precision, "samples": samples}
    run |= {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "samples_per_s": samples / seconds}
    run |= {"samples_per_cpu_s": samples / cpu, "checkpoint": checkpoint}
    print(json.dumps(run, default=str), file=sys.stderr, flush=True)
    return run


def _zeroshot(checkpoint: Path, data: Path, output: Path, params) -> tuple[float, float]:
    """Held-out and seen zero-shot top-1 of a checkpoint."""
    from clipflow.evaluate.step import evaluate

    metrics = evaluate(checkpoint, data, output, params, model_config=MODEL).metrics
    return metrics["zeroshot_top1_heldout"], metrics["zeroshot_top1_seen"]


if __name__ == "__main__":
    main(sys.argv[1:])
