"""Models from open_clip's own sources: a pretrained tag, a Hugging Face Hub repository, a folder in open_clip's
layout, and the model cache (`train.model_cache`) that mirrors the first two for machines without network.

Weights come through the Hugging Face cache (`HF_HOME`), so `HF_HUB_OFFLINE=1` works from a filled one. A
model cache is a folder or an `s3://` prefix holding one open_clip folder per reference, under the
reference's `cache_name`; `clipflow pull-model REF --to CACHE` (`pull`) fills it. A model read from a folder
keeps its config beside its weights in every checkpoint clipflow writes of it (`clipflow.model.save_checkpoint`),
so another process or node rebuilds it without the folder.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from clipflow import storage
from clipflow.errors import ClipflowError
from clipflow.model import ClipModel, _first_sentence, create, model_config, read_checkpoint, register_config
from clipflow.references import HUB_KINDS, ModelReference

CONFIG_FILE = "open_clip_config.json"
# The weight files of an open_clip folder, in open_clip's own order of preference.
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
# What a hub repository holds for open_clip: the config, the weights, a text tower's tokenizer files.
HUB_FILES = [CONFIG_FILE, *WEIGHT_FILES, "*.json", "*.txt"]
FOLDER_KINDS = (*HUB_KINDS, "local-dir")


def load_open_clip(reference: ModelReference, cache: str | None = None) -> ClipModel:
    """Load a `tag`, `hf-hub` or `local-dir` reference, in eval mode.

    Args:
        reference: the parsed reference.
        cache: a model cache (folder or `s3://` prefix); when given, a `tag` or `hf-hub` reference is read
            from it and never from the hub.

    Raises:
        ClipflowError: one line: the model is neither cached nor reachable (which reference, where it
            looked, how to fill the cache), a folder not in open_clip's layout, weights that cannot be
            read (a corrupt safetensors file), or weights that do not fit their config.
    """
    if reference.kind not in FOLDER_KINDS:
        raise ClipflowError(f"model reference {reference.text!r} ({reference.kind}) is not one open_clip loads")
    if cache and reference.kind in HUB_KINDS:
        clip = _from_cache(reference, cache)
    elif reference.kind == "local-dir":
        clip = load_folder(Path(reference.location).expanduser(), reference.cache_name, reference.text)
    elif reference.kind == "hf-hub":
        clip = load_folder(_hub_snapshot(reference), reference.cache_name, reference.text)
    else:
        clip = _from_tag(reference)
    clip.model.eval()
    return clip


def pull(reference: ModelReference, to: str) -> dict[str, Any]:
    """Load a `tag` or `hf-hub` reference from the hub (or the Hugging Face cache) and write it in open_clip's
    layout to `<to>/<cache_name>`, a folder or `s3://` prefix, for `train.model_cache` to read; returns what
    was written."""
    from clipflow.model.export import export

    if reference.kind not in HUB_KINDS:
        raise ClipflowError(
            f"pull-model takes a pretrained tag or hf-hub: reference, whose weights come from the hub;"
            f" {reference.text!r} is a {reference.kind} reference that every node can already read"
        )
    written = export(load_open_clip(reference), cache_location(to, reference), "open_clip")
    return {"reference": reference.text, "cache": to, "model_cache": f"train.model_cache={to}", **written}


def cache_location(cache: str, reference: ModelReference) -> str:
    """Where a model cache holds `reference`: a folder or an `s3://` prefix."""
    return f"{str(cache).rstrip('/')}/{reference.cache_name}"


def load_folder(folder: Path, fallback_name: str, what: str) -> ClipModel:
    """A model from a folder in open_clip's layout (`open_clip_config.json` and weights).

    The model keeps the name of a config clipflow or open_clip ships when its config is that one, so
    what was exported from `ViT-B-32` is `ViT-B-32` again; else `fallback_name`, registered with open_clip.
    """
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ClipflowError(
            f"model {what}: {folder} holds no {CONFIG_FILE}, so it is no folder in open_clip's layout"
            " (`clipflow export --model REF --to DIR` writes one)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClipflowError(f"model {what}: {config_path} is no JSON ({exc})") from None
    model_cfg = config.get("model_cfg") if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(model_cfg):
        raise ClipflowError(f"model {what}: {config_path} has no model_cfg with embed_dim, vision_cfg and text_cfg")
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise ClipflowError(f"model {what}: {folder} holds no weights ({', '.join(WEIGHT_FILES)})")
    name = _shipped_name(model_cfg) or fallback_name
    register_config(name, model_cfg)
    return _build(name, weights, config.get("preprocess_cfg"), what)


def _shipped_name(model_cfg: dict[str, Any]) -> str | None:
    import open_clip

    from clipflow.model import register_configs

    register_configs()
    return next((name for name in open_clip.list_models() if model_config(name) == model_cfg), None)


def _build(name: str, weights: Path, preprocess_cfg: dict[str, Any] | None, what: str) -> ClipModel:
    """`create` with the weights of a folder, its failures as one line."""
    from safetensors import SafetensorError

    if weights.suffix != ".safetensors":
        read_checkpoint(weights)  # a bad pickle fails here in one line, unread
    try:
        return create(name, pretrained=str(weights), preprocess_cfg=preprocess_cfg)
    except SafetensorError as exc:
        raise ClipflowError(
            f"model {what}: {weights} cannot be read: not a safetensors file, or truncated or corrupt ({_detail(exc)})"
        ) from None
    except (RuntimeError, KeyError, ValueError, AssertionError) as exc:  # open_clip's ways of refusing weights
        raise ClipflowError(f"model {what}: the weights in {weights} do not fit its config: {_detail(exc)}") from None


def _from_tag(reference: ModelReference) -> ClipModel:
    # open_clip logs a failed download as an error before it raises it, which is reported here in one line.
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        return create(reference.config, pretrained=reference.tag)
    except ClipflowError:
        raise
    except Exception as exc:  # open_clip wraps every download failure in a RuntimeError with its text
        raise ClipflowError(_not_fetched(reference, exc)) from None
    finally:
        logging.disable(previous)


def _hub_snapshot(reference: ModelReference) -> Path:
    """The local snapshot of an hf-hub repository: from the Hugging Face cache, downloaded into it if need be."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(reference.location, allow_patterns=HUB_FILES))
    except Exception as exc:  # huggingface_hub's offline, HTTP, not-found and auth errors
        raise ClipflowError(_not_fetched(reference, exc)) from None


