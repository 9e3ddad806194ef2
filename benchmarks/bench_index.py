"""`clipflow index` against the in-process encode of the same images, and the index's search against exact search.

    python benchmarks/bench_index.py [--sizes 10000 100000] [--repeats 3] [--vectors 1000000] [--clients 16]
        [--seconds 20]

(1) Embedding: the built-in data is ingested with `data.num_train` = N, and its train split is indexed
by `clipflow index --no-store` (a fresh process, `index.workers` processes of `index.threads_per_worker`
threads, images and captions), timed from the command's start to its end, with the process tree's
peak proportional set size sampled every 0.1 s; `--repeats` runs of it and of the peer, in turn, and
the median of each side. The peer is the same work written the plain way in one
fresh process on the same cores: read the shards in order (`ShardPairs`), preprocess, and encode
images and captions in batches of `index.batch_size` with every core's thread, keeping the float16
embeddings. Both load the same CLIP-Tiny checkpoint (random weights: speed does not depend on them).

(2) Search: N random 512-d unit vectors (seeded) are written as an embedding artifact, published to
a `milvus-lite server` on 127.0.0.1 (`index.index_type` with `index.build_params`), and queried with
the text embeddings of ViT-B-32 (random weights, 512-d) of distinct queries: recall@10 of the index
against an exact matrix product over the same vectors, at several `ef` (HNSW's search breadth) with
the in-library searcher, one query per call and 16 per call (`Searcher.search_many`, as the served
`QueryBatcher` groups waiting queries); then the `search` endpoint of a Bento packaged with that index
at the smallest swept `ef` that reaches recall 0.95, under `--clients` closed-loop clients (p50 and
p99 include the text encode), beside the brute-force matrix product of the same queries in this
process, one at a time.

(3) clip-retrieval's `clip-retrieval inference` (its own virtualenv, `benchmarks/.peers/clip-retrieval`,
made on first use with this machine's torch as a constraint) embeds the same shards with the same
checkpoint (`open_clip:CLIP-Tiny/PATH`; CLIP-Tiny's config is copied into that venv's open_clip), images
and captions, `--num_prepro_workers` = the cores, timed the same way.
Writes benchmarks/results/bench_index.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from bench_serve import closed_loop
from common import case, write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COMMAND = "python benchmarks/bench_index.py"
EMBED_MODEL = "CLIP-Tiny"
SEARCH_MODEL = "ViT-B-32"  # 512-d, the width of the random catalogue
K = 10
RECALL_QUERIES = 200
EF_SWEEP = (128, 512, 2048, 4096)
RECALL_TARGET = 0.95
BATCH_QUERIES = 16  # one store call carrying this many queries, as the served QueryBatcher sends them
IDLE_CPU_PERCENT = 5.0  # the server is done building its indexes once it stays below this
PART_ROWS = 100_000
BIN = Path(sys.executable).parent
CLIP_RETRIEVAL = "clip-retrieval==2.45.0"
# clip-anytorch imports pkg_resources, which setuptools 81 removed.
CLIP_RETRIEVAL_EXTRA = "setuptools<81"


def ingest_builtin(work: Path, count: int) -> Path:
    """The built-in data with `count` training images (other splits at their smallest), ingested once."""
    from clipflow.data.ingest import ingest
    from clipflow.params import load_params

    data = work / f"data-{count}"
    if not (data / "ingest.json").is_file():
        sizes = [f"data.num_train={count}", "data.num_test=10", "data.num_heldout=10", "data.num_probe=3"]
        ingest("builtin", data, load_params(ROOT / "params.yaml", overrides=sizes).data)
    return data


def tree_peak_mb(process: psutil.Process, running: threading.Event, peak: list[float]) -> None:
    """Sample the proportional set size of `process` and its children until `running` clears."""
    while running.is_set():
        total = 0.0
        try:
            members = [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return  # it has ended
        for member in members:
            try:
                total += member.memory_full_info().pss / 2**20
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        peak[0] = max(peak[0], total)
        time.sleep(0.1)


def timed(command: list[str]) -> dict:
    """Run `command` to its end: wall seconds and the process tree's peak PSS (MB)."""
    running, peak = threading.Event(), [0.0]
    running.set()
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = threading.Thread(target=tree_peak_mb, args=(psutil.Process(process.pid), running, peak), daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    running.clear()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{stderr[-3000:]}")
    return {"seconds": seconds, "peak_mb": peak[0], "stdout": stdout}


def peer_encode(data: Path, checkpoint: Path, batch_size: int) -> None:
    """The peer, in this (fresh) process: the train split's images and captions, encoded in order, in batches."""
    import torch

    from clipflow import model as clip_model
    from clipflow.data.pairs import ShardPairs

    clip = clip_model.load(checkpoint)
    pairs = ShardPairs(data, "train", clip.preprocess, clip.tokenizer)
    images, texts = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            rows = range(start, min(start + batch_size, len(pairs)))
            batch = torch.stack([clip.preprocess(pairs.image(i)) for i in rows])
            images.append(clip.encode_images(batch).numpy().astype(np.float16))
            texts.append(clip.encode_text([pairs.caption(i) for i in rows]).numpy().astype(np.float16))
    print(json.dumps({"rows": sum(len(chunk) for chunk in images)}))


def clip_retrieval_venv(venv: Path) -> Path:
    """clip-retrieval's virtualenv, made first if missing, with CLIP-Tiny's config where its open_clip reads configs."""
    import torch

    from clipflow.model import CONFIG_DIR

    cli = venv / "bin" / "clip-retrieval"
    if not (venv / ".installed").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        constraints = venv / "constraints.txt"
        # The torch this machine serves from disk: anything newer is a multi-gigabyte download.
        constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "-c", str(constraints)]
        subprocess.run([*pip, CLIP_RETRIEVAL, CLIP_RETRIEVAL_EXTRA], check=True)
        (venv / ".installed").touch()
    found = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import open_clip, pathlib; print(pathlib.Path(open_clip.__file__).parent)",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    configs = Path(found.stdout.strip()) / "model_configs"
    (configs / f"{EMBED_MODEL}.json").write_text((CONFIG_DIR / f"{EMBED_MODEL}.json").read_text())
    return cli


