"""clipflow's tiled contrastive loss against open_clip's ClipLoss: memory and time of one step.

    python benchmarks/bench_loss.py [--batches 4096 8192 16384 32768]

For each global batch B (d = 512, fp32, one process): forward plus backward of the loss on
unit-norm features. Each measurement runs in a fresh child process so that its peak resident
memory belongs to that one loss alone; "extra" memory is that peak minus the resident memory
once the features exist. A child that dies (out of memory) gives `null` with a note.
"""

from __future__ import annotations

import argparse
import json
import time

from common import case, peak_bytes, resident_bytes, run_child, write_results

DIM = 512
BATCHES = [4096, 8192, 16384, 32768]
PEER = "open_clip ClipLoss"


def measure(implementation: str, batch: int, repeats: int) -> dict[str, float]:
    """One loss, `repeats` forward+backward steps: peak extra MB and the fastest step's seconds."""
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
    baseline = resident_bytes()
    seconds = []
    for _ in range(repeats):
        images.grad = texts.grad = logit_scale.grad = None
        start = time.perf_counter()
        loss_fn(images, texts, logit_scale).backward()
        seconds.append(time.perf_counter() - start)
    return {"peak_extra_mb": round((peak_bytes() - baseline) / 2**20, 1), "seconds": round(min(seconds), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        implementation, batch, repeats = args.child
        print(json.dumps(measure(implementation, int(batch), int(repeats))))
        return

    cases = []
    for batch in args.batches:
        repeats = "3" if batch <= 8192 else "1"  # a large case takes a minute: one step times it well enough
        ours = run_child(__file__, "clipflow", str(batch), repeats)
        peer = run_child(__file__, "open_clip", str(batch), repeats)
        print(f"B={batch}: clipflow {ours}, open_clip {peer}", flush=True)
        for metric, unit in (("peak_extra_mb", "MB"), ("seconds", "s")):
            row = case(f"B={batch}", metric, unit, ours and ours[metric], PEER, peer and peer[metric])
            if peer is None:
                row["note"] = f"{PEER} did not finish: out of memory"
            cases.append(row)
    path = write_results(
        "bench_loss",
        "python benchmarks/bench_loss.py",
        cases,
        setup=f"one process, fp32 unit-norm features, d={DIM}, forward + backward of the loss alone",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
