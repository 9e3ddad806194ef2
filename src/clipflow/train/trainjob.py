"""Multi-node training on Kubeflow Trainer v2: the `TrainJob` manifest and the launcher that runs it.

On a cluster the train step does not train: it creates a `TrainJob` (runtime `torch-distributed`)
whose nodes run `torchrun -m clipflow.train.node` on the training image, streams the rank-0
node's log into the step's log, waits for the job's `Complete` condition, and fails with the
job's reason on `Failed`. The job is deleted whatever happens, so a cancelled run (SIGTERM to
the step's pod) frees its GPUs.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from clipflow.errors import ClipflowError
from clipflow.params import ClusterParams, Params
from clipflow.train.job import WorkerJob, checkpoint_extra

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
STEP_IMAGE = "clipflow"
TRAIN_IMAGE = "clipflow-train"
JOB_ENV = "CLIPFLOW_JOB"
# Secret keys the steps and the training nodes read as environment variables of the same name.
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
MLFLOW_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# The JobSet labels of the pod that runs node 0 (torch rank 0, the one that logs).
RANK0_SELECTOR = (
    "jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name=node,"
    "batch.kubernetes.io/job-completion-index=0"
)


def image(cluster: ClusterParams, name: str, tag: str | None = None) -> str:
    """`{registry}/{name}:{tag}`, the tag defaulting to `cluster.image_tag`."""
    return f"{cluster.registry}/{name}:{tag or cluster.image_tag}"


def secret_env(cluster: ClusterParams) -> list[dict[str, Any]]:
    """Environment variables taken from the S3 and MLflow Secrets, as a container spec lists them."""
    refs = [(cluster.s3_secret, key) for key in S3_KEYS] + [(cluster.mlflow_secret, key) for key in MLFLOW_KEYS]
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": key not in S3_KEYS[:2]}}}
        for secret, key in refs
    ]


def job_spec(params: Params, name: str, data_uri: str, mlflow_run_id: str | None, data_version: str) -> WorkerJob:
    """What every training process needs: the train params, where data and checkpoint live in S3.

    The global batch's split over the `cluster.nodes` x `Params.procs_per_node()` processes is
    checked when params with `cluster.launcher: trainjob` load.

    Raises:
        ClipflowError: the data is not in S3.
    """
    if not data_uri.startswith("s3://"):
        raise ClipflowError(f"a TrainJob reads its data from S3; got {data_uri!r}")
    scratch = f"{params.cluster.scratch_uri.rstrip('/')}/{name}"
    # Every node must read the checkpoints a restarted job resumes from: they live in S3.
    checkpoints = params.train.checkpoint_dir or f"{scratch}/checkpoints"
    return WorkerJob(
        params=replace(
            params.train,
            nproc=params.cluster.nodes * params.procs_per_node(),
            nnodes=params.cluster.nodes,
            checkpoint_dir=checkpoints,
        ),
        mlflow_run_id=mlflow_run_id,
        checkpoint_extra=checkpoint_extra(params, data_version, mlflow_run_id),
        data_uri=data_uri,
        output_uri=f"{scratch}/model",
    )


def manifest(params: Params, name: str, namespace: str, job: WorkerJob, tag: str | None = None) -> dict[str, Any]:
    """The `TrainJob` that runs `job` on `cluster.nodes` nodes of `cluster.gpus_per_node` GPUs."""
    cluster = params.cluster
    resources: dict[str, Any] = {"requests": {"cpu": cluster.cpu_per_node, "memory": cluster.memory_per_node}}
    if cluster.gpus_per_node:
        resources["requests"]["nvidia.com/gpu"] = str(cluster.gpus_per_node)
        resources["limits"] = {"nvidia.com/gpu": str(cluster.gpus_per_node)}
    env = [
        {"name": JOB_ENV, "value": json.dumps(job.to_dict())},
        {"name": "MLFLOW_TRACKING_URI", "value": cluster.tracking_uri},
        {"name": "OMP_NUM_THREADS", "value": str(params.train.threads_per_proc)},
        *secret_env(cluster),
    ]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "clipflow", "app.kubernetes.io/component": "train"},
        },
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": cluster.runtime},
            "trainer": {
                "image": image(cluster, TRAIN_IMAGE, tag),
                # The torch runtime sets PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR...: torchrun reads them.
                "command": ["torchrun"],
                # A restarted attempt resumes from the newest checkpoint in S3 (train.checkpoint_dir).
                "args": ["--max-restarts", str(params.train.max_restarts), "-m", "clipflow.train.node"],
                "numNodes": cluster.nodes,
                "numProcPerNode": params.procs_per_node(),
                "resourcesPerNode": resources,
                "env": env,
            },
        },
    }


def job_name(mlflow_run_id: str) -> str:
    """A DNS-1035 name, unique per training run (MLflow run ids are hex)."""
    return f"clipflow-train-{mlflow_run_id[:12]}"


def current_namespace(default: str) -> str:
    """The step pod's own namespace (a Kubeflow profile's), else `default`."""
    if SERVICE_ACCOUNT_NAMESPACE.is_file():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    return default


def api_client():
    """A Kubernetes client from the pod's service account, or from ~/.kube/config off-cluster."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class Cancelled(Exception):
    """The step received SIGTERM: Kubeflow is cancelling the run."""