def clip_retrieval_command(cli: Path, data: Path, checkpoint: Path, output: Path, batch_size: int) -> list[str]:
    """`clip-retrieval inference` over the train shards of `data`, images and captions, as its README runs it."""
    shards = sorted((data / "train").glob("*.tar"))
    first, last = shards[0].stem.rsplit("-", 1)[1], shards[-1].stem.rsplit("-", 1)[1]
    return [
        str(cli), "inference", "--input_dataset", str(data / "train" / f"train-{{{first}..{last}}}.tar"),
        "--input_format", "webdataset", "--wds_image_key", "png", "--wds_caption_key", "txt",
        "--output_folder", str(output), "--clip_model", f"open_clip:{EMBED_MODEL}/{checkpoint}",
        "--batch_size", str(batch_size), "--num_prepro_workers", str(os.cpu_count()), "--use_jit", "False",
        "--enable_metadata", "True", "--enable_wandb", "False", "--write_batch_size", str(10**6),
    ]  # fmt: skip


def median_run(runs: list[dict]) -> dict:
    """The run of median wall time, with the highest peak memory of all runs."""
    middle = sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2]
    return {**middle, "peak_mb": max(run["peak_mb"] for run in runs)}


def each_run(runs: list[dict]) -> str:
    return " / ".join(f"{run['seconds']:.1f}" for run in runs) + " s"


