#!/usr/bin/env bash
# GPU check of clipflow's training loop: ViT-B-32, bf16 autocast, the tiled loss, one GPU.
# Runs in a few minutes on one H100-class GPU and writes JSON (default
# benchmarks/results/gpu_check.json; set GPU_CHECK_OUT to change it) with:
#   step:       the training step alone, at the batch and at 4x it (clipflow.train.step.backward + AdamW on batches
#               already on the GPU): samples/s, model TFLOP/s counted by torch's FlopCounterMode,
#               and that as a fraction of the GPU's dense bf16 peak;
#   end_to_end: `clipflow train` (torchrun, NCCL, MLflow, data-loader workers from `auto`) on JPEG shards of
#               512 px photos cropped to 224 px, with `train.decode` cpu and gpu: samples/s from the run's
#               train/samples_per_second metric, and its fraction of the step alone at the same batch.
# Usage: bash benchmarks/gpu_check.sh   (from the repository root, in the project's environment)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
OUT_JSON="${GPU_CHECK_OUT:-benchmarks/results/gpu_check.json}"
WORK="$(mktemp -d)"
BATCH="${GPU_CHECK_BATCH:-256}"

python3 - "$WORK" "$OUT_JSON" "$BATCH" <<'EOF'
import json, subprocess, sys, time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import machine

from clipflow import model as clip_model
from clipflow.params import load_params
from clipflow.train.loss import build_loss
from clipflow.train.optim import param_groups
from clipflow.train.step import backward

work, out_json, batch = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
assert torch.cuda.is_available(), "no GPU visible"
device = torch.device("cuda")
name = torch.cuda.get_device_name()
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets.
PEAKS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
         "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
peak = next((value for key, value in PEAKS.items() if key in name), None)

# 1. The step alone, at the end-to-end batch and at a larger one that fills the GPU better.
def measure_step(batch_size):
    torch.manual_seed(0)
    module = clip_model.create("ViT-B-32").model.to(device).train()
    # fused=True as in the worker's optimizer.
    optimizer = torch.optim.AdamW(param_groups(module, 0.1), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=True)
    loss_fn = build_loss("tiled", 0, 1)
    size = module.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(batch_size, 3, size, size, device=device)
    tokens = torch.randint(1, module.vocab_size - 1, (batch_size, module.context_length), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)

    def step():
        optimizer.zero_grad(set_to_none=True)
        backward(module, loss_fn, images, tokens, 1, autocast)
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops_per_step = counter.get_total_flops()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    steps, started = 30, time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tflops = flops_per_step * steps / seconds / 1e12
    result = {
        "batch": batch_size, "steps": steps, "samples_per_s": round(batch_size * steps / seconds, 1),
        "tflops": round(tflops, 1), "peak_bf16_tflops": peak,
        "fraction_of_bf16_peak": round(tflops / peak, 4) if peak else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }
    print(json.dumps(result), flush=True)
    del module, optimizer, images, tokens
    torch.cuda.empty_cache()
    return result

step_results = [measure_step(size) for size in (batch, 4 * batch)]

# 2. clipflow train end to end (one torchrun process on this GPU) on JPEG shards of photo-sized images
#    (bench_data's: 640 x 512 renders stored at 512 px on the short side), cropped to 224 px: the CPU
#    decoding in data-loader workers (as many as `auto` gives), and nvJPEG decoding on the GPU.
import bench_data
import mlflow

repo = Path.cwd()
data = bench_data.prepare(work, 10240)
def train_end_to_end(decode):
    output = work / f"model-{decode}"
    overrides = ["train.model=ViT-B-32", "train.loss=tiled", "train.precision=bf16", f"train.batch_size={batch}",
                 "train.steps=40", "train.warmup_steps=5", "train.log_every=10", "train.checkpoint_every=0",
                 "train.nproc=1", "train.threads_per_proc=4", "train.data_workers=auto", f"train.decode={decode}",
                 f"tracking.uri=sqlite:///{work / 'mlflow.db'}"]
    sets = [arg for item in overrides for arg in ("--set", item)]
    started = time.perf_counter()
    trained = subprocess.run([sys.executable, "-m", "clipflow.cli", "train", "--data", str(data), "--output", str(output),
                              "--params", str(repo / "params.yaml")] + sets, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    run_id = json.loads((output / "train.json").read_text())["mlflow_run_id"]
    history = mlflow.MlflowClient().get_metric_history(run_id, "train/samples_per_second")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)][1:]  # the first window holds the warm-up
    workers = next((line for line in trained.stderr.splitlines() if "data-loader workers" in line), None)
    result = {"decode": decode, "steps": 40, "batch": batch, "loader": workers, "wall_s": round(wall, 1),
              "samples_per_s": round(sum(rates) / len(rates), 1) if rates else None}
    result["fraction_of_step_alone"] = (
        round(result["samples_per_s"] / step_results[0]["samples_per_s"], 3) if rates else None
    )
    print(json.dumps(result), flush=True)
    return result

end_to_end = [train_end_to_end(decode) for decode in ("cpu", "gpu")]

result = {"check": "gpu_check", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
          "model": "ViT-B-32", "precision": "bf16 autocast", "loss": "tiled",
          "step": step_results, "end_to_end": end_to_end}
out_json.parent.mkdir(parents=True, exist_ok=True)
out_json.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
EOF
