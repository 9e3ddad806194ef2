"""clipflow's tiled contrastive loss against open_clip's ClipLoss: memory and time of one step.

For each global batch B (d = 512, fp32, one process), forward plus backward of the loss on
unit-norm features. Each measurement runs in a fresh child process so that the peak resident
memory (getrusage's ru_maxrss) belongs to that one loss alone; "extra" memory is that peak
minus the resident memory once the features exist. A child that dies (out of memory) gives
`null` with a note.

    python benchmarks/bench_loss.py [--batches 4096 8192 16384 32768] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

DIM = 512
BATCHES = [4096, 8192, 16384, 32768]
IMPLEMENTATIONS = {"clipflow": "clipflow TiledClipLoss", "open_clip": "open_clip ClipLoss"}
RESULTS = Path(__file__).parent / "results" / "bench_loss.json"


def _resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def measure(implementation: str, batch: int, repeats: int) -> dict[str, float]:
    """Child side: one loss, `repeats` forward+backward steps; peak extra MB and the fastest step's seconds."""
    import open_clip
    import torch

    from clipflow.train.loss import TiledClipLoss

    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(batch, DIM, generator=generator), dim=-1)
    texts = torch.nn.functional.normalize(images + torch.randn(batch, DIM, generator=generator), dim=-1)
    images.requires_grad_(True)
    texts.requires_grad_(True)
    logit_scale = torch.tensor(14.3, requires_grad=True)
    loss_fn = TiledClipLoss() if implementation == "clipflow" else open_clip.ClipLoss()
    baseline_mb = _resident_mb()
    seconds = []
    for _ in range(repeats):
        images.grad = texts.grad = logit_scale.grad = None
        start = time.perf_counter()
        loss_fn(images, texts, logit_scale).backward()
        seconds.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return {"peak_extra_mb": round(peak_mb - baseline_mb, 1), "seconds": round(min(seconds), 3)}


def _run_child(implementation: str, batch: int, repeats: int) -> dict[str, float] | None:
    command = [sys.executable, __file__, "--child", implementation, str(batch), str(repeats)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"  {implementation} B={batch} failed (exit {result.returncode}): {result.stderr[-500:]}", flush=True)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def _machine() -> str:
    import os

    with open("/proc/meminfo") as meminfo:
        total_gib = int(meminfo.readline().split()[1]) / 2**20
    model = next((line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return f"{os.cpu_count()} cores, {model or platform.processor()}, {total_gib:.0f} GiB, no GPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        implementation, batch, repeats = args.child
        print(json.dumps(measure(implementation, int(batch), int(repeats))))
        return

    cases = []
    for batch in args.batches:
        repeats = 3 if batch <= 8192 else 1  # the large cases take a minute each; one step is enough to time
        results = {name: _run_child(name, batch, repeats) for name in IMPLEMENTATIONS}
        print(f"B={batch}: {results}", flush=True)
        for metric, unit in (("peak_extra_mb", "MB"), ("seconds", "s")):
            ours, peer = results["clipflow"], results["open_clip"]
            case = {
                "case": f"B={batch}",
                "metric": metric,
                "unit": unit,
                "clipflow": ours and ours[metric],
                "peer": IMPLEMENTATIONS["open_clip"],
                "peer_value": peer and peer[metric],
                "ratio": round(ours[metric] / peer[metric], 4) if ours and peer else None,
            }
            if peer is None:
                case["note"] = "open_clip ClipLoss did not finish: out of memory"
            cases.append(case)
    report = {
        "benchmark": "bench_loss",
        "date": datetime.now(UTC).date().isoformat(),
        "machine": _machine(),
        "command": "python benchmarks/bench_loss.py",
        "setup": f"one process, fp32 unit-norm features, d={DIM}, forward + backward of the loss alone",
        "cases": cases,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
