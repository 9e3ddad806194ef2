"""The index step: embed a catalogue with a model and publish it to the vector store behind the served alias.

Three components, so a catalogue's parts can be split across pods: `plan_index_component` pins the
model version and groups the parts, `embed_index_component` embeds one group (a pod of a
`dsl.ParallelFor`), and `index_component` embeds whatever is left, writes the artifact's manifest
and swaps the new collection in. Alone, `index_component` is the whole step, as the main DAG runs it.

A catalogue is a source location, or `ingested` for the `data` artifact of the run's own ingest step.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input

from components import CLIPFLOW_IMAGE, compile_main


@dsl.component(base_image=CLIPFLOW_IMAGE)
def plan_index_component(
    params: str,
    overrides: list,
    profile: str,
    source: str,
    model: str,
    output: str,
    pods: int,
    data: Input[Dataset] = None,
) -> NamedTuple("IndexPlan", [("model", str), ("output", str), ("groups", list)]):
    """Pin the model to one registry version, choose the artifact's location, and split the parts into groups.

    Args:
        params: the content of params.yaml, as JSON.
        overrides: `section.key=value` strings applied on top of it.
        profile: a params profile name, or "" for none.
        source: the catalogue: a data folder, shards or a manifest, or `ingested` for `data`.
        model: a model reference, or "" for the champion of `promote.model_name`.
        output: where the embeddings go, or "" for the default location of this model and source.
        pods: how many groups to make: the pods that embed in parallel.
        data: the run's ingested data, when `source` is `ingested`.

    Returns:
        The pinned model URI, the artifact's location, and the part numbers of each pod.
    """
    from collections import namedtuple

    from clipflow.index.embed import plan_parts
    from clipflow.index.step import default_output, pinned_model
    from clipflow.params import parse_params
    from components import catalogue_source

    resolved = parse_params(params, overrides, profile or None)
    catalogue = catalogue_source(source, data)
    pinned = pinned_model(model or f"models:/{resolved.promote.model_name}@champion", resolved)
    parts = plan_parts(catalogue, resolved)
    groups = [parts[pod::pods] for pod in range(min(pods, len(parts)))]
    location = output or default_output(catalogue, pinned, resolved)
    return namedtuple("IndexPlan", ["model", "output", "groups"])(pinned, location, groups)


@dsl.component(base_image=CLIPFLOW_IMAGE)
def embed_index_component(
    params: str,
    overrides: list,
    profile: str,
    source: str,
    model: str,
    output: str,
    parts: list,
    data: Input[Dataset] = None,
) -> str:
    """Embed the parts `parts` of the catalogue into the artifact at `output` (one pod's share).

    Returns:
        The parts embedded, as JSON.
    """
    import json

    from clipflow.index.embed import embed_catalogue
    from clipflow.params import parse_params
    from components import catalogue_source

    resolved = parse_params(params, overrides, profile or None)
    # KFP passes a list of numbers through JSON, where they may arrive as floats.
    numbers = [int(part) for part in parts]
    embed_catalogue(catalogue_source(source, data), model, output, resolved, parts=numbers)
    return json.dumps({"parts": numbers})


@dsl.component(base_image=CLIPFLOW_IMAGE)
def index_component(
    params: str,
    overrides: list,
    profile: str,
    source: str,
    model: str,
    output: str,
    data: Input[Dataset] = None,
) -> str:
    """Embed every part not yet embedded, write the artifact's manifest, and publish it behind `index.alias`.

    Args:
        model: a model reference, or "" for the champion of `promote.model_name`.
        output: the artifact's location, or "" for the default location of this model and source.

    Returns:
        The step's JSON report: the artifact's manifest and the store's collection, alias and rows.
    """
    import json

    from clipflow.index.step import build_index
    from clipflow.params import parse_params
    from components import catalogue_source

    resolved = parse_params(params, overrides, profile or None)
    model = model or f"models:/{resolved.promote.model_name}@champion"
    return json.dumps(build_index(catalogue_source(source, data), model, output or None, resolved))


if __name__ == "__main__":
    compile_main(index_component)
