"""Re-index a catalogue with the champion of the moment (after a promotion, or when the catalogue grew).

Plan (pin the model version, group the parts), a `dsl.ParallelFor` of embedding tasks (one per group:
a pod each on Kubeflow), then the index step, which finds every part embedded, writes the manifest and
swaps the new collection in under the alias the endpoint searches. The main DAG's optional index step
is that last component alone (`index_step`), embedding in one pod: kfp.local 2.17 cannot run a
ParallelFor over a task's output inside a `dsl.If` (its parent lookup of the items fails).
"""

from kfp import dsl

from components.index import embed_index_component, index_component, plan_index_component
from pipelines import DEFAULT_PARAMS
from pipelines.cluster import apply_index_target

REINDEX_PIPELINE_NAME = "clipflow-reindex"
# The main DAG's index step, as `clipflow run` names it.
INDEX_STEPS = ("index",)


def index_step(common: dict, source, data) -> dsl.PipelineTask:
    """The main DAG's index step: the champion embeds `source` (`ingested`: `data`) and is swapped in."""
    task = index_component(source=source, model="", output="", data=data, **common).set_display_name("Index")
    apply_index_target([task], [])
    return task


@dsl.pipeline(name=REINDEX_PIPELINE_NAME, description="Embed a catalogue with a model and swap it in for search.")
def clipflow_reindex(
    source: str,
    model: str = "",
    output: str = "",
    index_pods: int = 1,
    overrides: list = [],  # noqa: B006 - KFP pipeline defaults are compiled into the spec, never mutated
    profile: str = "",
    params: str = DEFAULT_PARAMS,
) -> str:
    """Re-index a catalogue.

    Args:
        source: the catalogue: an ingested data folder, WebDataset shards or a manifest (local or s3://).
        model: a model reference (default: the champion of `promote.model_name`, pinned to its version).
        output: where the embeddings go (default: a folder named after the model version and the source).
        index_pods: embedding tasks in parallel (`clipflow compile --target cluster` sets `cluster.index_pods`).
        overrides: params overrides, `section.key=value` strings.
        profile: a params profile, or empty.
        params: the content of params.yaml as JSON.
    """
    inputs = {"params": params, "overrides": overrides, "profile": profile, "source": source}
    plan = plan_index_component(model=model, output=output, pods=index_pods, **inputs).set_display_name("Plan index")
    # As many groups as pods (the plan makes them), so every group runs at once.
    with dsl.ParallelFor(plan.outputs["groups"]) as parts:
        embed = embed_index_component(
            model=plan.outputs["model"], output=plan.outputs["output"], parts=parts, **inputs
        ).set_display_name("Embed catalogue")
    publish = (
        index_component(model=plan.outputs["model"], output=plan.outputs["output"], **inputs)
        .set_display_name("Index")
        .after(embed)
    )
    apply_index_target([embed], [plan, publish])
    return publish.output
