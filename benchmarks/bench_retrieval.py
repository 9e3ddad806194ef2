"""Peak memory and time of retrieval recall@k: clipflow's chunked computation against the dense one.

    python benchmarks/bench_retrieval.py

The peer is the dense computation that evaluation code usually does, as LAION's CLIP_benchmark
does it: the full N x N similarity matrix, then whether each query's own pair is among
`torch.topk`'s k best. Each case runs in a fresh subprocess, and its
peak extra memory is the process's peak resident size minus its size just before the call,
so cases cannot inherit each other's allocations. The dense N x N float32 matrix alone needs
4 N^2 bytes (40 GB at N = 100,000, beyond this 24 GiB machine), so the peer skips that case.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from common import case, peak_bytes, resident_bytes, run_child, write_results

DIM = 512
KS = (1, 5, 10)
SIZES = (10_000, 20_000, 40_000, 100_000)
DENSE_MAX = 40_000


def dense_recall(queries: torch.Tensor, candidates: torch.Tensor, ks) -> dict[int, float]:
    scores = queries @ candidates.T
    top = scores.topk(max(ks), dim=1).indices
    hits = top == torch.arange(len(queries))[:, None]
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def measure(kind: str, n: int) -> dict:
    """Run one case in this process: returns peak extra MB, seconds and the recall values."""
    from clipflow.evaluate.metrics import recall_at_k

    torch.manual_seed(0)
    torch.set_num_threads(2)
    # Built in place, so that making the inputs does not set the process's peak.
    images = torch.randn(n, DIM)
    images.div_(images.norm(dim=1, keepdim=True))
    texts = torch.randn(n, DIM).mul_(0.05).add_(images)
    texts.div_(texts.norm(dim=1, keepdim=True))
    before = resident_bytes()
    started = time.perf_counter()
    recall = recall_at_k(images, texts, KS) if kind == "chunked" else dense_recall(images, texts, KS)
    seconds = time.perf_counter() - started
    return {"peak_extra_mb": max(0, peak_bytes() - before) / 2**20, "seconds": seconds, "recall": recall}


def main() -> None:
    cases = []
    for n in SIZES:
        chunked = run_child(__file__, "chunked", str(n))
        dense = run_child(__file__, "dense", str(n)) if n <= DENSE_MAX else None
        if dense:
            assert chunked["recall"] == dense["recall"], (chunked["recall"], dense["recall"])
        for metric, unit in (("peak_extra_mb", "MB"), ("seconds", "s")):
            row = case(
                f"N={n}",
                metric,
                unit,
                round(chunked[metric], 2),
                "dense N x N similarity",
                round(dense[metric], 2) if dense else None,
            )
            if not dense:
                row["note"] = f"dense needs {4 * n * n / 1e9:.0f} GB for the similarity matrix alone"
            cases.append(row)
            print(json.dumps(row))
    write_results("bench_retrieval", "python benchmarks/bench_retrieval.py", cases, dim=DIM)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]))))
    else:
        main()
