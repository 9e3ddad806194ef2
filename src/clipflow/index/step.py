"""The index step: a catalogue embedded with one pinned model version, then published behind the served alias.

`clipflow index`, the DAG's optional index step and the reindex pipeline all come through here. An
alias (`models:/NAME@champion`) is pinned to the version it names when the step starts, so every
part, the artifact's manifest and the published collection describe the same model even if a
promotion moves the alias meanwhile. By default the artifact's folder is named after that version
and the catalogue's data version: a new champion or a changed catalogue writes a new artifact (and
collection), and a re-run of the same resumes the same one.
"""

from __future__ import annotations

import re
import time
from typing import Any

from clipflow.params import Params


def pinned_model(reference: str, params: Params) -> str:
    """`models:/NAME@ALIAS` as `models:/NAME/VERSION`, the version the alias names now; other references as given.

    Raises:
        ClipflowError: the registry has no such model or alias.
    """
    from clipflow.registry.models import is_model_uri, registered_version

    if not is_model_uri(reference):
        return reference
    from clipflow import tracking

    tracking.setup(params.tracking)
    version = registered_version(reference)
    return reference if version is None else f"models:/{version.name}/{version.version}"


def default_output(source: str, model: str, params: Params) -> str:
    """Where the embeddings of `source` by `model` (pinned) go unless told: `<index.artifact_root>/<model>-<data
    version>`, a folder or an S3 prefix."""
    from clipflow.index.embed import catalogue_version

    model_name = re.sub(r"[^A-Za-z0-9._-]+", "-", model.removeprefix("models:/")).strip("-")
    return f"{params.index.artifact_root.rstrip('/')}/{model_name}-{catalogue_version(source, params)}"


def build_index(source: str, model: str, output: str | None, params: Params, publish: bool = True) -> dict[str, Any]:
    """Embed `source` with `model` into `output` (resuming it), then publish it under `index.alias`.

    Args:
        source: an ingested data folder, WebDataset shards or a manifest.
        model: a model reference; an alias is pinned to its version first.
        output: the artifact's folder, or None for `default_output`.
        params: the whole params.
        publish: False only embeds, leaving the store and its alias as they are.

    Returns:
        The artifact's manifest, its folder (`artifact`), when published the store's report (`store`), and
        the step's `seconds`.

    Raises:
        ClipflowError: bad input, as `embed_catalogue` and `store.publish` raise it.
    """
    from clipflow.index.embed import embed_catalogue

    started = time.perf_counter()
    pinned = pinned_model(model, params)
    output = output or default_output(source, pinned, params)
    manifest = embed_catalogue(source, pinned, output, params)
    report = {**manifest.to_dict(), "artifact": output}
    if publish:
        from clipflow.index.store import publish as publish_artifact

        report["store"] = publish_artifact(output, params.index)
    return {**report, "seconds": round(time.perf_counter() - started, 2)}
