"""clipflow's served embeddings against Infinity's, through the OpenAI client, on one machine.

    python benchmarks/bench_peer.py [--seconds 20] [--clients 16] [--infinity-venv benchmarks/.peers/infinity]

The peer is Infinity (`infinity-emb`, the open embedding server with CLIP support and dynamic
batching), installed on first use into its own virtualenv (about 6 GB, with this machine's
torch as a constraint), never into the project's. Both serve ViT-B-32's architecture with random
weights (speed does not depend on them): clipflow a Bento packaged from an open_clip checkpoint,
Infinity a Hugging Face `CLIPModel` folder of the same shapes, whose tokenizer files are written
from the CLIP BPE vocabulary open_clip ships (benchmarks/peers/infinity_clip_folder.py). The
check that both tokenise a phrase to the same ids is part of the run.

Each server is loaded by `--clients` closed-loop clients of `openai.AsyncOpenAI`, one item per
`embeddings.create` call, texts and then images (a PNG of 224 px as a `data:` URL, marked with
Infinity's `"modality": "image"`, which clipflow's `/v1/embeddings` reads too). clipflow runs at
fp32 and at the precision `serve.precision: auto` resolves to here (checked by `clipflow package`);
Infinity at float32 and, where the CPU has bf16 support, bfloat16: its best is its peer figure.
The in-process ceiling (bench_serve's sweep and paired rounds) is timed at clipflow's best
precision, in rounds between those of clipflow's best server, and the served rate's fraction of it
is a case of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_serve import ENDPOINTS, TEXT, Ceiling, modes, package_bento, sample_png, serve, sweep
from bench_serve import closed_loop as closed_loop_of
from common import case, write_results
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COMMAND = "python benchmarks/bench_peer.py"
MODEL = "ViT-B-32"
INFINITY = "infinity-emb[server,torch,vision]==0.0.78"
# Its image path fetches with aiohttp, which its extras do not name.
INFINITY_EXTRA = "aiohttp==3.14.5"
SERVED_NAME = "clip"
TOKENIZER_CHECK = "a red circle"


def infinity_venv(venv: Path) -> Path:
    """The Infinity virtualenv's python, made first if missing."""
    python = venv / "bin" / "python"
    if (venv / ".installed").exists():
        return python
    import torch

    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    # The torch this machine serves from disk: anything newer is a multi-gigabyte download.
    constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    pip = [str(python), "-m", "pip", "install", "--quiet", "-c", str(constraints)]
    subprocess.run([*pip, INFINITY, INFINITY_EXTRA], check=True)
    (venv / ".installed").touch()
    return python


