"""Throughput and latency of the served encoders over HTTP against the in-process model (the ceiling).

    python benchmarks/bench_serve.py [--seconds 30] [--clients 16] [--models ViT-B-32 CLIP-Tiny] [--precision auto]

For each model (random init: speed does not depend on the weights), one run packages it twice
into a temporary BentoML store, with adaptive batching on (params.yaml's `serve:`) and off,
serves each with `bentoml serve` on 127.0.0.1, and sends one-item `encode_text` and
`encode_image` requests (an image of the model's input size) from `--clients` concurrent
clients for `--seconds` per case, each a keep-alive connection replaying one prepared request
(`KeepAlive`), so that the load generator takes little of the cores it shares with the server;
the server's own CPU per request is recorded beside its rate. The peer is the same work in this
process without HTTP (tokenise and forward for texts; eval preprocess and forward of decoded
images), both with torch's own intra-op threads and in the service's per-core lanes. Both run at
the precision `--precision` (default params.yaml's `serve.precision`) resolves to on this machine,
which the results record.

The ceiling is found in two steps. A sweep times every batch size of BATCH_SIZES in both modes
and keeps each mode's best. Those two are then timed again in ROUNDS rounds that alternate with
the batched server's load (the server idles while they run), and the ceiling is the better of
their rates over all rounds; `ratio` is the served throughput's fraction of it. On a shared
machine the speed of identical calls drifts by half over seconds, so a served figure and a
ceiling timed minutes apart differ by that much whatever the server does, and the best of
fourteen short sweep timings catches the fastest moment; timed in the same rounds, both see the
same machine. The results also hold each round's own fraction (`ratio_by_round`, with its
median), which shows how much one pairing moves, and the sweep's best beside the ceiling.

The first model names the cases `encode_image` and `encode_text`; later ones add `@MODEL`.
ViT-B-32 is the size of model a product serves; CLIP-Tiny (what `make run` trains) is so small
(a third of a millisecond per item) that one HTTP request costs more than its forward pass.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import torch
from common import case, write_results
from PIL import Image

from clipflow.params import PRECISIONS
from clipflow.serve.encoder import Encoder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BATCH_SIZES = (1, 4, 8, 16, 32, 64, 128)
ENDPOINTS = ("encode_image", "encode_text")
# Slices of the served load, each preceded by a slice of the ceiling: the machine's speed drifts
# over seconds, so more, shorter rounds pair the two more closely. A ViT-B-32 slice of 3 s still
# holds two to four batches.
ROUNDS = 10
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


@dataclass
class Mode:
    """One way to run the in-process encoders: torch's intra-op threads, or the per-core lanes."""

    name: str
    threads: int
    encoder: Encoder

    def encode(self, endpoint: str, image: Image.Image, n: int) -> None:
        """The work of `n` one-item requests to `endpoint` in one call: for images, n decoded
        copies, each preprocessed as n uploads would be."""
        torch.set_num_threads(self.threads)
        if endpoint == "encode_text":
            self.encoder.texts([TEXT] * n)
        else:
            self.encoder.images([image] * n)


def modes(clip, threads: int) -> list[Mode]:
    """Torch's own `threads` intra-op threads, and the service's per-core lanes."""
    plain = Encoder(clip)
    lanes = Encoder.per_core(clip)  # leaves torch at one thread: Mode.encode sets each mode's own
    return [Mode(f"{threads} intra-op threads", threads, plain), Mode("per-core lanes", 1, lanes)]


def sweep(all_modes: list[Mode], image: Image.Image, seconds: float) -> dict[str, dict]:
    """Items/s of each mode at each batch size, per endpoint, and each mode's best batch size."""
    budget = seconds / len(BATCH_SIZES) / len(all_modes)
    results = {}
    for endpoint in ENDPOINTS:
        by_mode = {
            mode.name: batch_rates(lambda n, m=mode, e=endpoint: m.encode(e, image, n), budget) for mode in all_modes
        }
        best = {name: max(rates, key=rates.get) for name, rates in by_mode.items()}
        results[endpoint] = {"by_batch_size": by_mode, "best_batch_size": best}
        print(json.dumps({"sweep": endpoint, **results[endpoint]}), flush=True)
    return results


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


