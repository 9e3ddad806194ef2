"""The one module that patches BentoML's private modules: it patches only the pinned BentoML version."""

from __future__ import annotations

import functools
import re
import tomllib

import pytest
from _bentoml_impl import serde
from _bentoml_impl.server import app
from _bentoml_sdk.service import openapi
from bentoml._internal.server.http import instruments

from clipflow.errors import ClipflowError
from clipflow.serve import bentoml_patches
from clipflow.serve.dispatch import FillingDispatcher
from clipflow.serve.http import StrictJSONSerde, StrictMultipartSerde
from tests.support import REPO

STRICT_SERDES = (StrictJSONSerde, StrictMultipartSerde)


@pytest.fixture
def unpatched(monkeypatch):
    """BentoML's service app, parser table and metrics as BentoML ships them; as they were again after the test."""
    monkeypatch.setattr(app, "CorkDispatcher", bentoml_patches.CorkDispatcher)
    monkeypatch.setattr(app, "log_exception", bentoml_patches._log_exception)
    monkeypatch.setattr(instruments, "RunnerTrafficMetricsMiddleware", bentoml_patches._instruments_middleware)
    monkeypatch.setattr(app.ServiceAppFactory, "api_endpoint_wrapper", bentoml_patches._api_endpoint_wrapper)
    monkeypatch.setattr(openapi, "generate_spec", bentoml_patches._generate_spec)
    monkeypatch.setitem(serde.ALL_SERDE, StrictJSONSerde.media_type, serde.JSONSerde)
    monkeypatch.setitem(serde.ALL_SERDE, StrictMultipartSerde.media_type, serde.MultipartSerde)
    return app.CorkDispatcher, dict(serde.ALL_SERDE)


def test_the_pinned_version_is_the_one_pyproject_pins_and_the_one_installed():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [match[1] for dep in dependencies if (match := re.fullmatch(r"bentoml==(\S+)", dep.strip()))]
    assert pins == [bentoml_patches.PINNED_VERSION]
    assert bentoml_patches.installed_version() == bentoml_patches.PINNED_VERSION


def test_install_refuses_another_bentoml_version_and_patches_nothing(monkeypatch, unpatched):
    dispatcher, parsers = unpatched
    monkeypatch.setattr(bentoml_patches, "version", lambda name: "1.4.41" if name == "bentoml" else "0")
    with pytest.raises(ClipflowError, match=r"BentoML 1\.4\.40.*BentoML 1\.4\.41 is installed.*bentoml==1\.4\.40"):
        bentoml_patches.install(functools.partial(FillingDispatcher, lanes=2), STRICT_SERDES)
    assert app.CorkDispatcher is dispatcher
    assert parsers == serde.ALL_SERDE
    with pytest.raises(ClipflowError, match=r"1\.4\.41"):
        bentoml_patches.store_home()


def test_install_on_the_pinned_version_patches_the_dispatcher_and_the_parsers(unpatched):
    dispatcher, _ = unpatched
    assert not isinstance(
        dispatcher(max_latency_in_ms=1000, max_batch_size=4, fallback=lambda: None), FillingDispatcher
    )
    bentoml_patches.install(functools.partial(FillingDispatcher, lanes=2), STRICT_SERDES)
    built = app.CorkDispatcher(max_latency_in_ms=1000, max_batch_size=4, fallback=lambda: None)
    assert isinstance(built, FillingDispatcher) and built._sema.sema == 2
    assert serde.ALL_SERDE["application/json"] is StrictJSONSerde
    assert serde.ALL_SERDE["multipart/form-data"] is StrictMultipartSerde
    assert issubclass(instruments.RunnerTrafficMetricsMiddleware, bentoml_patches._instruments_middleware)
    assert app.log_exception is bentoml_patches._log_request_error
    assert app.ServiceAppFactory.api_endpoint_wrapper is bentoml_patches._error_as_object
    assert openapi.generate_spec is bentoml_patches._generate_spec  # no rewrite given: BentoML's spec
    # The subclasses stand on the classes BentoML's own code uses.
    assert issubclass(FillingDispatcher, bentoml_patches.CorkDispatcher)
    assert issubclass(StrictJSONSerde, serde.JSONSerde) and issubclass(StrictMultipartSerde, serde.MultipartSerde)


def test_only_the_patches_module_imports_bentomls_private_modules():
    private = re.compile(r"^\s*(from|import)\s+(bentoml\._internal|_bentoml_impl)\b", re.MULTILINE)
    sources = [*(REPO / "src" / "clipflow").rglob("*.py"), *(REPO / "serving").glob("*.py")]
    users = sorted(str(path.relative_to(REPO)) for path in sources if private.search(path.read_text()))
    assert users == ["src/clipflow/serve/bentoml_patches.py"]
