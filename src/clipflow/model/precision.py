"""The one decision of the precision a model runs at: fp32, or bfloat16 weights and inputs.

bf16 pays where the hardware multiplies it natively: a GPU, or a CPU with AMX or AVX512-BF16.
Elsewhere bf16 is emulated, so `auto` keeps fp32 there. The weights themselves are cast
(`ClipModel.at_precision`), not run under autocast, which casts every operator's inputs again on
each call. `clipflow package` checks the cast model against fp32 before serving it
(`clipflow.serve.precision_check`). Training, where weights stay fp32 for the optimizer, runs
under autocast at the precision the same rule picks for `train.precision` (`clipflow.train.loop`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from pathlib import Path

from clipflow.errors import ClipflowError
from clipflow.params import PRECISIONS

CPUINFO = Path("/proc/cpuinfo")
# The CPU flags (as Linux names them) of native bf16 matrix arithmetic.
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})

logger = logging.getLogger(__name__)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags, read once from /proc/cpuinfo; empty where there is none (not Linux)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_supports_bf16(flags: Iterable[str] | None = None) -> bool:
    """Whether a CPU with `flags` (default: this machine's) multiplies bf16 natively."""
    return not BF16_CPU_FLAGS.isdisjoint(cpu_flags() if flags is None else flags)


def resolve_precision(requested: str, device: str = "cpu", cpu_bf16: bool | None = None) -> str:
    """The precision to run at, "fp32" or "bf16", for `serve.precision` or `train.precision`; logs the choice and why.

    Args:
        requested: "fp32" or "bf16" (kept as they are), or "auto": bf16 on a GPU or on a CPU
            that multiplies bf16 natively, fp32 elsewhere.
        device: the torch device the model runs on ("cpu", "cuda", "cuda:1").
        cpu_bf16: whether the CPU multiplies bf16 natively; default `cpu_supports_bf16()`.

    Raises:
        ClipflowError: `requested` is none of auto, fp32 and bf16.
    """
    if requested not in PRECISIONS:
        raise ClipflowError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested != "auto":
        chosen, why = requested, "as set"
    elif device.startswith("cuda"):
        chosen, why = "bf16", "a GPU"
    elif cpu_supports_bf16() if cpu_bf16 is None else cpu_bf16:
        chosen, why = "bf16", f"the CPU has {' or '.join(sorted(BF16_CPU_FLAGS))}"
    else:
        chosen, why = "fp32", f"the CPU has neither {' nor '.join(sorted(BF16_CPU_FLAGS))}"
    logger.info("precision %s (requested %s, on %s): %s", chosen, requested, device, why)
    return chosen