class Ceiling:
    """Each mode at its best swept batch size, timed a slice at a time between the server's rounds."""

    def __init__(self, all_modes: list[Mode], best_batch_size: dict[str, int], endpoint: str, image: Image.Image):
        self.runs = [(mode, best_batch_size[mode.name]) for mode in all_modes]
        self.endpoint, self.image = endpoint, image
        # Per mode, (items, seconds) of each slice.
        self.slices: dict[str, list[tuple[int, float]]] = {mode.name: [] for mode in all_modes}

    def time_slice(self, seconds: float) -> None:
        """Run each mode's calls back to back for about `seconds` (at least one call)."""
        for mode, n in self.runs:
            items, start = 0, time.perf_counter()
            while True:
                mode.encode(self.endpoint, self.image, n)
                items += n
                if time.perf_counter() - start >= seconds:
                    break
            self.slices[mode.name].append((items, time.perf_counter() - start))

    def best(self) -> dict:
        """The mode with the best rate over all its slices, that rate, and its rate in each slice."""
        rates = {
            name: sum(items for items, _ in slices) / sum(seconds for _, seconds in slices)
            for name, slices in self.slices.items()
        }
        mode, n = max(self.runs, key=lambda run: rates[run[0].name])
        return {
            "items_per_s": rates[mode.name],
            "batch_size": n,
            "mode": mode.name,
            "by_mode": rates,
            "by_round": [items / seconds for items, seconds in self.slices[mode.name]],
        }


async def closed_loop(
    send: Callable[[], Awaitable[str | None]],
    clients: int,
    seconds: float,
    ceiling: Ceiling | None = None,
    server_cpu: Callable[[], float] | None = None,
) -> dict:
    """`clients` concurrent callers of `send` (one request; None when answered, else why not) for
    `seconds`: items/s (overall and in each round), p50 and p99 latency, failures by reason.

    With a `ceiling`, the load runs in ROUNDS rounds and the ceiling takes a slice before each,
    while no request is in flight. With `server_cpu` (the server's CPU seconds so far), the server's
    CPU per answered request over the rounds (the ceiling's slices, when it idles, included).
    """
    latencies: list[float] = []
    failures: dict[str, int] = {}

    async def client(deadline: float) -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            failure = await send()
            if failure is None:
                latencies.append(time.perf_counter() - start)
            else:
                failures[failure] = failures.get(failure, 0) + 1

    await asyncio.gather(*(client(time.perf_counter() + 2) for _ in range(clients)))  # warm-up
    latencies.clear()
    cpu_at_start = server_cpu() if server_cpu else 0.0
    rounds = ROUNDS if ceiling else 1
    by_round = []
    for _ in range(rounds):
        if ceiling:
            ceiling.time_slice(seconds / rounds)
        answered, start = len(latencies), time.perf_counter()
        await asyncio.gather(*(client(start + seconds / rounds) for _ in range(clients)))
        by_round.append((len(latencies) - answered, time.perf_counter() - start))
    cuts = statistics.quantiles(latencies, n=100)
    cpu = {"server_cpu_ms_per_request": 1000 * (server_cpu() - cpu_at_start) / len(latencies)} if server_cpu else {}
    return cpu | {
        "items_per_s": len(latencies) / sum(elapsed for _, elapsed in by_round),
        "by_round": [answered / elapsed for answered, elapsed in by_round],
        "p50_ms": 1000 * cuts[49],
        "p99_ms": 1000 * cuts[98],
        "requests": len(latencies),
        "failures": failures,
    }