def _cancel(signum, frame):
    raise Cancelled()


class TrainJobLauncher:
    """Create a TrainJob, follow it to a terminal condition, and always delete it.

    Args:
        api: a `kubernetes.client.ApiClient`.
        namespace: where the job is created.
        poll_seconds: time between status reads.
        write: receives each log line of the rank-0 node.
    """

    def __init__(self, api, namespace: str, poll_seconds: float, write: Callable[[str], None] | None = None):
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.poll_seconds = poll_seconds
        self.write = write or (lambda line: print(line, flush=True))

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run `job` (a TrainJob manifest) to completion; returns its final status.

        Raises:
            ClipflowError: the job failed (with its reason), or the run was cancelled.
        """
        name = job["metadata"]["name"]
        previous = signal.signal(signal.SIGTERM, _cancel)
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, job)
        self.write(f"created TrainJob {self.namespace}/{name}")
        try:
            return self._follow(name)
        except Cancelled:
            raise ClipflowError(f"run cancelled: TrainJob {name} deleted") from None
        finally:
            signal.signal(signal.SIGTERM, previous)
            self._delete(name)

    def _follow(self, name: str) -> dict[str, Any]:
        streamed = False
        while True:
            status = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name).get(
                "status", {}
            )
            conditions = {c["type"]: c for c in status.get("conditions", []) if c.get("status") == "True"}
            if "Failed" in conditions:
                failed = conditions["Failed"]
                raise ClipflowError(
                    f"TrainJob {name} failed: {failed.get('reason', 'unknown')}: {failed.get('message', '')}".rstrip(
                        ": "
                    )
                )
            if "Complete" in conditions:
                return status
            if not streamed:
                streamed = self._stream_rank0(name)
            time.sleep(self.poll_seconds)

    def _stream_rank0(self, name: str) -> bool:
        """Copy node 0's log to `write` once its container runs; False while it has not started."""
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=RANK0_SELECTOR.format(name=name)).items
        started = [pod for pod in pods if pod.status and pod.status.phase in {"Running", "Succeeded", "Failed"}]
        if not started:
            return False
        response = self.core.read_namespaced_pod_log(
            started[0].metadata.name, self.namespace, container="node", follow=True, _preload_content=False
        )
        pending = b""
        for chunk in response.stream(4096):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self.write(line.decode(errors="replace"))
        if pending:
            self.write(pending.decode(errors="replace"))
        response.release_conn()
        return True

    def _delete(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, propagation_policy="Foreground"
            )
        except ApiException as exc:
            if exc.status != 404:
                print(f"could not delete TrainJob {name}: {exc.status} {exc.reason}", file=sys.stderr)


def run_trainjob(params: Params, job: WorkerJob, name: str, output_dir: str | Path) -> None:
    """Run `job` as a TrainJob from inside the cluster and copy its checkpoint into `output_dir`."""
    from clipflow import storage

    namespace = current_namespace(params.cluster.namespace)
    TrainJobLauncher(api_client(), namespace, params.cluster.poll_seconds).run(manifest(params, name, namespace, job))
    storage.download_tree(job.output_uri, output_dir)


def dry_run_manifest(params: Params, data_uri: str | None) -> str:
    """The TrainJob that `params` would create, as YAML; the MLflow run is not created, so its id is a placeholder."""
    import yaml

    name = job_name("dryrun")
    data_uri = data_uri or f"{params.cluster.scratch_uri.rstrip('/')}/{name}/data"
    spec = job_spec(params, name, data_uri, None, "unknown")
    return yaml.safe_dump(manifest(params, name, params.cluster.namespace, spec), sort_keys=False)
