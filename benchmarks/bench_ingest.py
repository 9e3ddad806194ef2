"""Ingest throughput and peak memory from a local CSV manifest: 10,000 against 100,000 images.

    python benchmarks/bench_ingest.py [--sizes 10000 100000] [--work /tmp/clipflow-bench-ingest]

Renders the images once (128 px built-in scenes saved as PNG, each distinct), writes one
manifest per size, then runs `clipflow.data.ingest.ingest` for each size in a fresh process
with params.yaml's `data.workers`, so each case's peak memory is its own. Peak memory is the
main process's resident set (`getrusage`), the largest worker's own memory (its unique set
size: pages no other process maps, so not the parent's pages a forked worker starts with) and
the whole process tree's proportional set size (shared pages split among the processes that map
them, so none counts twice), the last two sampled every 0.1 s; streaming in chunks of
`data.shard_size` rows should keep all three flat as the manifest grows tenfold.
Writes benchmarks/results/bench_ingest.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import threading
import time
from pathlib import Path

import psutil
from common import case, run_child, write_results

REPO = Path(__file__).resolve().parents[1]
SOURCE_SIDE = 128


def _render(job: tuple[str, int, int]) -> None:
    from clipflow.data import builtin
    from clipflow.params import load_params

    folder, start, stop = job
    pairs = builtin.compositions(load_params(REPO / "params.yaml").data, "train")
    for index in range(start, stop):
        path = Path(folder) / f"{index // 10000:03d}" / f"{index:07d}.png"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = random.Random(f"bench/{index}")
        color, shape = rng.choice(pairs)
        size, row, column = rng.choice(tuple(builtin.SIZE_WORDS)), rng.choice(builtin.ROWS), rng.choice(builtin.COLUMNS)
        scene = builtin.Scene(color, shape, size, row, column, rng.randrange(90, 170))
        builtin.render(scene, SOURCE_SIDE, rng).save(path)


def prepare(work: Path, count: int) -> Path:
    """Render `count` images (reusing earlier ones) and write their manifest."""
    import pandas as pd

    images = work / "images"
    step = 2000
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        pool.map(_render, [(str(images), s, min(s + step, count)) for s in range(0, count, step)])
    manifest = work / f"manifest-{count}.csv"
    rows = [
        {"image": str(images / f"{i // 10000:03d}" / f"{i:07d}.png"), "caption": f"scene number {i}", "n": i}
        for i in range(count)
    ]
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def run_case(manifest: Path, output: Path) -> dict:
    """One ingest in this process; returns its timing and peak memory."""
    from clipflow.data.ingest import ingest
    from clipflow.params import load_params

    params = load_params(REPO / "params.yaml")
    peak = {"total_mb": 0.0, "worker_mb": 0.0}
    running = threading.Event()
    running.set()

    def sample_memory() -> None:
        while running.is_set():
            total_mb, largest_worker_mb = _memory_mb(psutil.Process())
            peak["total_mb"] = max(peak["total_mb"], total_mb)
            peak["worker_mb"] = max(peak["worker_mb"], largest_worker_mb)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    started = time.perf_counter()
    summary = ingest(str(manifest), output, params.data, params.validate)
    seconds = time.perf_counter() - started
    running.clear()
    sampler.join()
    to_mb = 1 / 1024  # ru_maxrss is in KiB on Linux
    return {
        "rows": summary.input_rows,
        "kept": summary.kept,
        "seconds": seconds,
        "images_per_s": summary.kept / seconds,
        "main_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * to_mb,
        "worker_peak_mb": peak["worker_mb"],
        "total_peak_mb": peak["total_mb"],
        "workers": params.data.workers,
    }


def _memory_mb(main: psutil.Process) -> tuple[float, float]:
    """The process tree's proportional set size and its largest worker's unique set size, now."""
    total = largest_worker = 0.0
    for process in [main, *main.children(recursive=True)]:
        try:
            memory = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # a worker that exited between the listing and the read
        total += memory.pss / 2**20
        if process.pid != main.pid:
            largest_worker = max(largest_worker, memory.uss / 2**20)
    return total, largest_worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipflow-bench-ingest"))
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        manifest, work = args.child
        print(json.dumps(run_case(manifest, work / f"out-{manifest.stem}")))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    results = {}
    for count in sorted(args.sizes):
        manifest = prepare(args.work, count)
        results[count] = run_child(__file__, str(manifest), str(args.work))
        if results[count] is None:
            raise SystemExit(f"ingest of {count} images failed")
        print(count, results[count], flush=True)

    smallest = min(results)
    cases = []
    for count, result in sorted(results.items()):
        label = f"{count} images"
        throughput = case(label, "images_per_s", "images/s", round(result["images_per_s"], 1), None, None)
        throughput["note"] = f"{result['workers']} workers; {result['seconds']:.1f} s for {result['rows']} rows"
        cases.append(throughput)
        for metric in ("total_peak_mb", "main_peak_mb", "worker_peak_mb"):
            base = round(results[smallest][metric], 1)
            cases.append(case(label, metric, "MB", round(result[metric], 1), f"clipflow at {smallest} images", base))
    print(f"wrote {write_results('bench_ingest', 'python benchmarks/bench_ingest.py', cases)}")


if __name__ == "__main__":
    main()