class KeepAlive:
    """One HTTP/1.1 keep-alive connection that sends one prepared request over and over.

    A load generator on the server's own two cores takes CPU from it: httpx spends about 1 ms of
    CPU per request here, this about 0.1 ms (the request's bytes are built once, by httpx; an answer
    is read by its Content-Length and thrown away).
    """

    def __init__(self, request: httpx.Request):
        self.host, self.port = request.url.host, request.url.port
        head = [f"{request.method} {request.url.raw_path.decode()} HTTP/1.1"]
        head += [f"{name}: {value}" for name, value in request.headers.items()]
        self.request = ("\r\n".join(head) + "\r\n\r\n").encode() + request.read()
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def send(self) -> str | None:
        reused = self.streams is not None
        head = await self._exchange()
        if head is None and reused:
            # The server closed it while it idled through the ceiling's slices (its keep-alive timeout is
            # shorter): a fresh connection takes the request, as HTTP clients do.
            head = await self._exchange()
        if head is None:
            return "connection closed"
        reader = self.streams[0]
        status, *fields = head.decode("latin-1").split("\r\n")
        lengths = [int(f.split(":", 1)[1]) for f in fields if f.lower().startswith("content-length:")]
        if not lengths:  # every answer of the service has a length; one without would desynchronise the stream
            raise SystemExit(f"an answer without Content-Length: {head!r}")
        await reader.readexactly(lengths[0])
        code = status.split(" ", 2)[1]
        return None if code == "200" else code

    async def _exchange(self) -> bytes | None:
        """Send the request; the answer's head, or None when the server closed the connection instead."""
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        try:
            writer.write(self.request)
            return await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.close()
            return None

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


def server_cpu_s(process: psutil.Process) -> float:
    """CPU seconds the server's process tree has used so far."""
    total = 0.0
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = member.cpu_times()
            total += times.user + times.system
    return total


async def load(
    url: str,
    endpoint: str,
    png: bytes,
    clients: int,
    seconds: float,
    server: psutil.Process,
    ceiling: Ceiling | None = None,
) -> dict:
    """`closed_loop` of one-item requests to a native endpoint, with the CPU of the `server` process tree."""
    kwargs = (
        {"json": {"texts": [TEXT]}}
        if endpoint == "encode_text"
        else {"files": [("images", ("a.png", png, "image/png"))]}
    )
    request = httpx.Request("POST", f"{url}/{endpoint}", **kwargs)
    connections = [KeepAlive(request) for _ in range(clients)]
    free = list(connections)

    async def send() -> str | None:
        connection = free.pop()
        try:
            return await connection.send()
        finally:
            free.append(connection)

    try:
        return await closed_loop(send, clients, seconds, ceiling, server_cpu=lambda: server_cpu_s(server))
    finally:
        for connection in connections:
            connection.close()


def package_bento(tmp: Path, model: str, batching: bool, precision: str) -> str:
    from clipflow import model as clip_model
    from clipflow.params import load_params
    from clipflow.serve.package import package

    checkpoint = tmp / model
    if not checkpoint.exists():
        clip_model.save_checkpoint(checkpoint, clip_model.create(model).model, model, extra={})
    overrides = [f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"serve.batching={str(batching).lower()}"]
    overrides.append(f"serve.precision={precision}")
    params = load_params(ROOT / "params.yaml", overrides=overrides)
    return package(str(checkpoint), params, ROOT / "serving").bento_tag


def serve(bento_tag: str, port: int, log: Path) -> subprocess.Popen:
    from clipflow.serve.package import bentoml_env

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