def embedding_cases(work: Path, sizes: list[int], repeats: int, clip_retrieval: Path) -> tuple[list[dict], dict]:
    from clipflow import model as clip_model
    from clipflow.params import load_params

    index = load_params(ROOT / "params.yaml").index
    checkpoint = work / EMBED_MODEL
    if not checkpoint.exists():
        clip_model.save_checkpoint(checkpoint, clip_model.create(EMBED_MODEL).model, EMBED_MODEL, extra={})
    measured = {}
    for count in sorted(sizes):
        data = ingest_builtin(work, count)
        # The two sides take turns, so that a shared machine's drift falls on both alike.
        runs: dict[str, list[dict]] = {"clipflow": [], "peer": []}
        for _ in range(repeats):
            output = work / f"embeddings-{count}-{time.time_ns()}"
            ours = timed(
                [str(BIN / "clipflow"), "index", "--no-store", "--source", str(data), "--model", str(checkpoint)]
                + ["--output", str(output), "--set", "index.split=train"]
            )
            runs["clipflow"].append(ours)
            peer = timed([sys.executable, __file__, "--peer", str(data), str(checkpoint), str(index.batch_size)])
            runs["peer"].append(peer)
            rows = json.loads(ours["stdout"])["rows"]
            assert json.loads(peer["stdout"].strip().splitlines()[-1])["rows"] == rows == count
        ours, peer = median_run(runs["clipflow"]), median_run(runs["peer"])
        theirs_output = work / f"clip-retrieval-{count}-{time.time_ns()}"
        checkpoint_file = clip_model.resolve_checkpoint(checkpoint)  # open_clip takes the file, not its folder
        theirs = timed(clip_retrieval_command(clip_retrieval, data, checkpoint_file, theirs_output, index.batch_size))
        agreement = embedding_agreement(output, theirs_output)
        measured[count] = {"clipflow": ours, "peer": peer, "clip-retrieval": theirs, "agreement": agreement}
        measured[count]["runs"] = runs
        seconds = {name: measured[count][name]["seconds"] for name in ("clipflow", "peer", "clip-retrieval")}
        print(json.dumps({"embedding": count, "seconds": seconds, **agreement}), flush=True)
    cases = []
    smallest = min(measured)
    workers = f"{index.workers} processes x {index.threads_per_worker} thread"
    for count, result in sorted(measured.items()):
        label = f"{count} images, {EMBED_MODEL}"
        ours, peer = count / result["clipflow"]["seconds"], count / result["peer"]["seconds"]
        row = case(label, "images_per_s", "images/s", round(ours, 1), "in-process batched encode", round(peer, 1))
        row["note"] = (
            f"clipflow index ({workers}, images and captions) {each_run(result['runs']['clipflow'])}; one process,"
            f" {os.cpu_count()} threads, {each_run(result['runs']['peer'])}; both from process start, taking"
            f" turns, the median of {repeats} runs each"
        )
        cases.append(row)
        theirs = count / result["clip-retrieval"]["seconds"]
        row = case(label, "images_per_s", "images/s", round(ours, 1), "clip-retrieval inference", round(theirs, 1))
        row["note"] = (
            f"clip-retrieval {result['clip-retrieval']['seconds']:.1f} s ({os.cpu_count()} preprocessing workers);"
            f" its embeddings against ours: worst row cosine {result['agreement']['worst_cosine']:.5f}"
            f" over {result['agreement']['rows']} rows matched by key"
        )
        cases.append(row)
        base = round(measured[smallest]["clipflow"]["peak_mb"], 1)
        cases.append(
            case(label, "peak_pss_mb", "MB", round(result["clipflow"]["peak_mb"], 1), f"at {smallest} images", base)
        )
    return cases, {"embedding_workers": workers}


def embedding_agreement(ours: Path, theirs: Path) -> dict:
    """The worst cosine between our image embeddings and clip-retrieval's of the same keys (both artifacts read
    the way clip-retrieval's consumers read them)."""
    import pandas as pd

    def read(folder: Path) -> dict[str, np.ndarray]:
        vectors = np.concatenate([np.load(path) for path in sorted((folder / "img_emb").glob("*.npy"))])
        metadata = pd.concat([pd.read_parquet(path) for path in sorted((folder / "metadata").glob("*.parquet"))])
        keys = metadata["key"] if "key" in metadata else metadata["image_path"]
        return dict(zip(keys.astype(str), vectors.astype(np.float32), strict=True))

    mine, other = read(ours), read(theirs)
    shared = sorted(set(mine) & set(other))
    cosines = [float(mine[key] @ other[key] / np.linalg.norm(other[key])) for key in shared]
    return {"rows": len(shared), "worst_cosine": min(cosines) if cosines else float("nan")}


