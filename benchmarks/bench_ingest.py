"""Ingest throughput and peak memory from a local CSV manifest: 10,000 against 100,000 images.

    python benchmarks/bench_ingest.py [--sizes 10000 100000] [--work /tmp/clipflow-bench-ingest]

Renders the images once (128 px built-in scenes saved as PNG, each distinct), writes one
manifest per size, then runs `clipflow.data.ingest.ingest` for each size in a fresh process
with params.yaml's `data.workers`, so each case's peak memory is its own. Peak memory is the
resident set of the main process, of the largest worker (`getrusage`; a forked worker starts
with its parent's pages) and of the whole process tree, sampled every 0.1 s; streaming in chunks
of `data.shard_size` rows should keep both flat as the manifest grows tenfold.
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
    peak = {"total_mb": 0.0}
    running = threading.Event()
    running.set()

    def sample_tree_rss() -> None:
        while running.is_set():
            peak["total_mb"] = max(peak["total_mb"], _tree_rss_mb(os.getpid()))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample_tree_rss, daemon=True)
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
        "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * to_mb,
        "total_peak_mb": peak["total_mb"],
        "workers": params.data.workers,
    }


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, sampled now (shared pages count in each)."""
    total = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (FileNotFoundError, ProcessLookupError):
        return total
    return total + sum(_tree_rss_mb(int(child)) for child in children)


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
