"""Session fixtures for the tests of the served Bento: one champion, packaged once, served per module.

Loaded by `tests/conftest.py` (`pytest_plugins`), so the serving, page and load tests share one
package step. Serving limits are lowered through params so the 4xx paths are cheap to reach and
are known to come from the packaged model, not from the service's code. Those Bentos serve fp32
whatever the CPU; `packaged_bf16` packages the same champion at bf16 when a test asks for it.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.servers import bentoml_server, free_port

MAX_LABELS = 8
MAX_IMAGE_PIXELS = 128 * 128
MAX_IMAGE_BYTES = 60_000
MAX_TEXT_CHARS = 200
MAX_TEXTS = 64
MAX_BATCH = 4
MAX_K = 20
MAX_PROMPTS = 12
MAX_REQUEST_BYTES = 1_000_000
API_KEY = "test-key-0123456789"
# The one host /v1/embeddings may fetch image URLs from: the tests' own image server.
IMAGE_URL_HOST = "127.0.0.1"
# The service `package()` builds: the checkout's, as the CLI passes it.
SERVING = REPO / "serving"
METRICS = {"zeroshot_top1_heldout": 0.25, "retrieval_i2t_r1": 0.125}


@pytest.fixture(scope="session")
def packaged(tmp_path_factory, small_params):
    """A champion registered in a fresh MLflow store, packaged twice into a fresh BentoML store:
    with a gallery of the ingested test split, and without one."""
    import mlflow

    from clipflow import model as clip_model
    from clipflow import tracking
    from clipflow.data.ingest import ingest
    from clipflow.params import load_params
    from clipflow.registry.models import log_clip_model
    from clipflow.serve.package import package

    tmp = tmp_path_factory.mktemp("serving")
    params = load_params(
        REPO / "params.yaml",
        overrides=[
            f"tracking.uri=sqlite:///{tmp}/mlflow.db",
            "tracking.experiment=t",
            f"serve.max_labels={MAX_LABELS}",
            f"serve.max_image_pixels={MAX_IMAGE_PIXELS}",
            f"serve.max_image_bytes={MAX_IMAGE_BYTES}",
            f"serve.max_text_chars={MAX_TEXT_CHARS}",
            f"serve.max_texts={MAX_TEXTS}",
            f"serve.max_batch={MAX_BATCH}",
            f"serve.max_k={MAX_K}",
            f"serve.max_prompts={MAX_PROMPTS}",
            f"serve.max_request_bytes={MAX_REQUEST_BYTES}",
            f"serve.allow_image_urls=[{IMAGE_URL_HOST}]",
            "serve.precision=fp32",
        ],
        profile="test",
    )
    data = ingest("builtin", tmp / "data", small_params.data)
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BENTOML_HOME", str(tmp / "bentoml"))
        tracking.setup(params.tracking)
        model = clip_model.create("CLIP-Tiny")
        checkpoint = clip_model.save_checkpoint(tmp / "checkpoint", model.model, "CLIP-Tiny", extra={})
        with mlflow.start_run():
            logged_uri = log_clip_model(checkpoint)
        name = params.promote.model_name
        # The tags `clipflow promote` writes on a version.
        tags = {**{f"metric.{k}": str(v) for k, v in METRICS.items()}, "data_version": data.data_version}
        registered = mlflow.register_model(logged_uri, name, tags=tags)
        mlflow.MlflowClient().set_registered_model_alias(name, "champion", registered.version)

        result = package(f"models:/{name}@champion", params, SERVING, gallery=tmp / "data")
        print(f"package() with a {result.gallery['size']}-image gallery took {result.seconds:.2f} s")
        bare = package(f"models:/{name}@champion", params, SERVING)
        print(f"package() without a gallery took {bare.seconds:.2f} s")
        yield {
            "result": result,
            "bare": bare,
            "params": params,
            "version": str(registered.version),
            "data": data,
            "tmp": tmp,
        }
    mlflow.set_tracking_uri(previous_uri)


@pytest.fixture(scope="session")
def packaged_bf16(packaged):
    """The champion of `packaged`, with its gallery, packaged at `serve.precision=bf16` into the same store
    (`packaged` keeps its BENTOML_HOME and tracking URI set for the session)."""
    from clipflow.serve.package import package

    params = packaged["params"]
    # The test profile's model is near chance, where bf16's rounding flips the argmax among near-equal logits on
    # a few of the 200 images: the default 0.01 (two images) is for models that have learnt something, and its
    # refusal has tests of its own (tests/unit/test_precision.py).
    serve = dataclasses.replace(params.serve, precision="bf16", precision_max_top1_drop=0.05)
    params = dataclasses.replace(params, serve=serve)
    model_uri = f"models:/{params.promote.model_name}@champion"
    result = package(model_uri, params, SERVING, gallery=packaged["tmp"] / "data")
    print(f"package() at bf16, checked against fp32 ({result.precision_check}), took {result.seconds:.2f} s")
    return {**packaged, "result": result, "params": params}


@pytest.fixture(scope="module")
def server(packaged):
    """The Bento with its gallery, served without an API key; one server per test module."""
    with serve_bento(packaged["result"].bento_tag, packaged["tmp"]) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_server(packaged):
    """The Bento without a gallery, served with an API key."""
    with serve_bento(packaged["bare"].bento_tag, packaged["tmp"], CLIPFLOW_API_KEY=API_KEY) as url:
        yield url


def serve_bento(bento_tag: str, tmp: Path, **env: str):
    """`bentoml serve <bento_tag>` on a free port; always stopped, logs shown when it fails.

    Each server gets its own BENTOML_HOME over the shared store: BentoML keeps Prometheus
    metrics in a folder of its home that a starting server empties, which would wipe the
    metrics of a server already running.
    """
    from clipflow.serve.package import bentoml_env, bentoml_home

    port = free_port()
    home = tmp / f"home-{port}"
    home.mkdir()
    for name in ("bentos", "models"):
        (home / name).symlink_to(bentoml_home() / name)
    command = [sys.executable, "-m", "bentoml", "serve", bento_tag, "--host", "127.0.0.1", "--port", str(port)]
    return bentoml_server(command, port, {**bentoml_env(), **env, "BENTOML_HOME": str(home)}, tmp)
