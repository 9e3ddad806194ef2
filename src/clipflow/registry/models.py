"""CLIP checkpoints as MLflow models.

A clipflow model in MLflow is a pyfunc "model from code": the code is `clipflow/model/pyfunc.py`
(plain source, nothing pickled) and the weights are the open_clip checkpoint, an artifact.
`mlflow.pyfunc.load_model(uri).predict(["a red circle"])` gives text embeddings, as the model's
signature and input example show in MLflow, and clipflow itself downloads the checkpoint to
rebuild the full two-tower model.
"""

from __future__ import annotations

import re
from pathlib import Path

from clipflow import model as clip_model
from clipflow.errors import ClipflowError

ARTIFACT_NAME = "model"
CHECKPOINT_KEY = "checkpoint"
PYFUNC_CODE = Path(clip_model.__file__).parent / "pyfunc.py"
# A registered model's version, by alias or number (`models:/m-...` names a logged model, not a version).
REGISTRY_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))")
INPUT_EXAMPLE = ["a red circle", "two blue stars left of a green square"]


def log_clip_model(checkpoint: str | Path, config_name: str | None = None) -> str:
    """Log a checkpoint as an MLflow model in the active run; returns its `models:/` URI.

    The model carries a signature (texts in, one float32 embedding of the model's width per text
    out) and an input example, which MLflow checks by loading the logged model and encoding it.

    Args:
        checkpoint: a checkpoint file, or a folder holding `checkpoint.pt`.
        config_name: its open_clip config, when known; else read from the checkpoint.
    """
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec

    path = clip_model.resolve_checkpoint(checkpoint)
    config = clip_model.model_config(config_name or clip_model.read_checkpoint_info(path).get("name"))
    width = config["embed_dim"] if config else -1  # a config open_clip builds from elsewhere (hf-hub:)
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.string)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, width))]),
    )
    info = mlflow.pyfunc.log_model(
        name=ARTIFACT_NAME,
        python_model=str(PYFUNC_CODE),
        artifacts={CHECKPOINT_KEY: str(path)},
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


def local_checkpoint(reference: str | Path) -> Path:
    """The checkpoint file of a model reference on this machine: a path (file or folder) as it is, an MLflow
    model URI downloaded (tracking must be set up for it)."""
    if is_model_uri(str(reference)):
        return download_checkpoint(str(reference))
    return clip_model.resolve_checkpoint(reference)


def load_model(reference: str | Path, config_name: str | None = None) -> clip_model.ClipModel:
    """Load a model from a checkpoint path or an MLflow model URI.

    `config_name` names the open_clip config of a checkpoint that does not record it.
    """
    return clip_model.load(local_checkpoint(reference), config_name)
