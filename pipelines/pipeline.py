"""The clipflow DAG: ingest -> validate -> train -> evaluate -> promote -> package, then optionally index.

The same definition compiles to a Kubeflow Pipelines YAML (`clipflow compile`) and runs on
one machine through `kfp.local` (`clipflow run`). Every step receives the text of params.yaml
plus `overrides` (the `--set` strings), so the Kubeflow UI and the CLI speak the same keys.
"""

from typing import NamedTuple

from kfp import dsl

from components.evaluate import evaluate_component
from components.ingest import ingest_component
from components.package import package_component
from components.promote import promote_component
from components.train import train_component
from components.validate import validate_component
from pipelines import DEFAULT_PARAMS
from pipelines.cluster import apply_target
from pipelines.reindex import index_step

PIPELINE_NAME = "clipflow"
# The steps in DAG order; the run summary and the tests read them from here.
STEPS = ("ingest", "validate", "train", "evaluate", "promote", "package")


@dsl.pipeline(name=PIPELINE_NAME, description="Train, evaluate, promote and package a CLIP model.")
def clipflow_pipeline(
    source: str = "builtin",
    overrides: list = [],  # noqa: B006 - KFP pipeline defaults are compiled into the spec, never mutated
    profile: str = "",
    params: str = DEFAULT_PARAMS,
    resume: str = "",
    index_source: str = "",
) -> NamedTuple(
    "ClipflowOutputs",
    [
        ("ingest_report", str),
        ("validate_report", str),
        ("train_report", str),
        ("evaluate_report", str),
        ("promote_report", str),
        ("package_report", str),
    ],
):
    """The whole DAG.

    Args:
        source: what to ingest: `builtin` or a manifest/shard location.
        overrides: params overrides, `section.key=value` strings, as `clipflow --set` takes them.
        profile: a params profile (`test` for the small one), or empty.
        params: the content of params.yaml as JSON; defaults to the repository's params.yaml.
        resume: empty to train from scratch; `latest` (the newest checkpoint in `train.checkpoint_dir`)
            or a checkpoint location to continue a stopped training. A new pipeline run sees an
            earlier run's checkpoints only where `train.checkpoint_dir` is shared storage (`s3://`).
        index_source: empty for no index step; else, after packaging, the champion embeds this catalogue
            (`ingested` for the data this run ingested, or a data folder, shards or a manifest) and
            the new collection is swapped in under `index.alias`. A catalogue too large for one
            pod goes through the reindex pipeline (`pipelines.reindex`), which spreads it over pods.
    """
    common = {"params": params, "overrides": overrides, "profile": profile}
    ingest = ingest_component(source=source, **common).set_display_name("Ingest")
    validate = validate_component(data=ingest.outputs["data"], **common).set_display_name("Validate")
    train = (
        train_component(data=ingest.outputs["data"], resume=resume, **common).set_display_name("Train").after(validate)
    )
    evaluate = evaluate_component(
        data=ingest.outputs["data"],
        model=train.outputs["model"],
        mlflow_run_id=train.outputs["mlflow_run_id"],
        model_uri=train.outputs["model_uri"],
        **common,
    ).set_display_name("Evaluate")
    # The model evaluate judged: the trained one, or the WiSE-FT mix of it with its starting model it chose.
    promote = promote_component(
        model_uri=evaluate.outputs["model_uri"],
        metrics_json=evaluate.outputs["metrics_json"],
        data_version=ingest.outputs["data_version"],
        **common,
    ).set_display_name("Promote")
    package = package_component(
        model_name=promote.outputs["model_name"], data=ingest.outputs["data"], index_source=index_source, **common
    ).set_display_name("Package")
    apply_target(dict(zip(STEPS, (ingest, validate, train, evaluate, promote, package), strict=True)))
    with dsl.If(index_source != "", name="index-requested"):
        index_step(common, index_source, ingest.outputs["data"]).after(package)
    outputs = NamedTuple(
        "ClipflowOutputs",
        [(f"{step}_report", str) for step in STEPS],
    )
    return outputs(
        ingest.outputs["report"],
        validate.outputs["Output"],
        train.outputs["report"],
        evaluate.outputs["report"],
        promote.outputs["report"],
        package.output,
    )
