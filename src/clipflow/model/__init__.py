"""The one place that builds models, tokenizers and transforms, and reads and writes checkpoints.

Training, evaluation and serving all come through here, so their preprocessing cannot drift
apart. Checkpoints are plain open_clip checkpoints (`{"state_dict": ...}`) that
`open_clip.create_model_and_transforms(name, pretrained=path)` loads as they are; clipflow
adds the model name and the resolved params beside the weights so any checkpoint can be
rebuilt and traced.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import io
import json
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipflow.errors import ClipflowError
from clipflow.prompts import split_template
from clipflow.references import CONFIG_DIR, shipped_config

if TYPE_CHECKING:
    import torch

CHECKPOINT_FILE = "checkpoint.pt"
# The checkpoint entry that holds the model's open_clip config as `open_clip_config.json` does
# (`model_cfg` and `preprocess_cfg`): a model from a hub or a folder is rebuilt from it anywhere.
OPEN_CLIP_CONFIG_KEY = "open_clip_config"
# Words (BPE input, after cleaning) the tokenizer keeps the merges of: open_clip's own cache
# keeps every word it has ever seen, which random words grow without bound in a server.
TOKENIZER_CACHE_WORDS = 100_000
# Longer words are cut to this many UTF-8 bytes before BPE, whose cost grows with the square of
# a word's length. No English word comes near it; a run of CJK text without spaces is one word,
# whose first 42 characters already make about 75 tokens.
MAX_WORD_BYTES = 128
# The precisions a model runs at, by the dtype of its weights and inputs (torch's, by name: torch
# is imported where a model is built).
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
_registered = False
# Configs of models read from open_clip folders (hf-hub:, local-dir:, a model cache), by the name
# this process registered them with open_clip under.
_folder_configs: dict[str, dict[str, Any]] = {}
_config_folder: Path | None = None  # where their JSON files are written for open_clip


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
    """The config of a model name: one registered from a model folder (`register_config`), clipflow's or
    one open_clip ships, read without importing open_clip."""
    if name in _folder_configs:
        return copy.deepcopy(_folder_configs[name])
    return shipped_config(name)


def register_config(name: str, config: dict[str, Any]) -> None:
    """Make open_clip build the model config `config` (a `model_cfg`) under `name`, in this process.

    open_clip only learns configs from JSON files, so it is written to a folder of this process's own.
    """
    import open_clip

    global _config_folder
    if model_config(name) == config:
        return
    if _config_folder is None:
        _config_folder = Path(tempfile.mkdtemp(prefix="clipflow-configs-"))
    (_config_folder / f"{name}.json").write_text(json.dumps(config))
    _folder_configs[name] = copy.deepcopy(config)
    register_configs()
    open_clip.add_model_config(_config_folder / f"{name}.json")


@dataclass
class ClipModel:
    """A model with the transforms and tokenizer that belong to it, at the precision its weights hold."""

    name: str
    model: torch.nn.Module
    preprocess_train: Callable
    preprocess: Callable
    tokenizer: Callable
    precision: str = "fp32"  # "bf16": the weights are bfloat16 (see `at_precision`)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings, (N, D) float32, run on the batch's longest prompt where exact."""
        import torch

        from clipflow.model.text_length import encode_tokens

        tokens = self.tokenizer(texts).to(next(self.model.parameters()).device)  # on a GPU when indexing there
        with torch.no_grad():
            return torch.nn.functional.normalize(encode_tokens(self.model, tokens).float(), dim=-1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of preprocessed images (N, 3, H, W), (N, D) float32."""
        import torch

        with torch.no_grad():
            features = self.model.encode_image(images.to(self.dtype))
            return torch.nn.functional.normalize(features.float(), dim=-1)

    def at_precision(self, precision: str) -> ClipModel:
        """This model with its weights in `precision` ("fp32" or "bf16"): itself if they already are, else a copy.

        Every weight and buffer is cast, not run under autocast (see `clipflow.model.precision`); the
        scalars (the logit scale and bias) stay as they are: scores are multiplied by them, and bf16's
        8-bit mantissa would move every served probability. Embeddings stay float32 for the callers.
        """
        if precision not in PRECISION_DTYPES:
            raise ClipflowError(f"a model runs at {' or '.join(PRECISION_DTYPES)}, not {precision!r}")
        if precision == self.precision:
            return self
        cast = dataclasses.replace(self, model=copy.deepcopy(self.model), precision=precision)
        for tensor in (*cast.model.parameters(), *cast.model.buffers()):
            if tensor.is_floating_point() and tensor.ndim:
                tensor.data = tensor.data.to(cast.dtype)
        return cast

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights, which inputs are cast to."""
        import torch

        return getattr(torch, PRECISION_DTYPES[self.precision])

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

    parts = [split_template(template) for template in templates]
    prompts = [before + label + after for label in labels for before, after in parts]
    per_prompt = encode_text(prompts).reshape(len(labels), len(templates), -1)
    return torch.nn.functional.normalize(per_prompt.mean(dim=1), dim=-1)


def create(name: str, pretrained: str | None = None, preprocess_cfg: dict[str, Any] | None = None) -> ClipModel:
    """Build an open_clip model, its train/eval transforms and tokenizer.

    Args:
        name: an open_clip config name, such as `CLIP-Tiny` or `ViT-B-32` (or one `register_config` added).
        pretrained: a weights file to load (a checkpoint, safetensors) or a tag of open_clip's registry,
            or None for random init.
        preprocess_cfg: the image preprocessing the weights were trained with (mean, std, interpolation,
            resize mode), where it is not the config's default.
    """
    import open_clip

    register_configs()
    if name not in open_clip.list_models():
        raise ClipflowError(f"unknown model config {name!r}")
    preprocess_cfg = preprocess_cfg or {}
    model, preprocess_train, preprocess = open_clip.create_model_and_transforms(
        name,
        pretrained=pretrained,
        weights_only=True,
        image_mean=preprocess_cfg.get("mean"),
        image_std=preprocess_cfg.get("std"),
        image_interpolation=preprocess_cfg.get("interpolation"),
        image_resize_mode=preprocess_cfg.get("resize_mode"),
    )
    return ClipModel(name, model, preprocess_train, preprocess, tokenizer(name))


def tokenizer(name: str) -> Callable:
    """The tokenizer of the model config `name`, as `create` gives it with the model (see `bounded_tokenizer`)."""
    import open_clip

    register_configs()
    return bounded_tokenizer(open_clip.get_tokenizer(name))


def count_tokens(tokenize: Callable, texts: list[str]) -> list[int]:
    """How many tokens of each text the model reads: its start and end tokens and the words between, at most
    the context. open_clip's CLIP tokenizer ends every text with its end token; for other tokenizers, the ids
    other than 0 (their padding) are counted."""
    tokens = tokenize(texts)  # (N, context_length)
    end = getattr(tokenize, "eot_token_id", None)
    if end is None:
        return (tokens != 0).sum(dim=1).tolist()
    return ((tokens == end).int().argmax(dim=1) + 1).tolist()


def image_side(name: str) -> int:
    """The shorter side of the images the model config `name` takes (its vision tower's input).

    Raises:
        ClipflowError: no config of that name is known.
    """
    config = model_config(name)
    if config is None:
        raise ClipflowError(f"unknown model config {name!r}")
    size = config["vision_cfg"]["image_size"]
    return min(size) if isinstance(size, list) else size


class _WordCache(collections.OrderedDict):
    """open_clip's BPE cache, keeping the `maxsize` words used last; safe across the serving lanes.

    `SimpleTokenizer.bpe` only tests a word, reads it and stores it. A word found is moved to
    the newest end, so other lanes' stores cannot evict it before it is read. The entries it
    starts with (the start and end markers, which map to their own tokens) are never evicted.
    """

    def __init__(self, pinned: dict[str, str], maxsize: int) -> None:
        super().__init__()
        self.pinned = dict(pinned)
        self.maxsize = maxsize
        self.lock = threading.Lock()

    def __contains__(self, word: object) -> bool:
        if word in self.pinned:
            return True
        with self.lock:
            found = super().__contains__(word)
            if found:
                self.move_to_end(word)
            return found

    def __getitem__(self, word: str) -> str:
        if word in self.pinned:
            return self.pinned[word]
        with self.lock:
            return super().__getitem__(word)

    def __setitem__(self, word: str, merged: str) -> None:
        with self.lock:
            super().__setitem__(word, merged)
            if len(self) > self.maxsize:
                self.popitem(last=False)


def bounded_tokenizer(tokenizer: Callable) -> Callable:
    """Bound the memory and the work of open_clip's BPE tokenizer, in place; returns it.

    Its word cache keeps `TOKENIZER_CACHE_WORDS` words, and a text is encoded only until the
    context is full: the model sees its first `context_length - 2` tokens, so the words after
    them are never split. The tokens are the same as open_clip's for every text whose words
    are at most `MAX_WORD_BYTES` long; longer words are cut to that before BPE.

    Other tokenizers (Hugging Face's, for `hf-hub:` text towers) truncate on their own and are
    returned unchanged, as is a SimpleTokenizer with a reduction mask, which samples words
    from the whole text.
    """
    from open_clip.tokenizer import SimpleTokenizer

    if type(tokenizer) is SimpleTokenizer and tokenizer.reduction_fn is None and tokenizer.context_length:
        tokenizer.cache = _WordCache(tokenizer.cache, TOKENIZER_CACHE_WORDS)
        tokenizer.encode = functools.partial(_encode_context, tokenizer)
    return tokenizer


def _encode_context(tokenizer: Any, text: str) -> list[int]:
    """`SimpleTokenizer.encode`, stopping once the words read fill the context."""
    budget = tokenizer.context_length - 2  # the start and end tokens take the other two
    tokens: list[int] = []
    for match in tokenizer.pat.finditer(tokenizer.clean_fn(text)):
        word = "".join(tokenizer.byte_encoder[b] for b in match.group().encode("utf-8")[:MAX_WORD_BYTES])
        tokens.extend(tokenizer.encoder[piece] for piece in tokenizer.bpe(word).split(" "))
        if len(tokens) >= budget:
            break
    return tokens


def save_checkpoint(path: str | Path, model: torch.nn.Module, name: str, extra: dict[str, Any]) -> Path:
    """Write an open_clip checkpoint atomically: a reader never sees a half-written file.

    Args:
        path: the checkpoint file, or a directory to hold `checkpoint.pt`.
        model: the (unwrapped) model.
        name: its open_clip config name, stored so the checkpoint can be rebuilt; its config and
            preprocessing are stored too (`OPEN_CLIP_CONFIG_KEY`), for configs no other process knows.
        extra: plain-data values (params, step, data version) stored beside the weights.
    """
    import torch
    from open_clip.model import get_model_preprocess_cfg

    path = Path(path)
    if path.suffix != ".pt":
        path = path / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    state = {"name": name, "state_dict": model.state_dict(), "clipflow": extra}
    config = model_config(name)
    if config is not None:
        state[OPEN_CLIP_CONFIG_KEY] = {"model_cfg": config, "preprocess_cfg": dict(get_model_preprocess_cfg(model))}
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The non-weight fields of a clipflow checkpoint (`name`, `clipflow`)."""
    state = read_checkpoint(resolve_checkpoint(path))
    return {key: value for key, value in state.items() if key != "state_dict"}


def read_checkpoint(location: str | Path, data: bytes | None = None) -> dict[str, Any]:
    """A checkpoint's contents, read with `weights_only=True`: tensors and plain data, never code.

    Args:
        location: the checkpoint file, or where `data` was fetched from (errors name it).
        data: the checkpoint's bytes, when they are already in memory (an `s3://` object).

    Raises:
        ClipflowError: the file is empty, truncated or no PyTorch file; it holds other objects than
            tensors and plain data (refused unread, so nothing in it runs); or it is not a mapping.
    """
    import torch

    try:
        state = torch.load(location if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises whatever the bytes provoke: EOFError, IndexError, ...
        raise ClipflowError(f"checkpoint {location} cannot be read: {_unreadable(exc)}") from None
    if not isinstance(state, dict):
        raise ClipflowError(f"checkpoint {location} holds a {type(state).__name__}, not a checkpoint's mapping")
    return state


def _unreadable(exc: Exception) -> str:
    """Why torch.load refused a file, in a few words."""
    if isinstance(exc, EOFError):
        return "it is empty or ends early"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 2 and lines[0].startswith("Weights only load failed"):
        lines = lines[-2:-1]  # the finding, between torch's advice to load it unsafely and a link to its docs
    detail = _first_sentence(" ".join(lines))
    blocked = detail.partition("GLOBAL ")[2].split(" ")[0]
    if blocked:
        return f"it would build {blocked}, which is no tensor or plain data: refused, nothing in it ran"
    return f"not a PyTorch checkpoint, or truncated or corrupt ({detail})"


def _first_sentence(message: str) -> str:
    """A message up to its first full stop, on one line and at most 300 characters."""
    text = " ".join(message.split()).split(". ")[0]
    return text if len(text) <= 300 else text[:297] + "..."


def load(path: str | Path, name: str | None = None) -> ClipModel:
    """Rebuild a model from a checkpoint file or a directory holding `checkpoint.pt`.

    The config name and preprocessing come from the checkpoint itself; `name` is the config of one
    that records none (a plain open_clip checkpoint). Weights load with `weights_only=True`, so an
    untrusted file cannot run code.

    Raises:
        ClipflowError: no such file, a file that is not a checkpoint (see `read_checkpoint`), no
            config name, or weights that do not fit the config (another architecture, missing keys).
    """
    import torch

    checkpoint = resolve_checkpoint(path)
    # Read here before open_clip does: its failures on a bad file are tracebacks, and it retries a
    # load that raised TypeError without passing weights_only.
    state = read_checkpoint(checkpoint)
    weights = state.get("state_dict", state)
    if not isinstance(weights, dict) or not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ClipflowError(f"checkpoint {checkpoint} holds no weights (a 'state_dict' of tensors)")
    name = state.get("name") or name
    recorded = state.get(OPEN_CLIP_CONFIG_KEY) or {}
    del state, weights  # open_clip reads the file again: never two copies of the weights at once
    if not name or not isinstance(name, str):
        raise ClipflowError(f"{checkpoint} does not name its model config; pass it explicitly")
    # A shipped name means its shipped config: a checkpoint never redefines ViT-B-32 for this process.
    if isinstance(recorded.get("model_cfg"), dict) and shipped_config(name) is None:
        register_config(name, recorded["model_cfg"])
    try:
        loaded = create(name, pretrained=str(checkpoint), preprocess_cfg=recorded.get("preprocess_cfg"))
    except (RuntimeError, AssertionError, KeyError, ValueError) as exc:  # open_clip's ways of refusing weights
        raise ClipflowError(
            f"checkpoint {checkpoint} does not fit model config {name!r}: {_first_sentence(str(exc))}"
        ) from None
    loaded.model.eval()
    return loaded


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise ClipflowError(f"checkpoint not found: {path}")
    return path