def random_catalogue(folder: Path, count: int, dim: int, seed: int = 0) -> np.ndarray:
    """`count` seeded random unit vectors as an embedding artifact in `folder`; returns them (float32)."""
    import pandas as pd

    from clipflow.index import artifact

    vectors = np.random.default_rng(seed).standard_normal((count, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors.astype(artifact.EMBEDDING_DTYPE).astype(np.float32)  # what the artifact holds
    for number, start in enumerate(range(0, count, PART_ROWS)):
        rows = range(start, min(start + PART_ROWS, count))
        metadata = pd.DataFrame(
            {"key": [f"v{i:07d}" for i in rows], "image_path": [f"s3://catalogue/{i}.jpg" for i in rows]}
            | {"caption": [f"item {i}" for i in rows], "shard": [i % 10 for i in rows]}
        )
        part = artifact.Part(number, vectors[rows.start : rows.stop], None, metadata)
        artifact.write_part(folder, part, pd.DataFrame(columns=["row", "key", "source", "reason"]))
    manifest = artifact.IndexManifest(
        model="random",
        model_version="random",
        data_version=f"random-{count}-{seed}",
        source="numpy",
        dim=dim,
        input_rows=count,
        rows=count,
        quarantined=0,
        parts=len(range(0, count, PART_ROWS)),
        text=False,
    )
    artifact.write_manifest(folder, manifest)
    return vectors


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The exact top-k rows of each query by inner product, in chunks of queries."""
    tops = []
    for start in range(0, len(queries), 16):
        scores = queries[start : start + 16] @ vectors.T
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.take_along_axis(scores, part, axis=1).argsort(axis=1)[:, ::-1]
        tops.append(np.take_along_axis(part, order, axis=1))
    return np.concatenate(tops)


def search_cases(work: Path, count: int, clients: int, seconds: float) -> tuple[list[dict], dict]:
    import dataclasses

    from clipflow import model as clip_model
    from clipflow.index.store import Searcher, publish
    from clipflow.params import load_params
    from clipflow.serve.package import bentoml_env, package
    from tests.support.milvus import milvus_lite_server
    from tests.support.servers import bentoml_server, free_port

    clip = clip_model.create(SEARCH_MODEL)
    texts = [f"a photo of product number {i}" for i in range(RECALL_QUERIES)]
    queries = clip.encode_text(texts).numpy()
    artifact_folder = work / f"random-{count}"
    vectors = random_catalogue(artifact_folder, count, queries.shape[1])
    exact = exact_top(vectors, queries, K)
    brute = []
    for query in queries[:100]:
        started = time.perf_counter()
        exact_top(vectors, query[None, :], K)
        brute.append(time.perf_counter() - started)
    brute_cuts = statistics.quantiles(brute, n=100)
    del vectors

    params = load_params(ROOT / "params.yaml", overrides=[f"tracking.uri=sqlite:///{work}/mlflow.db"])
    cases: list[dict] = []
    with milvus_lite_server(work / f"milvus-{time.time_ns()}") as server:
        index = dataclasses.replace(params.index, uri=server.uri)
        started = time.perf_counter()
        published = publish(artifact_folder, index)
        publish_s = time.perf_counter() - started
        build_s = wait_until_idle(server.pid)
        print(json.dumps({"published": published, "seconds": publish_s, "index_build_s": build_s}), flush=True)
        keys = np.array([f"v{i:07d}" for i in range(count)])
        recall_by_ef = {}
        for ef in EF_SWEEP:
            searcher = Searcher(dataclasses.replace(index, search_params={**index.search_params, "ef": ef}))
            hits, latencies = [], []
            for query, truth in zip(queries, exact, strict=True):
                started = time.perf_counter()
                found = {hit["id"] for hit in searcher.search(query, K)}
                latencies.append(time.perf_counter() - started)
                hits.append(len(found & set(keys[truth])) / K)
            started = time.perf_counter()
            for first in range(0, len(queries), BATCH_QUERIES):
                searcher.search_many(queries[first : first + BATCH_QUERIES], K)
            batched_ms = 1000 * (time.perf_counter() - started) / -(-len(queries) // BATCH_QUERIES)
            recall_by_ef[ef] = {
                "recall": float(np.mean(hits)),
                "p50_ms": 1000 * statistics.median(latencies),
                "batched_call_ms": batched_ms,
            }
            print(json.dumps({"ef": ef, **recall_by_ef[ef]}), flush=True)
        default_ef = index.search_params.get("ef")
        for ef, result in recall_by_ef.items():
            label = f"{count} x 512 random, {index.index_type} ef={ef}" + (" (params)" if ef == default_ef else "")
            cases.append(case(label, "recall_at_10", "fraction", round(result["recall"], 4), "exact search", 1.0))
            row = case(label, "p50_ms", "ms", round(result["p50_ms"], 2), "brute force in process", None)
            row["peer_value"] = round(1000 * statistics.median(brute), 2)
            row["ratio"] = round(result["p50_ms"] / row["peer_value"], 4)
            row["note"] = "one query at a time, no model call (the library's Searcher against numpy)"
            cases.append(row)
            row = case(
                label,
                f"ms_per_call_of_{BATCH_QUERIES}_queries",
                "ms",
                round(result["batched_call_ms"], 2),
                f"{BATCH_QUERIES} single-query calls",
                round(BATCH_QUERIES * result["p50_ms"], 2),
            )
            row["ratio"] = round(result["batched_call_ms"] / row["peer_value"], 4)
            row["note"] = "Searcher.search_many: one store call for the queries the served QueryBatcher groups"
            cases.append(row)
        # The served index searches as broadly as the recall target needs (random vectors need more than params').
        served_ef = next((ef for ef in EF_SWEEP if recall_by_ef[ef]["recall"] >= RECALL_TARGET), EF_SWEEP[-1])
        index = dataclasses.replace(index, search_params={**index.search_params, "ef": served_ef})

        checkpoint = work / SEARCH_MODEL
        if not checkpoint.exists():
            clip_model.save_checkpoint(checkpoint, clip.model, SEARCH_MODEL, extra={})
        os.environ["BENTOML_HOME"] = str(work / "bentoml")
        bento = package(str(checkpoint), params, ROOT / "serving", index=index).bento_tag
        port = free_port()
        command = [sys.executable, "-m", "bentoml", "serve", bento, "--host", "127.0.0.1", "--port", str(port)]
        with bentoml_server(command, port, bentoml_env(), work) as url:
            served = asyncio.run(search_load(url, texts, clients, seconds))
        print(json.dumps({"served": served}), flush=True)
    for metric in ("p50_ms", "p99_ms"):
        brute_ms = 1000 * (brute_cuts[49] if metric == "p50_ms" else brute_cuts[98])
        row = case(f"{count} x 512 random, /search", metric, "ms", round(served[metric], 1), "brute force", None)
        row["peer_value"] = round(brute_ms, 1)
        row["ratio"] = round(served[metric] / brute_ms, 4)
        row["note"] = (
            f"{clients} closed-loop clients, {served['items_per_s']:.1f} searches/s, {served['failures'] or 'no'}"
            f" failures; HNSW ef={served_ef} (recall {recall_by_ef[served_ef]['recall']:.3f}); latency includes the"
            f" {SEARCH_MODEL} text encode; brute force is one query at a time"
        )
        cases.append(row)
    details = {"publish_seconds": round(publish_s, 1), "index_build_seconds_after_publish": round(build_s, 1)}
    return cases, {**details, "index_type": index.index_type, "build_params": index.build_params}


def wait_until_idle(pid: int, quiet_s: float = 10.0) -> float:
    """Seconds until the store's server stays idle for `quiet_s`: Milvus Lite builds a segment's index in the
    background after the insert, and a segment not yet indexed is searched exactly (slowly)."""
    server = psutil.Process(pid)
    started = quiet_since = time.perf_counter()
    while time.perf_counter() - quiet_since < quiet_s:
        if server.cpu_percent(interval=1.0) > IDLE_CPU_PERCENT:
            quiet_since = time.perf_counter()
    return time.perf_counter() - started - quiet_s


async def search_load(url: str, texts: list[str], clients: int, seconds: float) -> dict:
    """`closed_loop` of `/search` calls (k=10), each with the next query text."""
    turn = iter(range(10**9))
    async with httpx.AsyncClient(timeout=120) as client:

        async def send() -> str | None:
            text = texts[next(turn) % len(texts)]
            response = await client.post(f"{url}/search", json={"text": text, "k": K})
            return None if response.status_code == 200 else str(response.status_code)

        return await closed_loop(send, clients, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3, help="runs of clipflow index and of the peer, in turn")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--clip-retrieval-venv", type=Path, default=Path(__file__).parent / ".peers" / "clip-retrieval")
    parser.add_argument("--peer", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        data, checkpoint, batch_size = args.peer
        peer_encode(Path(data), Path(checkpoint), int(batch_size))
        return
    os.environ.update({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "BENTOML_DO_NOT_TRACK": "true"})
    with tempfile.TemporaryDirectory(prefix="bench-index-") as name:
        work = args.work or Path(name)
        work.mkdir(parents=True, exist_ok=True)
        clip_retrieval = clip_retrieval_venv(args.clip_retrieval_venv.resolve())
        embedding, embedding_details = embedding_cases(work, args.sizes, args.repeats, clip_retrieval)
        search, search_details = search_cases(work, args.vectors, args.clients, args.seconds)
    details = {**embedding_details, **search_details, "clip_retrieval": CLIP_RETRIEVAL}
    print(f"wrote {write_results('bench_index', COMMAND, embedding + search, **details)}")


if __name__ == "__main__":
    main()
