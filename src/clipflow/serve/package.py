"""The package step: a registered MLflow model, built into a Bento that serves it.

The checkpoint of the model (by default `models:/<promote.model_name>@champion`) goes into the
BentoML model store as a model named `serve.bento_name`, with the `serve:` request limits, the
hosts `/v1/embeddings` may fetch images from (`serve.allow_image_urls`), the prompt templates
of the gated zero-shot set with its name (`Params.served_prompts`), the serving precision
(`serve.precision`) with the numbers of its check, the source URI and what the registry knows of
the version (its number, run, metrics and data version) as metadata. Given an ingested data directory, the model also
carries a gallery index for `search`: the normalised embeddings of the `serve.gallery_split`
images with their keys and captions (see `clipflow.serve.gallery`). Given the `index:` params, it
records them instead (a Lite folder's path made absolute), and the service's `search` reads
`index.alias` in that vector store (`clipflow.index.store`), or at `$CLIPFLOW_INDEX_URI` where it is
deployed; the store need not exist yet, since `clipflow index` runs after `package`.

A Bento that may serve bf16 (`serve.precision` auto or bf16) is built only once bf16 has passed
`clipflow.serve.precision_check` against fp32, on a fixed batch and, given the data, on the
evaluation's zero-shot sets: `auto` is resolved where the Bento is served, whose hardware may differ
from this machine's. The gallery is embedded at the precision this machine would serve.

Then `serving/service.py` and the `clipflow` package are built into a Bento whose arguments name
that exact model tag, the configured host and port, the request body limit and the batching
settings, so `bentoml serve <bento_tag>` (and a container built from the Bento) serve exactly
this model without params.yaml, the data or the MLflow store.

    clipflow package --model models:/clipflow-clip@champion --gallery data/builtin
    BENTOML_HOME=$PWD/bentoml_home bentoml serve <bento_tag>

The caller names the folder of the service (`serving/` of the checkout, which the CLI finds) and
sets `$BENTOML_HOME` before BentoML first uses its store; this module changes no environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

import clipflow
from clipflow import model as clip_model
from clipflow import tracking
from clipflow.artifacts import JsonRecord
from clipflow.errors import ClipflowError
from clipflow.params import IndexParams, Params, ServeParams
from clipflow.registry.models import OPEN_CLIP_KEY, local_checkpoint, registered_version
from clipflow.registry.promote import version_metrics
from clipflow.serve import gallery as clip_gallery
from clipflow.serve.inputs import LIMITS

SERVICE_FILE = "service.py"
PAGE_FILE = "page.html"
SERVICE = "service:Clipflow"
HOME_ENV = "BENTOML_HOME"
DEFAULT_HOME = "bentoml_home"
# What the service and the clipflow modules it loads import (torchvision through open_clip's
# transforms), pinned to this environment's versions, which pyproject.toml pins, so the Bento's
# image runs what was tested here. BentoML pins itself.
RUNTIME_DISTRIBUTIONS = (
    "torch",
    "torchvision",
    "open-clip-torch",
    "pillow",
    "numpy",
    "tqdm",
    "pydantic",
    "starlette",
    "httptools",
    "uvloop",
    "pymilvus",
    "milvus-lite",
)


@dataclass(frozen=True)
class PackageResult(JsonRecord):
    bento_tag: str
    bento_model_tag: str
    model_uri: str
    gallery: dict[str, Any] | None  # split, size, precision embedded at and data_version of the search gallery
    precision: str  # serve.precision as the Bento keeps it: auto, fp32 or bf16
    precision_check: dict[str, float]  # bf16 against fp32 (see `clipflow.serve.precision_check`); empty at fp32
    seconds: float
    index: dict[str, str] | None = None  # the vector store's uri and alias that `search` reads; None: the gallery


def bentoml_home() -> Path:
    """The BentoML store clipflow uses: `$BENTOML_HOME` when set, else `./bentoml_home`; reads only."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).resolve()


def bentoml_env() -> dict[str, str]:
    """A copy of `os.environ` with BENTOML_HOME and BENTOML_DO_NOT_TRACK set, for `bentoml` subprocesses."""
    return {**os.environ, HOME_ENV: str(bentoml_home()), "BENTOML_DO_NOT_TRACK": "true"}


