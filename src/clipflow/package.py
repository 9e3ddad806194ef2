"""The package step: a registered MLflow model, built into a Bento that serves it.

The checkpoint of the model (by default `models:/<promote.model_name>@champion`) goes into the
BentoML model store as a model named `serve.bento_name`, with the `serve:` request limits, the
source URI and the registry version as metadata. Then `serving/service.py` and the `clipflow`
package are built into a Bento whose arguments name that exact model tag and the configured
host and port, so `bentoml serve <bento_tag>` (and a container built from the Bento) serve
exactly this model without params.yaml or the MLflow store.

    clipflow package --model models:/clipflow-clip@champion
    BENTOML_HOME=$PWD/bentoml_home bentoml serve <bento_tag>
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from clipflow import model as clip_model
from clipflow import tracking
from clipflow.errors import ClipflowError
from clipflow.params import Params, ServeParams
from clipflow.registry.models import download_checkpoint

SERVING_DIR = Path(__file__).resolve().parents[2] / "serving"
SERVICE_FILE = "service.py"
SERVICE = "service:Clipflow"
HOME_ENV = "BENTOML_HOME"
DEFAULT_HOME = "bentoml_home"
# What the service imports besides clipflow; pinned to this environment's versions so the
# Bento's image runs what was tested here.
RUNTIME_DISTRIBUTIONS = ("torch", "torchvision", "open-clip-torch", "pillow")
LIMITS = ("max_labels", "max_texts", "max_text_chars", "max_image_bytes", "max_image_pixels")
# BentoML's rule for the name part of a tag.
_BENTO_NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?")
_REGISTRY_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))")


def bentoml_home() -> Path:
    """The BentoML store clipflow uses: `$BENTOML_HOME` when set, else `./bentoml_home`."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).resolve()


def bentoml_env() -> dict[str, str]:
    """`os.environ` with BENTOML_HOME and BENTOML_DO_NOT_TRACK set, for `bentoml` subprocesses."""
    return {**os.environ, HOME_ENV: str(bentoml_home()), "BENTOML_DO_NOT_TRACK": "true"}


