"""Model references: the one way a model is named everywhere (train, evaluate, package, index, curation).

A reference is parsed and checked here once, at params load time, from its text alone: no file
is opened and nothing is downloaded (`clipflow.model.hub` and `clipflow.registry.models` load
it). The kinds:

- `tag`: an open_clip config and a tag of open_clip's pretrained registry, `ViT-B-32:laion2b_s34b_b79k`
  (in params: `train.model: ViT-B-32` with `train.pretrained: laion2b_s34b_b79k`);
- `hf-hub`: `hf-hub:org/repo`, a Hugging Face Hub repository in open_clip's layout;
- `local-dir`: `local-dir:PATH`, a folder in open_clip's layout (`open_clip_config.json` + weights);
- `checkpoint`: a clipflow/open_clip checkpoint, a path (file or folder holding `checkpoint.pt`) or `s3://bucket/key`;
- `registry`: an MLflow model, `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/RUN/PATH`;
- `config`: a bare open_clip config name, random weights (training only).

This module is on the ground floor (params load imports it): it reads config files, and imports
open_clip only to check a tag against open_clip's pretrained registry.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipflow.errors import ClipflowError

KINDS = ("tag", "hf-hub", "local-dir", "checkpoint", "registry", "config")
# The kinds whose weights come from the Hugging Face Hub, which a model cache can mirror.
HUB_KINDS = ("tag", "hf-hub")
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
REGISTRY_PREFIXES = ("models:/", "runs:/")
# The Hub's rule for repository ids: an owner and a name of letters, digits, '-', '_' and '.'.
HF_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
REGISTERED_MODEL = re.compile(r"models:/[^/@\s]+(?:@[^/@\s]+|/\d+)")
LOGGED_MODEL = re.compile(r"models:/m-[0-9a-f]+")
RUN_ARTIFACT = re.compile(r"runs:/[0-9a-zA-Z]+/\S+")
# Files a checkpoint path is recognised by when it has no folder part.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# The configs clipflow ships (CLIP-Tiny), which `clipflow.model` registers with open_clip.
CONFIG_DIR = Path(__file__).parent / "model" / "configs"
EXAMPLES = (
    "ViT-B-32:laion2b_s34b_b79k, hf-hub:org/repo, local-dir:PATH, a checkpoint path, s3://... or models:/NAME@ALIAS"
)


@dataclass(frozen=True)
class ModelReference:
    """A parsed model reference.

    Attributes:
        text: the reference in its single-string form (`ViT-B-32:laion2b_s34b_b79k` for a tag).
        kind: one of `KINDS`.
        config: the open_clip config name, where the reference names one (tag, config; a checkpoint's
            fallback when it does not record its own); None where the model carries its config.
        tag: the pretrained tag (kind `tag`), else None.
        location: the repository id (hf-hub), the folder (local-dir), the path or URI (checkpoint,
            registry); None for tag and config.
    """

    text: str
    kind: str
    config: str | None = None
    tag: str | None = None
    location: str | None = None

    @property
    def cache_name(self) -> str:
        """The folder a model cache holds this reference under: its text with ':' and '/' as '--'."""
        return re.sub(r"[:/]+", "--", self.text)

    @property
    def pretrained(self) -> bool:
        """Whether the reference names trained weights (every kind but `config`)."""
        return self.kind != "config"


def parse_reference(text: str, config: str | None = None) -> ModelReference:
    """Parse and check a model reference from its text alone (no file or network I/O).

    Args:
        text: the reference (see the module docstring).
        config: the fallback config: the one a bare tag belongs to (`train.model` beside `train.pretrained`),
            and the one a checkpoint that does not record its own is built with. A `CONFIG:TAG` reference
            names its own config, which wins.

    Raises:
        ClipflowError: one line naming what is malformed: an empty reference, an hf-hub id that is no
            `org/repo`, an empty folder, a registry URI of another shape, an unknown config, or a tag
            open_clip's registry does not know for that config (with the tags it knows).
    """
    text = text.strip() if isinstance(text, str) else text
    if not isinstance(text, str) or not text:
        raise ClipflowError(f"a model reference must be a non-empty string ({EXAMPLES}), got {text!r}")
    if text.startswith(HF_HUB_PREFIX):
        repo = text[len(HF_HUB_PREFIX) :]
        if not HF_REPO.fullmatch(repo):
            raise ClipflowError(f"model reference {text!r}: hf-hub: takes a repository id org/repo, got {repo!r}")
        return ModelReference(text, "hf-hub", location=repo)
    if text.startswith(LOCAL_DIR_PREFIX):
        folder = text[len(LOCAL_DIR_PREFIX) :]
        if not folder:
            raise ClipflowError(f"model reference {text!r}: local-dir: takes a folder in open_clip's layout")
        return ModelReference(text, "local-dir", location=folder)
    if text.startswith(REGISTRY_PREFIXES):
        if not (REGISTERED_MODEL.fullmatch(text) or LOGGED_MODEL.fullmatch(text) or RUN_ARTIFACT.fullmatch(text)):
            raise ClipflowError(
                f"model reference {text!r}: an MLflow model is models:/NAME@ALIAS, models:/NAME/VERSION,"
                " models:/m-ID or runs:/RUN_ID/PATH"
            )
        return ModelReference(text, "registry", config=config, location=text)
    if text.startswith("s3://"):
        if not re.fullmatch(r"s3://[^/\s]+/\S+", text):
            raise ClipflowError(f"model reference {text!r}: an S3 checkpoint is s3://bucket/key")
        return ModelReference(text, "checkpoint", config=config, location=text)
    if _is_path(text):
        return ModelReference(text, "checkpoint", config=config, location=text)
    name, colon, tag = text.partition(":")
    if colon:
        return _tag(name, tag)
    if config is not None:
        return _tag(config, text)
    _require_config(text)
    return ModelReference(text, "config", config=text)


def _is_path(text: str) -> bool:
    """A checkpoint path, told from a config name or tag by its spelling only."""
    return "/" in text or "\\" in text or text.startswith(("~", ".")) or text.endswith(CHECKPOINT_SUFFIXES)


def _tag(config: str, tag: str) -> ModelReference:
    """A config plus a tag of open_clip's pretrained registry, both checked against open_clip's lists."""
    _require_config(config)
    import open_clip

    known = open_clip.list_pretrained_tags_by_model(config)
    if tag not in known:
        listed = ", ".join(known) if known else "none: use hf-hub:, local-dir: or a checkpoint"
        raise ClipflowError(f"unknown pretrained tag {tag!r} for model config {config!r}; its known tags: {listed}")
    return ModelReference(f"{config}:{tag}", "tag", config=config, tag=tag)


def shipped_config(name: str) -> dict[str, Any] | None:
    """The config of a model name, clipflow's or one open_clip ships, read without importing open_clip."""
    open_clip_configs = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / "model_configs"
    for folder in (CONFIG_DIR, open_clip_configs):
        path = folder / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None


def _require_config(name: str) -> None:
    if shipped_config(name) is None:
        raise ClipflowError(f"unknown model config {name!r}; a model reference is one of {EXAMPLES}")