def package(
    model_uri: str, params: Params, serving_dir: Path, gallery: Path | None = None, index: IndexParams | None = None
) -> PackageResult:
    """Import an MLflow model into the BentoML store and build a Bento serving it.

    Args:
        model_uri: `models:/NAME@ALIAS`, `models:/NAME/VERSION` or any URI MLflow can download
            that holds a clipflow checkpoint.
        params: the resolved params; uses `tracking`, `serve`, and `evaluate` (templates, and
            the batch size for embedding the gallery).
        serving_dir: the folder holding the BentoML service and its page, `serving/` in the checkout.
        gallery: an ingested data directory whose `serve.gallery_split` images become the
            search gallery, or None for a Bento whose `search` answers that it has none.
        index: the vector store `search` reads instead of the gallery (usually `params.index`), or None.

    Raises:
        ClipflowError: the model cannot be resolved or fetched, bf16 fails its check against fp32
            (the message holds the numbers), the gallery cannot be read, the Bento cannot be built,
            or BentoML in this process already uses another store than `$BENTOML_HOME` (BentoML
            reads it once per process, on first use).
    """
    start = time.perf_counter()
    import bentoml
    from bentoml.exceptions import BentoMLException

    # Checked at params load too; params built in code reach here unchecked.
    params.serve.check()
    _check_store_home(bentoml_home())
    if not (serving_dir / SERVICE_FILE).is_file():
        raise ClipflowError(f"BentoML service not found: {serving_dir / SERVICE_FILE}")
    if gallery is not None and not Path(gallery).is_dir():
        raise ClipflowError(f"gallery data directory not found: {gallery}")
    tracking.setup(params.tracking)
    fetch_uri, registry = _resolve_registry_version(model_uri)
    labels = {"model_uri": model_uri, **registry.labels}
    try:
        with tempfile.TemporaryDirectory(prefix="clipflow-package-") as tmp:
            checkpoint = local_checkpoint(fetch_uri, folder=Path(tmp))  # any model reference
            clip, precision_check = _checked_model(checkpoint, params, gallery)
            gallery_index, gallery_info = (
                _build_gallery(clip, Path(gallery), params) if gallery is not None else (None, None)
            )
            del clip  # freed before the build: the service loads its own from the stored checkpoint
            model_tag = _import_model(
                checkpoint, params, labels, registry.metrics, precision_check, gallery_index, gallery_info, index
            )
            try:
                bento = _build_bento(Path(tmp) / "build", serving_dir, model_tag, params.serve, labels)
            except BaseException:
                # A model that no Bento uses would only clutter the store.
                bentoml.models.delete(model_tag)
                raise
    except BentoMLException as exc:
        raise ClipflowError(f"cannot package {model_uri}: {' '.join(str(exc).split())}") from None
    return PackageResult(
        bento_tag=str(bento.tag),
        bento_model_tag=model_tag,
        model_uri=model_uri,
        gallery=gallery_info,
        precision=params.serve.precision,
        precision_check=precision_check,
        seconds=round(time.perf_counter() - start, 3),
        index={"uri": index.uri, "alias": index.alias} if index is not None else None,
    )


def _check_store_home(home: Path) -> None:
    from clipflow.serve.bentoml_patches import store_home

    active = store_home()
    if active != home:
        raise ClipflowError(
            f"BentoML in this process already uses the store {active}; set {HOME_ENV}={home} before it starts"
        )


@dataclass(frozen=True)
class RegistryFacts:
    """What the MLflow registry records about the packaged version; empty outside the registry."""

    labels: dict[str, str] = field(default_factory=dict)  # mlflow_model, mlflow_version, ...
    metrics: dict[str, float] = field(default_factory=dict)  # the version's `metric.*` tags


def _resolve_registry_version(model_uri: str) -> tuple[str, RegistryFacts]:
    """Pin an alias to its version now, so the checkpoint and the recorded facts agree.

    Returns the URI to download and the registry's facts about that version: its name, number
    and run, the data version it was trained on, and the metrics promote tagged it with.
    """
    found = registered_version(model_uri)
    if found is None:
        return model_uri, RegistryFacts()
    labels = {"mlflow_model": found.name, "mlflow_version": str(found.version), "mlflow_run_id": found.run_id or ""}
    if found.tags.get("data_version"):
        labels["data_version"] = found.tags["data_version"]
    return f"models:/{found.name}/{found.version}", RegistryFacts(labels, version_metrics(found))


def _checked_model(
    checkpoint: Path, params: Params, data_dir: Path | None
) -> tuple[clip_model.ClipModel, dict[str, float]]:
    """The packaged model at the precision this machine would serve it, and the numbers of bf16's check.

    Raises:
        ClipflowError: bf16 may be served and fails its check against fp32.
    """
    from clipflow.model.precision import resolve_precision
    from clipflow.serve.precision_check import check_precision

    fp32 = clip_model.load(checkpoint)
    if params.serve.precision == "fp32":
        return fp32, {}
    bf16 = fp32.at_precision("bf16")
    numbers = check_precision(fp32, bf16, params, Path(data_dir) if data_dir is not None else None)
    return (bf16 if resolve_precision(params.serve.precision) == "bf16" else fp32), numbers


