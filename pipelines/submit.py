"""`clipflow submit`: compile for the cluster, upload a pipeline version, start a run, optionally wait.

The KFP API is reached with `kfp.Client` (host and bearer token from flags or $KFP_HOST / $KFP_TOKEN).
With `--wait`, a run that does not succeed is an error, and `--summary` appends the run's result
in Markdown, where GitHub Actions shows it ($GITHUB_STEP_SUMMARY).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from clipflow.errors import ClipflowError
from clipflow.params import Params
from pipelines import params_json
from pipelines.cluster import cluster_overrides, compile_for_cluster

HOST_ENV = "KFP_HOST"
TOKEN_ENV = "KFP_TOKEN"


def submit(
    client,
    pipeline,
    params_file: Path,
    params: Params,
    overrides: list[str],
    version: str,
    experiment: str,
    source: str = "builtin",
    tag: str | None = None,
    wait_seconds: int | None = None,
) -> dict[str, Any]:
    """Compile `pipeline` for the cluster, upload it as version `version`, and start a run.

    Args:
        client: a `kfp.Client`.
        pipeline: the DAG's GraphComponent.
        params_file: the params file the run receives.
        params: `params_file` loaded with `overrides`.
        overrides: `--set` strings, passed on after the cluster's own.
        version: the pipeline version's name (retrain.yml uses the commit SHA).
        experiment: the experiment the run belongs to.
        source: what the run ingests.
        tag: the image tag (default: cluster.image_tag).
        wait_seconds: wait this long for the run to end; None: return once it has started.

    Returns:
        `pipeline_id`, `version_id`, `run_id`, `state` (the last state seen), `version`.

    Raises:
        ClipflowError: the run ended in any state but SUCCEEDED.
    """
    name = pipeline.name
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_for_cluster(pipeline, Path(tmp) / f"{name}.yaml", params_file, params, tag=tag)
        pipeline_id = client.get_pipeline_id(name)
        if pipeline_id is None:
            pipeline_id = client.upload_pipeline(str(package), pipeline_name=name).pipeline_id
        uploaded = client.upload_pipeline_version(str(package), pipeline_version_name=version, pipeline_id=pipeline_id)
    experiment_id = client.create_experiment(experiment).experiment_id
    arguments = {
        "source": source,
        "profile": params.profile or "",
        "overrides": [*cluster_overrides(params, tag), *overrides],
        "params": params_json(params_file),
    }
    run = client.run_pipeline(
        experiment_id=experiment_id,
        job_name=f"{name}-{version}",
        pipeline_id=pipeline_id,
        version_id=uploaded.pipeline_version_id,
        params=arguments,
    )
    result = {
        "pipeline_id": pipeline_id,
        "version_id": uploaded.pipeline_version_id,
        "version": version,
        "run_id": run.run_id,
        "state": run.state,
    }
    if wait_seconds is not None:
        result["state"] = client.wait_for_run_completion(run.run_id, timeout=wait_seconds).state
        if result["state"] != "SUCCEEDED":
            raise ClipflowError(f"run {run.run_id} ended {result['state']}")
    return result


def markdown(result: dict[str, Any], model: dict[str, Any] | None) -> str:
    """The run, and the newest registered model version's metrics and promotion, as a job summary."""
    lines = [
        f"### clipflow run `{result['run_id']}`",
        "",
        f"pipeline version `{result['version']}`: **{result['state']}**",
    ]
    if model:
        verdict = "promoted to champion" if "champion" in model["aliases"] else "not promoted"
        lines += [
            "",
            f"model `{model['name']}` version {model['version']}: **{verdict}**",
            "",
            "| metric | value |",
            "| --- | --- |",
            *(f"| {key} | {value:.4f} |" for key, value in sorted(model["metrics"].items())),
        ]
    return "\n".join(lines) + "\n"


def newest_model(params: Params) -> dict[str, Any] | None:
    """The newest version of `promote.model_name` on the cluster's MLflow server: aliases and its run's metrics."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=params.cluster.tracking_uri)
    versions = client.search_model_versions(f"name='{params.promote.model_name}'", order_by=["version_number DESC"])
    if not versions:
        return None
    newest = client.get_model_version(params.promote.model_name, versions[0].version)
    return {
        "name": newest.name,
        "version": newest.version,
        "aliases": list(newest.aliases),
        "metrics": client.get_run(newest.run_id).data.metrics,
    }
