"""What every benchmark shares: the machine line, peak memory of one case, the results file.

Benchmarks run as scripts (`python benchmarks/bench_x.py`), so this module is imported by name
from the scripts' own folder.
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import psutil

RESULTS = Path(__file__).parent / "results"


# The instruction-set extensions that decide which kernels torch and numpy pick on a CPU.
SPEED_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile")


def machine() -> dict[str, Any]:
    """Cores, CPU model and its speed-relevant flags, memory, GPU and torch, as results files record them."""
    from clipflow.model.precision import cpu_flags

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    try:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        torch_version = torch.__version__
    except ImportError:
        gpu, torch_version = "no GPU", None
    return {
        "cores": psutil.cpu_count(),
        "cpu": model or platform.machine(),
        "cpu_flags": [flag for flag in SPEED_FLAGS if flag in cpu_flags()],
        "memory_gib": round(psutil.virtual_memory().total / 2**30),
        "gpu": gpu,
        "torch": torch_version,
        "python": platform.python_version(),
    }


def resident_bytes() -> int:
    return psutil.Process().memory_info().rss


def peak_bytes() -> int:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(script: str, *args: str) -> dict[str, Any] | None:
    """Run `script --child ARGS` in a fresh process, so that its peak memory is its own.

    Returns the JSON its last stdout line holds, or None when it failed (out of memory).
    """
    result = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"  {' '.join(args)} failed (exit {result.returncode}): {result.stderr[-800:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def case(name: str, metric: str, unit: str, ours: float | None, peer: str, peer_value: float | None) -> dict[str, Any]:
    """One row of results: `ratio` is clipflow over the peer, None when either is missing."""
    return {
        "case": name,
        "metric": metric,
        "unit": unit,
        "clipflow": ours,
        "peer": peer,
        "peer_value": peer_value,
        "ratio": round(ours / peer_value, 4) if ours is not None and peer_value else None,
    }


def write_results(benchmark: str, command: str, cases: list[dict[str, Any]], **details: Any) -> Path:
    """`benchmarks/results/<benchmark>.json` in the design's format; `details` add context."""
    report = {
        "benchmark": benchmark,
        "date": date.today().isoformat(),
        "machine": machine(),
        "command": command,
        **details,
        "cases": cases,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{benchmark}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