def _not_fetched(reference: ModelReference, exc: Exception) -> str:
    """Why a hub model did not load, where it was looked for, and how to get it there."""
    from huggingface_hub import constants

    where = f"the Hugging Face cache {constants.HF_HUB_CACHE}"
    if constants.HF_HUB_OFFLINE:
        why = f"it is not in {where} and HF_HUB_OFFLINE=1 keeps the hub out of reach"
    else:
        why = f"it is not in {where} and the hub did not give it ({_detail(exc)})"
    return (
        f"model {reference.text}: {why}; fill a model cache on a machine with network"
        f" (`clipflow pull-model {reference.text} --to CACHE`, then --set train.model_cache=CACHE),"
        " or run where the hub is reachable without HF_HUB_OFFLINE"
    )


def check_cached(reference: ModelReference, cache: str) -> str:
    """Where the model cache `cache` holds `reference`; checked without reading the weights.

    Raises:
        ClipflowError: the cache does not hold it: where it looked, and how to fill it.
    """
    location = cache_location(cache, reference)
    if not storage.Store(location).exists(CONFIG_FILE):
        raise ClipflowError(
            f"model {reference.text} is not in the model cache {cache} (looked for {location}/{CONFIG_FILE});"
            f" fill it with `clipflow pull-model {reference.text} --to {cache}` on a machine with network"
        )
    return location


def _from_cache(reference: ModelReference, cache: str) -> ClipModel:
    location = check_cached(reference, cache)
    what = f"{reference.text} (cached in {location})"
    if not storage.is_s3(location):
        return load_folder(Path(location), reference.cache_name, what)
    with tempfile.TemporaryDirectory(prefix="clipflow-model-cache-") as tmp:
        storage.download_tree(location, tmp)
        return load_folder(Path(tmp), reference.cache_name, what)


def _detail(exc: BaseException) -> str:
    return _first_sentence(str(exc) or type(exc).__name__)
