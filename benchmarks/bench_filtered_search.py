"""Filtered search: clipflow's `Collection.search` against Milvus's own search under the same filter.

    python benchmarks/bench_filtered_search.py [--rows 20000] [--queries 50]

N random 512-d unit vectors (seeded) go into a Milvus Lite folder with `index.index_type` and
`index.build_params` from params.yaml, each row tagged with buckets of 5, 20, 100, 1,000, 2,000 and
5,000 rows. Once the index has every row, the same queries are searched for their top 10 under
`bucket == 0` two ways: clipflow's `Collection.search` with `index.exact_filter_rows` from params.yaml
(rows under a filter that few are ranked exactly), and Milvus's filtered search with
`index.search_params`, what clipflow did before. For each, recall@10 against an exact matrix product
over the bucket's rows, the fraction of queries answered with fewer rows than min(10, bucket)
although that many match, and the median latency of one query; and, for scale, the index's recall
without a filter. Random vectors are the hard case for a graph index: its recall on real embeddings
is higher, but a selective filter leaves it the same holes.
Writes benchmarks/results/bench_filtered_search.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import case, write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COMMAND = "python benchmarks/bench_filtered_search.py"
DIM = 512
K = 10
BUCKET_ROWS = (5, 20, 100, 1_000, 2_000, 5_000)
INSERT_ROWS = 5_000
INDEX_WAIT_S = 600


def unit_vectors(rng: np.random.Generator, count: int) -> np.ndarray:
    vectors = rng.standard_normal((count, DIM), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def wait_for_index(client, name: str) -> float:
    """Seconds until the vector index holds every row, so no search runs against unindexed segments."""
    started = time.perf_counter()
    while time.perf_counter() - started < INDEX_WAIT_S:
        described = client.describe_index(name, "vector")
        if described["pending_index_rows"] == 0 and described["indexed_rows"] == described["total_rows"]:
            return time.perf_counter() - started
        time.sleep(1)
    raise SystemExit(f"the index of {name} was not built within {INDEX_WAIT_S} s")


def measure(collection, queries: np.ndarray, bucket: str, truth: list[set[str]], expected: int) -> dict:
    recalls, short, latencies = [], 0, []
    collection.search(queries[:1], K, {bucket: 0})  # loads what the filter reads
    for query, wanted in zip(queries, truth, strict=True):
        started = time.perf_counter()
        hits = collection.search(query[None, :], K, {bucket: 0})[0]
        latencies.append(time.perf_counter() - started)
        recalls.append(len({hit.key for hit in hits} & wanted) / len(wanted))
        short += len(hits) < expected
    return {
        "recall": float(np.mean(recalls)),
        "short_fraction": short / len(queries),
        "p50_ms": 1000 * statistics.median(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()

    from clipflow.params import load_params
    from clipflow.vectors import Collection, open_client

    index = load_params(ROOT / "params.yaml").index
    rng = np.random.default_rng(0)
    vectors, queries = unit_vectors(rng, args.rows), unit_vectors(rng, args.queries)
    buckets = {f"bucket_{rows}": args.rows // rows for rows in BUCKET_ROWS}  # name -> number of buckets
    cases = []
    with tempfile.TemporaryDirectory(prefix="bench-filtered-") as work:
        client = open_client(str(Path(work) / "milvus.db"))
        ours = Collection.create(client, "catalogue", DIM, index)
        for start in range(0, args.rows, INSERT_ROWS):
            rows = range(start, min(start + INSERT_ROWS, args.rows))
            fields = [{name: row % count for name, count in buckets.items()} for row in rows]
            ours.insert([f"v{row:07d}" for row in rows], vectors[rows.start : rows.stop], fields)
        ours.count()
        index_build_s = wait_for_index(client, "catalogue")
        milvus_only = Collection(client, "catalogue", dataclasses.replace(index, exact_filter_rows=0))
        exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :K]
        found = ours.search(queries, K)
        unfiltered = np.mean(
            [
                len({hit.key for hit in hits} & {f"v{row:07d}" for row in top}) / K
                for hits, top in zip(found, exact, strict=True)
            ]
        )
        cases.append(
            case(
                f"{args.rows} x {DIM} random, no filter",
                "recall",
                "fraction",
                round(float(unfiltered), 4),
                "exact search",
                1.0,
            )
        )
        for name, count in buckets.items():
            members = np.flatnonzero(np.arange(args.rows) % count == 0)
            scores = queries @ vectors[members].T
            truth = [{f"v{members[i]:07d}" for i in np.argsort(-row)[:K]} for row in scores]
            expected = min(K, len(members))
            clipflow, milvus = (measure(c, queries, name, truth, expected) for c in (ours, milvus_only))
            label = f"{args.rows} x {DIM} random, filter matching {len(members)} rows"
            peer = f"Milvus {index.index_type} filtered search, {index.search_params}"
            for metric, unit in (("recall", "fraction"), ("short_fraction", "fraction"), ("p50_ms", "ms")):
                digits = 1 if unit == "ms" else 4
                row = case(label, metric, unit, round(clipflow[metric], digits), peer, round(milvus[metric], digits))
                cases.append(row)
            print(label, {"clipflow": clipflow, "milvus": milvus}, flush=True)
    details = {
        "index_type": index.index_type,
        "build_params": index.build_params,
        "search_params": index.search_params,
        "exact_filter_rows": index.exact_filter_rows,
        "k": K,
        "queries": args.queries,
        "index_build_seconds_after_insert": round(index_build_s, 1),
        "store": "Milvus Lite folder, in process",
    }
    print(f"wrote {write_results('bench_filtered_search', COMMAND, cases, **details)}")


if __name__ == "__main__":
    main()
