"""Resumable training checkpoints, every N steps, in a local folder or under an `s3://` prefix.

A checkpoint is one file, `step-000200.pt`: the open_clip `state_dict` (so open_clip and
`clipflow.model.load` read it as a plain checkpoint), the optimizer and schedule, each rank's
RNG states and the data position. Everything in it is tensors and plain types, so it loads
with `torch.load(..., weights_only=True)`.

Writes are atomic: a local file is written under a temporary name and renamed; an S3 object
appears whole when its PUT completes. Only then is the small `latest` pointer replaced, so
whoever follows the pointer always finds a complete checkpoint.
"""

from __future__ import annotations

import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipflow.errors import ClipflowError
from clipflow.model import read_checkpoint
from clipflow.storage import Store, is_s3, read_object

# torch and numpy are imported where a checkpoint is written or read: the training launcher
# only follows `latest` pointers, and importing torch would add seconds to every run's start.

POINTER = "latest"
# What `clipflow.train.loop` saves and restores besides the weights.
RESUMABLE = frozenset({"state_dict", "optimizer", "scheduler", "step", "rng", "clipflow"})
_NAME = re.compile(r"^step-(\d{6,})\.pt$")


@dataclass(frozen=True)
class Pointer:
    """What `latest` says: the newest complete checkpoint, its step and the MLflow run that wrote it."""

    location: str
    step: int
    run_id: str | None


class CheckpointStore:
    """The resumable checkpoints of one training job: a local folder or `s3://bucket/prefix`."""

    def __init__(self, location: str | Path):
        self.location = str(location).rstrip("/")
        self._files = Store(self.location)

    def save(self, step: int, state: dict[str, Any], run_id: str | None) -> str:
        """Write `state` as the checkpoint of `step`, then point `latest` at it; returns its location."""
        import torch

        name = f"step-{step:06d}.pt"
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self._files.put_bytes(buffer.getvalue(), name)
        pointer = {"checkpoint": name, "step": step, "run_id": run_id}
        self._files.put_bytes(json.dumps(pointer).encode(), POINTER)
        return self._files.uri(name)

    def latest(self) -> Pointer | None:
        """The newest complete checkpoint, or None when the store holds none."""
        # The pointer is only ever replaced whole, never removed, so it cannot vanish in between.
        if not self._files.exists(POINTER):
            return None
        pointer = json.loads(self._files.get_bytes(POINTER))
        return Pointer(self._files.uri(pointer["checkpoint"]), pointer["step"], pointer.get("run_id"))

    def prune(self, keep: int) -> None:
        """Delete all but the `keep` newest checkpoints."""
        names = sorted(name for name in self._files.list() if _NAME.match(name))
        for name in names[:-keep]:
            self._files.remove(name)


def load_state(location: str | Path) -> dict[str, Any]:
    """Read a resumable checkpoint, a file or an `s3://` object, with `weights_only=True` (no code is unpickled).

    Raises:
        ClipflowError: not found, not a checkpoint (see `clipflow.model.read_checkpoint`), or one
            without what a resumed run needs (a final `checkpoint.pt` has no optimizer state).
    """
    location = str(location)
    if is_s3(location):
        state = read_checkpoint(location, read_object(location, "checkpoint"))
    elif not Path(location).is_file():
        raise ClipflowError(f"checkpoint not found: {location}")
    else:
        state = read_checkpoint(location)
    missing = sorted(RESUMABLE - set(state))
    if missing:
        raise ClipflowError(f"checkpoint {location} cannot be resumed from: it has no {', '.join(missing)}")
    return state


def rng_state() -> dict[str, Any]:
    """This process's torch (CPU and its GPU), numpy and Python RNG states, as tensors and plain types."""
    import numpy as np
    import torch

    numpy_state = np.random.get_state()
    python_version, python_words, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "gauss": float(numpy_state[4]),
        },
        "python": {"version": python_version, "words": torch.tensor(python_words), "gauss": python_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    numpy_state = state["numpy"]
    keys = numpy_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["words"].tolist()), python_state["gauss"]))
