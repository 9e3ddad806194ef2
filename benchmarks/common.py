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


def machine() -> str:
    """Cores, CPU model, memory and GPU, as the results files describe the machine."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), platform.machine())
    try:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "no GPU"
    return f"{psutil.cpu_count()} cores, {model}, {psutil.virtual_memory().total / 2**30:.0f} GiB, {gpu}"


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