def package(model_uri: str, params: Params, serving_dir: Path = SERVING_DIR) -> dict[str, Any]:
    """Import an MLflow model into the BentoML store and build a Bento serving it.

    Args:
        model_uri: `models:/NAME@ALIAS`, `models:/NAME/VERSION` or any URI MLflow can download
            that holds a clipflow checkpoint.
        params: the resolved params; uses `tracking` and `serve`.
        serving_dir: the folder holding the BentoML service, `serving/` in the repository.

    Returns:
        `bento_tag`, `bento_model_tag`, `model_uri` and `seconds`.

    Raises:
        ClipflowError: the model cannot be resolved or fetched, or the Bento cannot be built.
    """
    start = time.perf_counter()
    # BentoML reads both once per process, so they must be set before it first runs.
    os.environ.update(bentoml_env())
    import bentoml
    from bentoml.exceptions import BentoMLException

    _check_serve_params(params.serve)
    _check_store_home(bentoml_home())
    if not (serving_dir / SERVICE_FILE).is_file():
        raise ClipflowError(f"BentoML service not found: {serving_dir / SERVICE_FILE}")
    tracking.setup(params.tracking)
    fetch_uri, registry = _resolve_registry_version(model_uri)
    labels = {"model_uri": model_uri, **registry}
    try:
        with tempfile.TemporaryDirectory(prefix="clipflow-package-") as tmp:
            checkpoint = download_checkpoint(fetch_uri, Path(tmp) / "mlflow")
            model_tag = _import_model(checkpoint, params.serve, params.evaluate.templates, labels)
            try:
                bento = _build_bento(Path(tmp) / "build", serving_dir, model_tag, params.serve, labels)
            except BaseException:
                # A model that no Bento uses would only clutter the store.
                bentoml.models.delete(model_tag)
                raise
    except BentoMLException as exc:
        raise ClipflowError(f"cannot package {model_uri}: {' '.join(str(exc).split())}") from None
    return {
        "bento_tag": str(bento.tag),
        "bento_model_tag": model_tag,
        "model_uri": model_uri,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _check_serve_params(serve: ServeParams) -> None:
    """Reject what BentoML would refuse only after the model is stored, or with a bare ValueError."""
    if not _BENTO_NAME.fullmatch(serve.bento_name):
        raise ClipflowError(
            f"serve.bento_name must be lowercase letters, digits, '.', '_' or '-', got {serve.bento_name!r}"
        )
    try:
        ipaddress.ip_address(serve.host)
    except ValueError:
        raise ClipflowError(f"serve.host must be an IP address such as 127.0.0.1, got {serve.host!r}") from None


def _check_store_home(home: Path) -> None:
    from bentoml._internal.configuration.containers import BentoMLContainer

    active = Path(BentoMLContainer.bentoml_home.get()).resolve()
    if active != home:
        raise ClipflowError(
            f"BentoML in this process already uses the store {active}; set {HOME_ENV}={home} before it starts"
        )


def _resolve_registry_version(model_uri: str) -> tuple[str, dict[str, str]]:
    """Pin an alias to its version now, so the checkpoint and the recorded version agree.

    Returns the URI to download and registry labels (empty for URIs outside the registry).
    """
    match = _REGISTRY_URI.fullmatch(model_uri)
    if match is None:
        return model_uri, {}
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        if match["alias"]:
            found = client.get_model_version_by_alias(match["name"], match["alias"])
        else:
            found = client.get_model_version(match["name"], match["version"])
    except MlflowException as exc:
        raise ClipflowError(f"cannot resolve {model_uri}: {exc.message.splitlines()[0]}") from None
    labels = {"mlflow_model": found.name, "mlflow_version": str(found.version), "mlflow_run_id": found.run_id or ""}
    return f"models:/{found.name}/{found.version}", labels


def _import_model(checkpoint: Path, serve: ServeParams, templates: list[str], labels: dict[str, str]) -> str:
    """Store the checkpoint as a BentoML model with the serving limits and prompts; returns its tag."""
    import bentoml

    config_name = clip_model.read_checkpoint_info(checkpoint).get("name")
    if not config_name:
        raise ClipflowError(f"{labels['model_uri']} holds a checkpoint that does not name its model config")
    metadata = {
        "limits": {key: getattr(serve, key) for key in LIMITS},
        "templates": list(templates),
        "model_config": config_name,
        **labels,
    }
    with bentoml.models.create(serve.bento_name, labels=labels, metadata=metadata) as stored:
        shutil.copyfile(checkpoint, stored.path_of(clip_model.CHECKPOINT_FILE))
    return str(stored.tag)


def _build_bento(stage: Path, serving_dir: Path, model_tag: str, serve: ServeParams, labels: dict[str, str]) -> Any:
    """Build the Bento from a staged folder holding the service and the clipflow package.

    Staging keeps BentoML from walking the whole repository (data, venv, stores), and carrying
    clipflow's source means the Bento's image needs no clipflow wheel.
    """
    import bentoml

    stage.mkdir(parents=True)
    shutil.copyfile(serving_dir / SERVICE_FILE, stage / SERVICE_FILE)
    clipflow_dir = Path(clip_model.__file__).resolve().parents[1]
    shutil.copytree(clipflow_dir, stage / "clipflow", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    bentofile = stage / "bentofile.yaml"
    bentofile.write_text(
        yaml.safe_dump(
            {
                "service": SERVICE,
                "name": serve.bento_name,
                "labels": {"bento_model": model_tag, **labels},
                "include": [SERVICE_FILE, "clipflow/**"],
                "python": {
                    "packages": [f"{name}=={version(name)}" for name in RUNTIME_DISTRIBUTIONS],
                    # Locking resolves against PyPI, which a build machine may not reach.
                    "lock_packages": False,
                },
                "docker": {"python_version": f"{sys.version_info.major}.{sys.version_info.minor}"},
            }
        )
    )
    return bentoml.bentos.build_bentofile(
        str(bentofile),
        build_ctx=str(stage),
        # The service module stays imported after a first build in this process; reload it so
        # it reads this build's arguments and names this model.
        reload=True,
        args={"model_tag": model_tag, "host": serve.host, "port": serve.port},
    )
