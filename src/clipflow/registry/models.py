"""CLIP checkpoints as MLflow models.

A clipflow model in MLflow is a pyfunc "model from code": the code is `clipflow/model/pyfunc.py`
(plain source, nothing pickled) and the weights are the open_clip checkpoint, an artifact, beside
the same model in open_clip's own layout (`open_clip/`) for tools that load that.
`mlflow.pyfunc.load_model(uri).predict(["a red circle"])` gives text embeddings, as the model's
signature and input example show in MLflow, and clipflow itself downloads the checkpoint to
rebuild the full two-tower model.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from clipflow import model as clip_model
from clipflow import storage
from clipflow.errors import ClipflowError
from clipflow.model import hub
from clipflow.params import TrainParams
from clipflow.references import EXAMPLES, LOCAL_DIR_PREFIX, ModelReference, parse_reference

ARTIFACT_NAME = "model"
CHECKPOINT_KEY = "checkpoint"
# The MLflow model's artifact (and the Bento model's folder) holding the model in open_clip's layout.
OPEN_CLIP_KEY = "open_clip"
PYFUNC_CODE = Path(clip_model.__file__).parent / "pyfunc.py"
# A registered model's version, by alias or number (`models:/m-...` names a logged model, not a version).
REGISTRY_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))")
INPUT_EXAMPLE = ["a red circle", "two blue stars left of a green square"]


def log_clip_model(checkpoint: str | Path, config_name: str | None = None) -> str:
    """Log a checkpoint as an MLflow model in the active run; returns its `models:/` URI.

    The model carries the checkpoint and the same model in open_clip's layout (`open_clip/`:
    `open_clip_config.json` + `open_clip_model.safetensors`, which plain open_clip loads with
    `local-dir:`), a signature (texts in, one float32 embedding of the model's width per text out) and
    an input example, which MLflow checks by loading the logged model and encoding it.

    Args:
        checkpoint: a checkpoint file, or a folder holding `checkpoint.pt`.
        config_name: its open_clip config, when the checkpoint does not record it.
    """
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec

    from clipflow.model.export import write_open_clip

    path = clip_model.resolve_checkpoint(checkpoint)
    clip = clip_model.load(path, config_name)
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.string)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, clip_model.model_config(clip.name)["embed_dim"]))]),
    )
    with tempfile.TemporaryDirectory(prefix="clipflow-open-clip-") as tmp:
        layout = Path(tmp) / OPEN_CLIP_KEY
        layout.mkdir()
        write_open_clip(clip, layout)
        del clip
        info = mlflow.pyfunc.log_model(
            name=ARTIFACT_NAME,
            python_model=str(PYFUNC_CODE),
            artifacts={CHECKPOINT_KEY: str(path), OPEN_CLIP_KEY: str(layout)},
            signature=signature,
            input_example=INPUT_EXAMPLE,
            # clipflow brings open_clip and torch; naming it avoids MLflow's slow requirement inference.
            pip_requirements=["clipflow"],
        )
    return info.model_uri


def is_model_uri(reference: str) -> bool:
    return reference.startswith(("models:/", "runs:/"))


def registered_version(reference: str):
    """The registry's `ModelVersion` that `models:/NAME@ALIAS` or `models:/NAME/VERSION` names now, else None.

    Pinning an alias to its version once keeps everything a step records about the model in agreement
    while the alias may move on.

    Raises:
        ClipflowError: the registry has no such model, version or alias.
    """
    match = REGISTRY_URI.fullmatch(reference)
    if match is None:
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        if match["alias"]:
            return client.get_model_version_by_alias(match["name"], match["alias"])
        return client.get_model_version(match["name"], match["version"])
    except MlflowException as exc:
        raise ClipflowError(f"cannot resolve {reference}: {exc.message.splitlines()[0]}") from None


def download_checkpoint(model_uri: str, destination: str | Path | None = None) -> Path:
    """Fetch the open_clip checkpoint of an MLflow model (`models:/NAME@ALIAS`, `models:/NAME/3`)."""
    import mlflow

    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=model_uri, dst_path=None if destination is None else str(destination)
        )
    except mlflow.exceptions.MlflowException as exc:
        raise ClipflowError(f"cannot fetch {model_uri}: {exc.message.splitlines()[0]}") from None
    found = sorted(Path(local).rglob(clip_model.CHECKPOINT_FILE))
    if not found:
        raise ClipflowError(f"{model_uri} holds no {clip_model.CHECKPOINT_FILE}")
    return found[0]


def local_checkpoint(
    reference: str | Path | ModelReference,
    config_name: str | None = None,
    cache: str | None = None,
    folder: Path | None = None,
) -> Path:
    """The checkpoint file of any model reference on this machine.

    A path (file or folder) is used as it is; an `s3://` checkpoint and an MLflow model (tracking must be
    set up for it) are downloaded; a pretrained tag, `hf-hub:` or `local-dir:` model is loaded
    (`clipflow.model.hub`) and saved as a clipflow checkpoint, which records its config, so that every
    process can rebuild it from that one file.

    Args:
        reference: the model reference.
        config_name: the fallback config of a bare tag or of a checkpoint that records none.
        cache: `train.model_cache`, where tag and hf-hub models are read from when set.
        folder: where a downloaded or saved checkpoint goes (a new temporary folder if None); one found
            there from an earlier call is reused.
    """
    parsed = _parse(reference, config_name)
    if parsed.kind == "checkpoint" and not storage.is_s3(parsed.text):
        return clip_model.resolve_checkpoint(parsed.text)
    if parsed.kind == "config":
        raise ClipflowError(f"model reference {parsed.text!r} names a config and no weights ({EXAMPLES})")
    folder = Path(tempfile.mkdtemp(prefix="clipflow-model-")) if folder is None else folder
    target = folder / parsed.cache_name / clip_model.CHECKPOINT_FILE
    if target.is_file():
        return target
    if parsed.kind == "checkpoint":
        return storage.download_file(parsed.text, target)
    if parsed.kind == "registry":
        # Downloaded beside the target and moved into place whole: a reader never finds half a file.
        download = target.parent / f".download-{os.getpid()}"
        download_checkpoint(parsed.text, download).replace(target)
        shutil.rmtree(download, ignore_errors=True)
        return target
    clip = hub.load_open_clip(parsed, cache)
    return clip_model.save_checkpoint(target, clip.model, clip.name, {"reference": parsed.text})


def load_starting_model(train: TrainParams) -> clip_model.ClipModel | None:
    """The model a training run starts from (`train.pretrained` on `train.model`), or None for random weights.

    The evaluate step scores it as the run's baseline, WiSE-FT interpolates towards it.
    """
    if not train.pretrained:
        return None
    return load_model(train.pretrained, train.model, train.model_cache)


def load_model(reference: str | Path, config_name: str | None = None, cache: str | None = None) -> clip_model.ClipModel:
    """Load a model from any model reference (see `clipflow.references`), in eval mode.

    Args:
        reference: a pretrained tag (`ViT-B-32:laion2b_s34b_b79k`), `hf-hub:org/repo`, `local-dir:PATH`, a
            checkpoint path or `s3://` URI, or an MLflow model URI (tracking must be set up for it).
        config_name: the fallback config of a bare tag or of a checkpoint that records none.
        cache: `train.model_cache`: a folder or `s3://` prefix that tag and hf-hub models are read from
            instead of the hub.

    Raises:
        ClipflowError: one line for a malformed reference, a model neither cached nor reachable, a
            corrupt file, or weights that do not fit their config.
    """
    parsed = _parse(reference, config_name)
    if parsed.kind in hub.FOLDER_KINDS:
        return hub.load_open_clip(parsed, cache)
    if parsed.kind == "checkpoint" and storage.is_s3(parsed.text):
        with tempfile.TemporaryDirectory(prefix="clipflow-model-") as tmp:
            return clip_model.load(local_checkpoint(parsed, folder=Path(tmp)), config_name)
    return clip_model.load(local_checkpoint(parsed), config_name)


def _parse(reference: str | Path | ModelReference, config_name: str | None) -> ModelReference:
    """The parsed reference; a path that exists here is a checkpoint, or an open_clip folder when it holds
    one's config and no checkpoint, whatever its spelling."""
    if isinstance(reference, ModelReference):
        return reference
    text = str(reference)
    path = Path(text).expanduser()
    if isinstance(reference, Path) or path.exists():
        if (path / hub.CONFIG_FILE).is_file() and not (path / clip_model.CHECKPOINT_FILE).is_file():
            return parse_reference(f"{LOCAL_DIR_PREFIX}{text}")
        return ModelReference(text, "checkpoint", config=config_name, location=text)
    return parse_reference(text, config_name)
