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
from clipflow.train.trainjob import MLFLOW_KEYS, S3_KEYS, STEP_IMAGE, TRAIN_IMAGE, image
from pipelines import params_json

LAUNCHER_ENV = "CLIPFLOW_LAUNCHER"
# Steps whose outputs are a function of their inputs alone; the others write to MLflow or the registry.
PURE_STEPS = frozenset({"ingest", "validate"})
RETRY_BACKOFF = "60s"
# The pipeline parameter that sets how many pods embed a catalogue (the DAG's and the reindex pipeline's).
INDEX_PODS_INPUT = "index_pods"

_target: contextvars.ContextVar[ClusterParams | None] = contextvars.ContextVar("cluster_target", default=None)


def apply_target(tasks: dict[str, Any]) -> None:
    """Give each step (name -> PipelineTask) its cluster settings while compiling for a cluster."""
    cluster = _target.get()
    if cluster is None:
        return
    for step, task in tasks.items():
        _configure(task, cluster, step)
    tasks["train"].set_env_variable(LAUNCHER_ENV, cluster.launcher)


def apply_index_target(embedding: list[Any], others: list[Any]) -> None:
    """The index steps' cluster settings: `resources.index` each, GPUs (the CUDA image) for the tasks that embed."""
    cluster = _target.get()
    if cluster is None:
        return
    for task in (*embedding, *others):
        _configure(task, cluster, "index")
    if cluster.index_gpus_per_pod:
        for task in embedding:
            task.set_container_image(image(cluster, TRAIN_IMAGE))
            task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(cluster.index_gpus_per_pod)


def _configure(task: Any, cluster: ClusterParams, step: str) -> None:
    """A step's image, requests, caching, retries and the Secrets' keys as environment variables."""
    from kfp import kubernetes

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


def cluster_overrides(params: Params, tag: str | None) -> list[str]:
    """The `overrides` a cluster run starts from: the image tag the steps run, the MLflow server, the Milvus server
    and the S3 prefix the embedding pods share."""
    cluster = params.cluster
    return [
        f"cluster.image_tag={tag or cluster.image_tag}",
        f"tracking.uri={cluster.tracking_uri}",
        f"index.uri={cluster.index_uri}",
        f"index.artifact_root={cluster.index_root}",
    ]


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
    if INDEX_PODS_INPUT in pipeline.component_spec.inputs:
        defaults[INDEX_PODS_INPUT] = cluster.index_pods
    compiler.Compiler().compile(rebuilt, str(output), pipeline_parameters=defaults)
    return output