def _build_gallery(
    clip: clip_model.ClipModel, data_dir: Path, params: Params
) -> tuple[clip_gallery.Gallery, dict[str, Any]]:
    """Embed the gallery split of `data_dir` with the packaged model; returns it and its summary."""
    from clipflow.artifacts import INGEST_REPORT, IngestReport

    index = clip_gallery.build(
        clip,
        data_dir,
        params.serve.gallery_split,
        params.evaluate.batch_size,
        params.serve.thumbnail_px,
    )
    info: dict[str, Any] = {"split": params.serve.gallery_split, "size": len(index), "precision": clip.precision}
    if (data_dir / INGEST_REPORT).is_file():
        info["data_version"] = IngestReport.read(data_dir).data_version
    return index, info


def _import_model(
    checkpoint: Path,
    params: Params,
    labels: dict[str, str],
    metrics: dict[str, float],
    precision_check: dict[str, float],
    gallery: clip_gallery.Gallery | None,
    gallery_info: dict[str, Any] | None,
    index: IndexParams | None,
) -> str:
    """Store the checkpoint (and gallery) as a BentoML model with what the service reads; returns its tag.

    The model also holds the same weights in open_clip's layout (`open_clip/`), as the MLflow model does.
    """
    import bentoml

    from clipflow.model.export import write_open_clip

    config_name = clip_model.read_checkpoint_info(checkpoint).get("name")
    if not config_name:
        raise ClipflowError(f"{labels['model_uri']} holds a checkpoint that does not name its model config")
    # `classify` serves the prompt ensemble that the gated zero-shot metric was measured with.
    served_set, templates = params.served_prompts()
    metadata = {
        "limits": {key: getattr(params.serve, key) for key in LIMITS},
        "allow_image_urls": list(params.serve.allow_image_urls),
        "templates": list(templates),
        "zeroshot_set": served_set or "",  # BentoML metadata cannot hold None
        "model_config": config_name,
        "precision": params.serve.precision,
        "precision_check": precision_check,
        "metrics": metrics,
        **labels,
    }
    if gallery_info is not None:  # BentoML metadata cannot hold None
        metadata["gallery"] = gallery_info
    if index is not None:
        # A relative Lite folder would resolve against wherever the Bento is served from.
        uri = index.uri if index.is_server else str(Path(index.uri).resolve())
        metadata["index"] = json.dumps(dataclasses.asdict(dataclasses.replace(index, uri=uri)))  # holds None
    with bentoml.models.create(params.serve.bento_name, labels=labels, metadata=metadata) as stored:
        shutil.copyfile(checkpoint, stored.path_of(clip_model.CHECKPOINT_FILE))
        layout = Path(stored.path_of(OPEN_CLIP_KEY))
        layout.mkdir()
        write_open_clip(clip_model.load(checkpoint), layout)
        if gallery is not None:
            gallery.save(Path(stored.path))
    return str(stored.tag)


def _build_bento(stage: Path, serving_dir: Path, model_tag: str, serve: ServeParams, labels: dict[str, str]) -> Any:
    """Build the Bento from a staged folder holding the service and the clipflow package.

    Staging keeps BentoML from walking the whole repository (data, venv, stores), and carrying
    clipflow's source means the Bento's image needs no clipflow wheel.
    """
    import bentoml

    stage.mkdir(parents=True)
    for name in (SERVICE_FILE, PAGE_FILE):
        shutil.copyfile(serving_dir / name, stage / name)
    clipflow_dir = Path(clipflow.__file__).resolve().parent  # the installed package, not the checkout
    shutil.copytree(clipflow_dir, stage / "clipflow", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    bentofile = stage / "bentofile.yaml"
    bentofile.write_text(
        yaml.safe_dump(
            {
                "service": SERVICE,
                "name": serve.bento_name,
                "labels": {"bento_model": model_tag, **labels},
                "include": [SERVICE_FILE, PAGE_FILE, "clipflow/**"],
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
        args={
            "model_tag": model_tag,
            "host": serve.host,
            "port": serve.port,
            "max_request_bytes": serve.max_request_bytes,
            "batching": serve.batching,
            "batch_max_size": serve.batch_max_size,
            "batch_max_latency_ms": serve.batch_max_latency_ms,
            "max_waiting": serve.max_waiting,
            "tracing": serve.tracing,
        },
    )