def infinity_folder(python: Path, folder: Path) -> None:
    """A Hugging Face CLIP folder of ViT-B-32's shapes whose tokenizer gives open_clip's ids."""
    from clipflow import model as clip_model

    tokenizer = clip_model.tokenizer(MODEL)  # open_clip's SimpleTokenizer
    hf_names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    folder.mkdir(parents=True)
    vocab = {hf_names.get(token, token): index for token, index in tokenizer.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    script = Path(__file__).parent / "peers" / "infinity_clip_folder.py"
    made = subprocess.run([str(python), str(script), str(folder), TOKENIZER_CHECK], check=True, capture_output=True)
    theirs = json.loads(made.stdout.decode().strip().splitlines()[-1])["check_ids"]
    ours = [int(i) for i in tokenizer([TOKENIZER_CHECK])[0] if i]
    if theirs != ours:
        raise SystemExit(f"Infinity's tokenizer gives {theirs} for {TOKENIZER_CHECK!r}, open_clip {ours}")


def start_infinity(python: Path, folder: Path, dtype: str, port: int, log: Path) -> subprocess.Popen:
    command = [
        str(python.parent / "infinity_emb"), "v2", "--model-id", str(folder),
        "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--url-prefix", "/v1",
        "--engine", "torch", "--device", "cpu", "--dtype", dtype, "--no-bettertransformer",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            # Its health route stays at the root: --url-prefix moves only the API.
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise SystemExit(f"infinity did not start:\n{log.read_text()[-3000:]}")


def image_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


async def openai_load(base_url: str, model: str, endpoint: str, png: bytes, clients: int, seconds: float, ceiling):
    """`closed_loop` of one-item `embeddings.create` calls through the OpenAI client."""
    import openai

    if endpoint == "encode_text":
        kwargs = {"input": [TEXT]}
    else:
        kwargs = {"input": [image_url(png)], "extra_body": {"modality": "image"}}
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)

    async def send() -> str | None:
        try:
            await client.embeddings.create(model=model, **kwargs)
        except openai.APIStatusError as exc:
            return str(exc.status_code)
        except openai.APIError as exc:
            return type(exc).__name__
        return None

    async with client:
        return await closed_loop_of(send, clients, seconds, ceiling)


def measure(base_url: str, model: str, png: bytes, clients: int, seconds: float, ceilings=None) -> dict[str, dict]:
    results = {}
    for endpoint in ENDPOINTS:
        ceiling = ceilings[endpoint] if ceilings else None
        results[endpoint] = asyncio.run(openai_load(base_url, model, endpoint, png, clients, seconds, ceiling))
        print(json.dumps({"server": base_url, endpoint: results[endpoint]}), flush=True)
    return results


def row(name: str, metric: str, unit: str, ours: dict, peer: str, peer_value: float) -> dict:
    """A results row of the served run `ours` (an `items_per_s_of_ceiling` row reads its items/s)."""
    return case(name, metric, unit, round(ours[metric.removesuffix("_of_ceiling")], 1), peer, round(peer_value, 1))


def bento_name() -> str:
    from clipflow.params import load_params

    return load_params(ROOT / "params.yaml").serve.bento_name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20, help="load per modality and server")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--infinity-venv", type=Path, default=Path(__file__).parent / ".peers" / "infinity")
    args = parser.parse_args(argv)

    import torch

    from clipflow import model as clip_model
    from clipflow.model.precision import cpu_supports_bf16, resolve_precision
    from tests.support.servers import free_port

    best = resolve_precision("auto")
    precisions = ["fp32"] if best == "fp32" else ["fp32", best]
    infinity_dtypes = ["float32", "bfloat16"] if cpu_supports_bf16() else ["float32"]
    python = infinity_venv(args.infinity_venv.resolve())
    served: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as name:
        tmp = Path(name)
        os.environ.update({"BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"})
        os.environ.update({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})
        infinity_folder(python, tmp / "hf-clip")
        tags = {precision: package_bento(tmp, MODEL, batching=True, precision=precision) for precision in precisions}
        clip = clip_model.load(tmp / MODEL / clip_model.CHECKPOINT_FILE).at_precision(best)
        png = sample_png(clip.model.visual.image_size[0])
        image = Image.open(io.BytesIO(png)).convert("RGB")
        all_modes = modes(clip, torch.get_num_threads())
        swept = sweep(all_modes, image, args.seconds)
        ceilings = {e: Ceiling(all_modes, swept[e]["best_batch_size"], e, image) for e in ENDPOINTS}
        for precision, tag in tags.items():
            port = free_port()
            process = serve(tag, port, tmp / f"clipflow-{precision}.log")
            try:
                paired = ceilings if precision == best else None
                served[f"clipflow {precision}"] = measure(
                    f"http://127.0.0.1:{port}/v1", bento_name(), png, args.clients, args.seconds, paired
                )
            finally:
                process.terminate()
                process.wait(timeout=30)
        del clip, all_modes
        for dtype in infinity_dtypes:
            port = free_port()
            process = start_infinity(python, tmp / "hf-clip", dtype, port, tmp / f"infinity-{dtype}.log")
            try:
                served[f"infinity {dtype}"] = measure(
                    f"http://127.0.0.1:{port}/v1", SERVED_NAME, png, args.clients, args.seconds
                )
            finally:
                process.terminate()
                process.wait(timeout=30)

    cases = []
    for endpoint in ENDPOINTS:
        modality = "images" if endpoint == "encode_image" else "texts"
        ours = served[f"clipflow {best}"][endpoint]
        ceiling = ceilings[endpoint].best()
        peer_name, peer = max(
            ((name, runs[endpoint]) for name, runs in served.items() if name.startswith("infinity")),
            key=lambda item: item[1]["items_per_s"],
        )
        fp32 = served["clipflow fp32"][endpoint]
        infinity_fp32 = served["infinity float32"][endpoint]
        ceiling_name = f"in-process {MODEL} at {best}, batch {ceiling['batch_size']} ({ceiling['mode']})"

        rows = [
            *(
                row(modality, m, u, ours, peer_name, peer[m])
                for m, u in (("items_per_s", "items/s"), ("p50_ms", "ms"), ("p99_ms", "ms"))
            ),
            row(modality, "items_per_s_of_ceiling", "items/s", ours, ceiling_name, ceiling["items_per_s"]),
            *(
                row(f"{modality}@fp32", m, u, fp32, "infinity float32", infinity_fp32[m])
                for m, u in (("items_per_s", "items/s"), ("p99_ms", "ms"))
            ),
        ]
        rows[0]["failed_requests"] = {name: runs[endpoint]["failures"] for name, runs in served.items()}
        rows[0]["all_servers"] = {
            name: {k: round(runs[endpoint][k], 1) for k in ("items_per_s", "p50_ms", "p99_ms")}
            for name, runs in served.items()
        }
        pairs = zip(ours["by_round"], ceiling["by_round"], strict=True)
        rows[3]["ratio_by_round"] = [round(served_rate / ceiling_rate, 3) for served_rate, ceiling_rate in pairs]
        cases.extend(rows)
    path = write_results(
        "bench_peer",
        COMMAND,
        cases,
        model=MODEL,
        clients=args.clients,
        seconds_per_case=args.seconds,
        items_per_request=1,
        client="openai.AsyncOpenAI, embeddings.create",
        clipflow_precision=best,
        peer=INFINITY,
        note=(
            f"1-minute load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end of the run."
            " The clients run on the same cores as the servers."
        ),
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