def served(
    bento_tag: str, tmp: Path, png: bytes, clients: int, seconds: float, ceilings: dict[str, Ceiling] | None = None
) -> dict[str, dict]:
    """Load on each endpoint of the served Bento, its rounds paired with `ceilings` when given."""
    from tests.support.servers import free_port

    port = free_port()
    process = serve(bento_tag, port, tmp / f"serve-{port}.log")
    server = psutil.Process(process.pid)
    try:
        results = {}
        for endpoint in ENDPOINTS:
            ceiling = ceilings[endpoint] if ceilings else None
            url = f"http://127.0.0.1:{port}"
            results[endpoint] = asyncio.run(load(url, endpoint, png, clients, seconds, server, ceiling))
            print(json.dumps({"bento": bento_tag, endpoint: results[endpoint]}), flush=True)
            if ceiling:
                print(json.dumps({"ceiling": endpoint, **ceiling.best()}), flush=True)
        return results
    finally:
        process.terminate()
        process.wait(timeout=30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30, help="load per endpoint and server")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "CLIP-Tiny"], help="open_clip configs")
    parser.add_argument("--precision", choices=PRECISIONS, default=None, help="default: params.yaml's")
    args = parser.parse_args(argv)

    from clipflow import model as clip_model
    from clipflow.model.precision import resolve_precision
    from clipflow.params import load_params

    # Served and in process at the one precision this machine resolves, so the ceiling is the same work.
    precision = resolve_precision(args.precision or load_params(ROOT / "params.yaml").serve.precision)

    threads = torch.get_num_threads()
    measured = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as name:
        tmp = Path(name)
        os.environ.update({"BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"})
        os.environ.update({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})
        for model in args.models:
            batched_tag = package_bento(tmp, model, batching=True, precision=precision)
            unbatched_tag = package_bento(tmp, model, batching=False, precision=precision)
            clip = clip_model.load(tmp / model / clip_model.CHECKPOINT_FILE).at_precision(precision)
            png = sample_png(clip.model.visual.image_size[0])
            image = Image.open(io.BytesIO(png)).convert("RGB")
            all_modes = modes(clip, threads)
            swept = sweep(all_modes, image, args.seconds)
            ceilings = {e: Ceiling(all_modes, swept[e]["best_batch_size"], e, image) for e in ENDPOINTS}
            batched = served(batched_tag, tmp, png, args.clients, args.seconds, ceilings)
            unbatched = served(unbatched_tag, tmp, png, args.clients, args.seconds)
            measured[model] = swept, {e: c.best() for e, c in ceilings.items()}, batched, unbatched
            del clip, all_modes, ceilings

    cases = []
    for model, (swept, best, batched, unbatched) in measured.items():
        for endpoint in ENDPOINTS:
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
            by_mode = swept[endpoint]["by_batch_size"]
            rows[0]["failed_requests"] = {**on["failures"]}
            # The server's CPU per request, its share of the model included: with the model's own cost
            # (the ceiling's), what HTTP, parsing and batching leave of the cores.
            rows[0]["server_cpu_ms_per_request"] = round(on["server_cpu_ms_per_request"], 3)
            rows[1]["server_cpu_ms_per_request"] = round(off["server_cpu_ms_per_request"], 3)
            rows[0]["ceiling_by_mode"] = {name: round(rate, 1) for name, rate in best[endpoint]["by_mode"].items()}
            rows[0]["sweep_items_per_s"] = {
                m: {n: round(r, 1) for n, r in rates.items()} for m, rates in by_mode.items()
            }
            sweep_best = max(rate for rates in by_mode.values() for rate in rates.values())
            rows[0]["sweep_best_items_per_s"] = round(sweep_best, 1)
            rows[0]["ratio_to_sweep_best"] = round(on["items_per_s"] / sweep_best, 4)
            # Each round's served rate over the ceiling's in the slice just before it: how far one
            # round's pairing moves the fraction on this machine.
            pairs = zip(on["by_round"], best[endpoint]["by_round"], strict=True)
            by_round = [served / ceiling for served, ceiling in pairs]
            rows[0]["ratio_by_round"] = [round(ratio, 3) for ratio in by_round]
            rows[0]["ratio_by_round_median"] = round(statistics.median(by_round), 4)
            cases.extend(rows)
    load_average = os.getloadavg()[0]
    path = write_results(
        "bench_serve",
        COMMAND,
        cases,
        clients=args.clients,
        seconds_per_case=args.seconds,
        rounds=ROUNDS,
        items_per_request=1,
        models=args.models,
        precision=precision,
        note=(
            f"1-minute load average {load_average:.1f} on {os.cpu_count()} cores at the end of the run"
            " (above 2 means other work shared the machine). The clients run on the same cores as the server."
            " The ceiling is timed in the rounds of the batched load; the unbatched load ran after them."
        ),
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
