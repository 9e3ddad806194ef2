"""A "pretrained" CLIP made offline, in every form a user names one: checkpoint, open_clip folder, hf-hub: reference.

No test can download a model, so `make_pretrained` makes one: a CLIP-Tiny checkpoint (given, or a seeded
random one), exported in open_clip's layout (`clipflow.model.export.write_open_clip`), and the same folder
placed in a Hugging Face hub cache under `hf_home`, laid out as huggingface_hub lays out a download
(`hub/models--ORG--NAME/snapshots/<revision>/...` and `refs/main`). With `HF_HOME=hf_home` and
`HF_HUB_OFFLINE=1`, `hf-hub:clipflow-test/clip-tiny` then resolves from that cache, as a real model does
on a machine whose cache was filled. huggingface_hub reads both variables when it is imported: set them
in a subprocess's environment (`offline_env`), not in the test's own process.

    pretrained = make_pretrained(tmp_path)                 # or make_pretrained(tmp_path, checkpoint=trained)
    env = pretrained.offline_env()                         # HF_HOME + HF_HUB_OFFLINE=1
    subprocess.run(["clipflow", "train", "--set", f"train.pretrained={pretrained.reference}", ...], env=env)
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from clipflow import model as clip_model
from clipflow.model.export import write_open_clip

REPO_ID = "clipflow-test/clip-tiny"
# A fixed commit hash, as the hub names revisions: the cache's refs/main points at it.
REVISION = "0123456789abcdef0123456789abcdef01234567"
MODEL = "CLIP-Tiny"


@dataclass(frozen=True)
class PretrainedModel:
    """One pretrained model in every form a model reference names.

    Attributes:
        reference: `hf-hub:clipflow-test/clip-tiny`, which resolves from `hf_home` offline.
        hf_home: a Hugging Face home (`HF_HOME`) whose hub cache holds the model.
        local_dir: the model in open_clip's layout (`local-dir:` + this path loads it).
        checkpoint: the clipflow checkpoint it was exported from.
    """

    reference: str
    hf_home: Path
    local_dir: Path
    checkpoint: Path

    def offline_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for a subprocess that reads the model from `hf_home` with the hub out of reach."""
        env = dict(os.environ if base is None else base)
        env.pop("HF_HUB_CACHE", None)  # else it would win over HF_HOME
        return {**env, "HF_HOME": str(self.hf_home), "HF_HUB_OFFLINE": "1"}


def make_pretrained(tmp_path: Path, checkpoint: Path | None = None, seed: int = 7) -> PretrainedModel:
    """Make a pretrained model under `tmp_path`.

    Args:
        tmp_path: an empty folder of the test's own.
        checkpoint: a clipflow checkpoint to use (for example one trained on a built-in variant); None
            for a CLIP-Tiny with seeded random weights, enough where only loading is tested.
        seed: the seed of those random weights.
    """
    import torch

    if checkpoint is None:
        torch.manual_seed(seed)
        checkpoint = clip_model.save_checkpoint(tmp_path / "source", clip_model.create(MODEL).model, MODEL, {})
    local_dir = tmp_path / "open_clip"
    local_dir.mkdir()
    write_open_clip(clip_model.load(checkpoint), local_dir)
    hf_home = tmp_path / "hf_home"
    repo = hf_home / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    shutil.copytree(local_dir, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return PretrainedModel(f"hf-hub:{REPO_ID}", hf_home, local_dir, clip_model.resolve_checkpoint(checkpoint))
