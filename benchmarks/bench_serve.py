"""Throughput and latency of the served encoders over HTTP against the in-process model (the ceiling).

    python benchmarks/bench_serve.py [--seconds 20] [--clients 16] [--models ViT-B-32 CLIP-Tiny]

For each model (random init: speed does not depend on the weights), one run packages it twice
into a temporary BentoML store, with adaptive batching on (params.yaml's `serve:`) and off,
serves each with `bentoml serve` on 127.0.0.1, and sends one-item `encode_text` and
`encode_image` requests (an image of the model's input size) from `--clients` concurrent
clients for `--seconds` per case. The peer is the same work in this process without HTTP
(tokenise and forward for texts; eval preprocess and forward of decoded images), timed at each
batch size of BATCH_SIZES: its best items/s is the ceiling, and `ratio` is the served
throughput's fraction of it.

The first model names the cases `encode_image` and `encode_text`; later ones add `@MODEL`.
ViT-B-32 is the size of model a product serves; CLIP-Tiny (what `make run` trains) is so small
(a third of a millisecond per item) that one HTTP request costs more than its forward pass.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from common import case, write_results
from PIL import Image

from clipflow.serving_model import Encoder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BATCH_SIZES = (1, 4, 8, 16, 32, 64, 128)
TEXT = "two small purple stars at the top left"
COMMAND = "python benchmarks/bench_serve.py"
UNBATCHED = "the same service with batching off"


def sample_png(side: int) -> bytes:
    """A drawing of the model's input size."""
    image = Image.new("RGB", (side, side), "white")
    image.paste((120, 40, 200), (side // 4, side // 4, 3 * side // 4, 5 * side // 8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def ceiling(clip, png: bytes, seconds: float) -> dict[str, dict]:
    """Items/s of the in-process encoders at each batch size, both with torch's own intra-op
    threads and in the service's per-core lanes; returns the best per encoder."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    threads = torch.get_num_threads()
    # per_core() sets torch to one thread for the process, so it is built after the other is timed.
    modes = {f"{threads} intra-op threads": lambda: Encoder(clip), "per-core lanes": lambda: Encoder.per_core(clip)}
    budget = seconds / len(BATCH_SIZES) / len(modes)
    rates: dict[str, dict[str, dict[int, float]]] = {"encode_text": {}, "encode_image": {}}
    for mode, make in modes.items():
        encoder = make()
        rates["encode_text"][mode] = batch_rates(lambda n, e=encoder: e.texts([TEXT] * n), budget)
        # One decoded image n times: each copy is preprocessed, as n uploads would be.
        rates["encode_image"][mode] = batch_rates(lambda n, e=encoder: e.images([image] * n), budget)
    torch.set_num_threads(threads)
    best = {}
    for name, by_mode in rates.items():
        mode, size = max(((m, n) for m in by_mode for n in by_mode[m]), key=lambda key: by_mode[key[0]][key[1]])
        best[name] = {"items_per_s": by_mode[mode][size], "batch_size": size, "mode": mode, "by_batch_size": by_mode}
        print(json.dumps({"ceiling": name, **best[name]}), flush=True)
    return best


def batch_rates(run, seconds: float) -> dict[int, float]:
    """Items/s of `run(n)` at each batch size n of BATCH_SIZES, timing each for about `seconds`."""
    rates = {}
    for n in BATCH_SIZES:
        run(n)  # warm-up
        # The median call of at least three: one slow call on a shared machine moves it little.
        durations, budget_end = [], time.perf_counter() + seconds
        while len(durations) < 3 or time.perf_counter() < budget_end:
            start = time.perf_counter()
            run(n)
            durations.append(time.perf_counter() - start)
        rates[n] = n / statistics.median(durations)
    return rates


async def load(url: str, endpoint: str, png: bytes, clients: int, seconds: float) -> dict:
    """`clients` concurrent one-item requests for `seconds`: items/s, p50 and p99 latency, statuses."""
    latencies: list[float] = []
    failures: dict[str, int] = {}
    kwargs = (
        {"json": {"texts": [TEXT]}}
        if endpoint == "encode_text"
        else {"files": [("images", ("a.png", png, "image/png"))]}
    )

    async def client(http: httpx.AsyncClient, deadline: float) -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            response = await http.post(f"/{endpoint}", **kwargs)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                failures[str(response.status_code)] = failures.get(str(response.status_code), 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(http, time.perf_counter() + 2) for _ in range(clients)))  # warm-up
        latencies.clear()
        start = time.perf_counter()
        await asyncio.gather(*(client(http, start + seconds) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "items_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * cuts[49],
        "p99_ms": 1000 * cuts[98],
        "requests": len(latencies),
        "failures": failures,
    }


def package_bento(tmp: Path, model: str, batching: bool) -> str:
    from clipflow import model as clip_model
    from clipflow.package import package
    from clipflow.params import load_params

    checkpoint = tmp / model
    if not checkpoint.exists():
        clip_model.save_checkpoint(checkpoint, clip_model.create(model).model, model, extra={})
    overrides = [f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"serve.batching={str(batching).lower()}"]
    params = load_params(ROOT / "params.yaml", overrides=overrides)
    return package(str(checkpoint), params)["bento_tag"]


def serve(bento_tag: str, port: int, log: Path) -> subprocess.Popen:
    from clipflow.package import bentoml_env

    command = [sys.executable, "-m", "bentoml", "serve", bento_tag, "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=bentoml_env(), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"bentoml serve did not start:\n{log.read_text()[-3000:]}")


def served(bento_tag: str, tmp: Path, png: bytes, clients: int, seconds: float) -> dict[str, dict]:
    from tests.conftest import free_port

    port = free_port()
    process = serve(bento_tag, port, tmp / f"serve-{port}.log")
    try:
        results = {}
        for endpoint in ("encode_image", "encode_text"):
            results[endpoint] = asyncio.run(load(f"http://127.0.0.1:{port}", endpoint, png, clients, seconds))
            print(json.dumps({"bento": bento_tag, endpoint: results[endpoint]}), flush=True)
        return results
    finally:
        process.terminate()
        process.wait(timeout=30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20, help="load per endpoint and server")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "CLIP-Tiny"], help="open_clip configs")
    args = parser.parse_args(argv)

    from clipflow import model as clip_model

    measured = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as name:
        tmp = Path(name)
        os.environ.update({"BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"})
        os.environ.update({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})
        for model in args.models:
            batched_tag = package_bento(tmp, model, batching=True)
            unbatched_tag = package_bento(tmp, model, batching=False)
            clip = clip_model.load(tmp / model / clip_model.CHECKPOINT_FILE)
            png = sample_png(clip.model.visual.image_size[0])
            best = ceiling(clip, png, args.seconds)
            del clip
            batched = served(batched_tag, tmp, png, args.clients, args.seconds)
            unbatched = served(unbatched_tag, tmp, png, args.clients, args.seconds)
            measured[model] = best, batched, unbatched

    cases = []
    for model, (best, batched, unbatched) in measured.items():
        for endpoint in ("encode_image", "encode_text"):
            name = endpoint if model == args.models[0] else f"{endpoint}@{model}"
            size, mode = best[endpoint]["batch_size"], best[endpoint]["mode"]
            ceiling_name = f"in-process {model} at its best batch size ({size}, {mode})"
            ceiling_rate = round(best[endpoint]["items_per_s"], 1)
            on, off = batched[endpoint], unbatched[endpoint]
            rows = [
                case(name, "items_per_s", "items/s", round(on["items_per_s"], 1), ceiling_name, ceiling_rate),
                case(
                    name, "items_per_s_unbatched", "items/s", round(off["items_per_s"], 1), ceiling_name, ceiling_rate
                ),
                case(name, "p50_ms", "ms", round(on["p50_ms"], 1), UNBATCHED, round(off["p50_ms"], 1)),
                case(name, "p99_ms", "ms", round(on["p99_ms"], 1), UNBATCHED, round(off["p99_ms"], 1)),
            ]
            rows[0]["failed_requests"] = {**on["failures"]}
            cases.extend(rows)
    load_average = os.getloadavg()[0]
    path = write_results(
        "bench_serve",
        COMMAND,
        cases,
        clients=args.clients,
        seconds_per_case=args.seconds,
        items_per_request=1,
        models=args.models,
        note=(
            f"1-minute load average {load_average:.1f} on {os.cpu_count()} cores at the end of the run"
            " (above 2 means other work shared the machine). The clients run on the same cores as the server."
        ),
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
