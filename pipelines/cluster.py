"""The cluster build of the pipeline: images, Secrets, resources, retries, caching and the TrainJob launcher.

The DAG in `pipelines/pipeline.py` is one definition for both targets. Its body hands its tasks
to `apply_target`, which does nothing unless `compile_for_cluster` is rebuilding the pipeline,
so `clipflow run` (kfp.local) and the default `clipflow compile` stay exactly as they are.
"""

from __future__ import annotations

import contextvars
import dataclasses
from pathlib import Path
from typing import Any

from clipflow.params import ClusterParams, Params
from clipflow.train.trainjob import MLFLOW_KEYS, S3_KEYS, STEP_IMAGE, image
from pipelines import params_json

LAUNCHER_ENV = "CLIPFLOW_LAUNCHER"
# Steps whose outputs are a function of their inputs alone; the others write to MLflow or the registry.
PURE_STEPS = frozenset({"ingest", "validate"})
RETRY_BACKOFF = "60s"

_target: contextvars.ContextVar[ClusterParams | None] = contextvars.ContextVar("cluster_target", default=None)


def apply_target(tasks: dict[str, Any]) -> None:
    """Give each step (name -> PipelineTask) its cluster settings while compiling for a cluster."""
    from kfp import kubernetes

    cluster = _target.get()
    if cluster is None:
        return
    for step, task in tasks.items():
        resources = cluster.resources[step]
        task.set_container_image(image(cluster, STEP_IMAGE))
        task.set_cpu_request(resources.cpu).set_memory_request(resources.memory)
        task.set_caching_options(step in PURE_STEPS)
        if resources.retries:
            task.set_retry(resources.retries, backoff_duration=RETRY_BACKOFF)
        required, optional = S3_KEYS[:2], S3_KEYS[2:]
        kubernetes.use_secret_as_env(task, cluster.s3_secret, {key: key for key in required})
        kubernetes.use_secret_as_env(task, cluster.s3_secret, {key: key for key in optional}, optional=True)
        kubernetes.use_secret_as_env(task, cluster.mlflow_secret, {key: key for key in MLFLOW_KEYS}, optional=True)
    tasks["train"].set_env_variable(LAUNCHER_ENV, cluster.launcher)


def cluster_overrides(params: Params, tag: str | None) -> list[str]:
    """The `overrides` a cluster run starts from: the image tag the steps run and the MLflow server."""
    return [f"cluster.image_tag={tag or params.cluster.image_tag}", f"tracking.uri={params.cluster.tracking_uri}"]


def compile_for_cluster(
    pipeline, output: str | Path, params_file: str | Path, params: Params, tag: str | None = None
) -> Path:
    """Compile `pipeline` (the DAG's GraphComponent) for Kubeflow with `params.cluster`'s settings.

    The compiled defaults are the params file and `cluster_overrides`, so a run started from the
    Kubeflow UI without arguments trains on the cluster with the images of this tag.
    """
    from kfp import compiler, dsl

    cluster = dataclasses.replace(params.cluster, image_tag=tag or params.cluster.image_tag)
    token = _target.set(cluster)
    try:
        rebuilt = dsl.pipeline(name=pipeline.name, description=pipeline.description)(pipeline.pipeline_func)
    finally:
        _target.reset(token)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    defaults = {
        "params": params_json(params_file),
        "overrides": cluster_overrides(params, cluster.image_tag),
        "profile": params.profile or "",
    }
    compiler.Compiler().compile(rebuilt, str(output), pipeline_parameters=defaults)
    return output
