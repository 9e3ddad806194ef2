"""The one place that builds models, tokenizers and transforms, and reads and writes checkpoints.

Training, evaluation and serving all come through here, so their preprocessing cannot drift
apart. Checkpoints are plain open_clip checkpoints (`{"state_dict": ...}`) that
`open_clip.create_model_and_transforms(name, pretrained=path)` loads as they are; clipflow
adds the model name and the resolved params beside the weights so any checkpoint can be
rebuilt and traced.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipflow.errors import ClipflowError

if TYPE_CHECKING:
    import torch

CONFIG_DIR = Path(__file__).parent / "configs"
CHECKPOINT_FILE = "checkpoint.pt"
_registered = False


# torch and open_clip are imported where a model is built or a checkpoint read, not here: they
# take seconds to import (open_clip pulls in torchvision and timm), and the training launcher,
# which imports this module, never builds a model.


def register_configs() -> None:
    """Make the configs shipped with clipflow (CLIP-Tiny) known to open_clip by name."""
    import open_clip

    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def model_config(name: str) -> dict[str, Any] | None:
    """The config of a model name, clipflow's or one open_clip ships, read without importing open_clip."""
    open_clip_configs = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / "model_configs"
    for folder in (CONFIG_DIR, open_clip_configs):
        path = folder / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None


@dataclass
class ClipModel:
    """A model with the transforms and tokenizer that belong to it."""

    name: str
    model: torch.nn.Module
    preprocess_train: Callable
    preprocess: Callable
    tokenizer: Callable

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings, (N, D) float32."""
        import torch

        tokens = self.tokenizer(texts)
        with torch.no_grad():
            return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of preprocessed images (N, 3, H, W), (N, D) float32."""
        import torch

        with torch.no_grad():
            return torch.nn.functional.normalize(self.model.encode_image(images).float(), dim=-1)

    def encode_labels(self, labels: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Zero-shot classifier weights for `labels`, (L, D): see `prompt_ensemble`."""
        return prompt_ensemble(self.encode_text, labels, templates)


def prompt_ensemble(
    encode_text: Callable[[list[str]], torch.Tensor], labels: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """One embedding per label: the mean of its normalised template embeddings, renormalised.

    This is the CLIP paper's prompt ensembling ("a photo of a {}."); evaluation and serving
    both classify through it, so served probabilities match the evaluated accuracy.
    """
    import torch

    prompts = [template.format(label) for label in labels for template in templates]
    per_prompt = encode_text(prompts).reshape(len(labels), len(templates), -1)
    return torch.nn.functional.normalize(per_prompt.mean(dim=1), dim=-1)


def create(name: str, pretrained: str | None = None) -> ClipModel:
    """Build an open_clip model, its train/eval transforms and tokenizer.

    Args:
        name: an open_clip config name, such as `CLIP-Tiny` or `ViT-B-32`.
        pretrained: a checkpoint file to load, or None for random init.
    """
    import open_clip

    register_configs()
    if name not in open_clip.list_models():
        raise ClipflowError(f"unknown model config {name!r}")
    model, preprocess_train, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, weights_only=True
    )
    return ClipModel(name, model, preprocess_train, preprocess, open_clip.get_tokenizer(name))


def save_checkpoint(path: str | Path, model: torch.nn.Module, name: str, extra: dict[str, Any]) -> Path:
    """Write an open_clip checkpoint atomically: a reader never sees a half-written file.

    Args:
        path: the checkpoint file, or a directory to hold `checkpoint.pt`.
        model: the (unwrapped) model.
        name: its open_clip config name, stored so the checkpoint can be rebuilt.
        extra: plain-data values (params, step, data version) stored beside the weights.
    """
    import torch

    path = Path(path)
    if path.suffix != ".pt":
        path = path / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"name": name, "state_dict": model.state_dict(), "clipflow": extra}, tmp)
    tmp.replace(path)
    return path


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The non-weight fields of a clipflow checkpoint (`name`, `clipflow`)."""
    import torch

    state = torch.load(resolve_checkpoint(path), map_location="cpu", weights_only=True)
    return {key: value for key, value in state.items() if key != "state_dict"}


def load(path: str | Path, name: str | None = None) -> ClipModel:
    """Rebuild a model from a checkpoint file or a directory holding `checkpoint.pt`.

    The config name comes from the checkpoint itself unless given; weights load with
    `weights_only=True`, so an untrusted file cannot run code.
    """
    checkpoint = resolve_checkpoint(path)
    if name is None:
        name = read_checkpoint_info(checkpoint).get("name")
        if not name:
            raise ClipflowError(f"{checkpoint} does not name its model config; pass it explicitly")
    loaded = create(name, pretrained=str(checkpoint))
    loaded.model.eval()
    return loaded


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise ClipflowError(f"checkpoint not found: {path}")
    return path
