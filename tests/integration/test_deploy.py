"""The cluster side: generated TrainJobs against the real CRD schema, the launcher against a fake API server."""

import dataclasses
import json
import os
import re
import signal

import jsonschema
import pytest
import yaml
from kubernetes import client

from clipflow.cli import main
from clipflow.errors import ClipflowError
from clipflow.params import load_params, parse_params
from clipflow.train import trainjob
from pipelines.local import compile_pipeline
from pipelines.pipeline import STEPS
from tests.support import REPO
from tests.support.fake_k8s import FakeKubernetes, serve

CRD = REPO / "deploy/k8s/kubeflow-trainer/trainer.kubeflow.org_trainjobs.v2.3.0.yaml"
DATA_URI = "s3://clipflow-runs/pipeline/ingest/data"


@pytest.fixture(scope="module")
def trainjob_schema():
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == trainjob.VERSION]
    assert crd["spec"]["group"] == trainjob.GROUP and crd["spec"]["names"]["plural"] == trainjob.PLURAL
    return version["schema"]["openAPIV3Schema"]


def cluster_params(*overrides: str):
    return load_params(REPO / "params.yaml", list(overrides), profile="test")


def check_name_rules(schema: dict, name: str) -> None:
    """The CRD's CEL rules on metadata.name, which jsonschema cannot read: a DNS-1035 label of <= 63 characters."""
    rules = {rule["rule"] for rule in schema["x-kubernetes-validations"]}
    assert rules == {"self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')", "size(self.metadata.name) <= 63"}
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name


RUN_ID = "0123456789abcdef0123456789abcdef"


def make_job(params, tag=None):
    name = trainjob.job_name(RUN_ID)
    spec = trainjob.job_spec(params, name, DATA_URI, RUN_ID, "v1")
    return trainjob.manifest(params, name, "team-a", spec, tag=tag)


@pytest.mark.parametrize(("nodes", "gpus"), [(1, 1), (1, 8), (4, 8), (3, 0)])
def test_generated_trainjob_matches_the_crd_schema(trainjob_schema, nodes, gpus):
    params = cluster_params(f"cluster.nodes={nodes}", f"cluster.gpus_per_node={gpus}", "train.batch_size=96")
    job = make_job(params, tag="abc123")
    jsonschema.Draft7Validator(trainjob_schema).validate(job)
    check_name_rules(trainjob_schema, job["metadata"]["name"])

    trainer = job["spec"]["trainer"]
    assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert trainer["image"] == "ghcr.io/clipflow/clipflow-train:abc123"
    assert trainer["command"] == ["torchrun"]
    assert trainer["args"] == ["--max-restarts", str(params.train.max_restarts), "-m", "clipflow.train.node"]
    assert trainer["numNodes"] == nodes
    assert trainer["numProcPerNode"] == (gpus or params.train.nproc)
    requests = trainer["resourcesPerNode"]["requests"]
    assert requests.get("nvidia.com/gpu") == (str(gpus) if gpus else None)
    env = {e["name"]: e for e in trainer["env"]}
    shipped = json.loads(env["CLIPFLOW_JOB"]["value"])
    assert shipped["params"]["nproc"] == nodes * (gpus or params.train.nproc)
    assert shipped["data_uri"] == DATA_URI
    assert shipped["output_uri"] == f"{params.cluster.scratch_uri}/clipflow-train-0123456789ab/model"
    # Restarts on any node resume from checkpoints every node reads.
    assert (
        shipped["params"]["checkpoint_dir"] == f"{params.cluster.scratch_uri}/clipflow-train-0123456789ab/checkpoints"
    )
    assert shipped["params"]["nnodes"] == nodes
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "clipflow-s3",
        "key": "AWS_SECRET_ACCESS_KEY",
        "optional": False,
    }
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "clipflow-mlflow"
    assert all("value" not in e for e in trainer["env"] if e["name"] in trainjob.S3_KEYS + trainjob.MLFLOW_KEYS)


def test_the_schema_check_rejects_a_malformed_trainjob(trainjob_schema):
    job = make_job(cluster_params())
    job["spec"]["trainer"]["numNodes"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="numNodes|'two'"):
        jsonschema.Draft7Validator(trainjob_schema).validate(job)
    job["spec"]["trainer"]["numNodes"] = 2
    del job["spec"]["runtimeRef"]
    with pytest.raises(jsonschema.ValidationError, match="runtimeRef"):
        jsonschema.Draft7Validator(trainjob_schema).validate(job)


def test_a_trainjob_rejects_local_data_and_an_uneven_batch():
    with pytest.raises(ClipflowError, match="reads its data from S3"):
        trainjob.job_spec(cluster_params(), "j", "/data/builtin", None, "v1")
    # The batch's split over the TrainJob's processes is checked once, as the params load.
    with pytest.raises(ClipflowError, match="multiple of the 24 training processes"):
        cluster_params("cluster.nodes=3")


RUNNING = {"jobsStatus": [{"name": "node", "active": 2, "ready": 2, "failed": 0, "succeeded": 0, "suspended": 0}]}


def condition(kind: str, reason: str, message: str) -> dict:
    return {"type": kind, "status": "True", "reason": reason, "message": message}


def launch(url: str, job: dict, lines: list[str]) -> dict:
    configuration = client.Configuration(host=url)
    launcher = trainjob.TrainJobLauncher(client.ApiClient(configuration), "team-a", 0.01, write=lines.append)
    return launcher.run(job)


def calls(fake: FakeKubernetes, method: str, suffix: str) -> list:
    return [r for r in fake.requests if r[0] == method and r[1].endswith(suffix)]


def test_launcher_waits_for_complete_streams_rank0_and_deletes_the_job():
    job = make_job(cluster_params())
    name = job["metadata"]["name"]
    complete = {**RUNNING, "conditions": [condition("Complete", "JobsCompleted", "jobs completed")]}
    # Created (no status), Running twice, then Complete.
    fake = FakeKubernetes([{}, RUNNING, RUNNING, complete], ["step 1 loss 4.1", "step 2 loss 3.9", "saved"])
    lines = []
    with serve(fake) as url:
        status = launch(url, job, lines)

    assert status["conditions"][0]["type"] == "Complete"
    assert fake.created == job
    (create,) = calls(fake, "POST", "/namespaces/team-a/trainjobs")
    assert create[1] == "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs"
    assert fake.reads == 4, "the launcher must keep reading until Complete, not stop at Running"
    (pods, *_) = calls(fake, "GET", "/pods")
    selector = pods[2]["labelSelector"][0]
    assert f"jobset.sigs.k8s.io/jobset-name={name}" in selector and "job-completion-index=0" in selector
    (log,) = calls(fake, "GET", "/log")
    assert log[1] == f"/api/v1/namespaces/team-a/pods/{name}-node-0-0-abcde/log" and log[2]["follow"] == ["True"]
    assert lines == [f"created TrainJob team-a/{name}", "step 1 loss 4.1", "step 2 loss 3.9", "saved"]
    (delete,) = calls(fake, "DELETE", f"/trainjobs/{name}")
    assert delete[2]["propagationPolicy"] == ["Foreground"]


def test_launcher_fails_with_the_jobs_reason_and_deletes_it():
    job = make_job(cluster_params())
    failed = {"conditions": [condition("Failed", "BackoffLimitExceeded", "node-1 exited with code 1")]}
    fake = FakeKubernetes([{}, RUNNING, failed], ["step 1 loss 4.1", "CUDA error: out of memory"])
    lines = []
    with serve(fake) as url, pytest.raises(ClipflowError) as error:
        launch(url, job, lines)
    assert str(error.value) == (
        f"TrainJob {job['metadata']['name']} failed: BackoffLimitExceeded: node-1 exited with code 1"
    )
    assert "CUDA error: out of memory" in lines
    assert len(calls(fake, "DELETE", f"/trainjobs/{job['metadata']['name']}")) == 1


def test_a_cancelled_run_deletes_its_trainjob():
    job = make_job(cluster_params())
    # Kubeflow cancels a run by terminating the step's pod: SIGTERM arrives while the log streams.
    fake = FakeKubernetes([{}, RUNNING], ["step 1 loss 4.1"], on_log=lambda: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    with serve(fake) as url, pytest.raises(ClipflowError, match="run cancelled"):
        launch(url, job, [])
    assert len(calls(fake, "DELETE", f"/trainjobs/{job['metadata']['name']}")) == 1
    assert signal.getsignal(signal.SIGTERM) == before


def test_cluster_compile_sets_images_secrets_resources_and_the_launcher(tmp_path):
    assert main(["compile", "--target", "cluster", "--image-tag", "3f2a9c1", "--output", str(tmp_path / "p.yaml")]) == 0
    spec, platform = yaml.safe_load_all((tmp_path / "p.yaml").read_text())
    params = load_params(REPO / "params.yaml")
    executors = spec["deploymentSpec"]["executors"]
    images = {name: e["container"]["image"] for name, e in executors.items()}
    assert images.pop("exec-index-component") == "ghcr.io/clipflow/clipflow-train:3f2a9c1"  # embeds on a GPU
    assert set(images.values()) == {"ghcr.io/clipflow/clipflow:3f2a9c1"}
    for step in STEPS:
        container = executors[f"exec-{step}-component"]["container"]
        wanted = params.cluster.resources[step]
        assert container["resources"]["resourceCpuRequest"] == wanted.cpu
        assert container["resources"]["resourceMemoryRequest"] == wanted.memory
        task = spec["root"]["dag"]["tasks"][f"{step}-component"]
        assert task["cachingOptions"].get("enableCache", False) == (step in {"ingest", "validate"})
        assert task.get("retryPolicy", {}).get("maxRetryCount", 0) == wanted.retries
        secrets = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][f"exec-{step}-component"]
        as_env = {(s["secretName"], k["envVar"]): s["optional"] for s in secrets["secretAsEnv"] for k in s["keyToEnv"]}
        assert as_env == {
            ("clipflow-s3", "AWS_ACCESS_KEY_ID"): False,
            ("clipflow-s3", "AWS_SECRET_ACCESS_KEY"): False,
            ("clipflow-s3", "AWS_ENDPOINT_URL"): True,
            ("clipflow-mlflow", "MLFLOW_TRACKING_USERNAME"): True,
            ("clipflow-mlflow", "MLFLOW_TRACKING_PASSWORD"): True,
        }
    train_env = executors["exec-train-component"]["container"]["env"]
    assert train_env == [{"name": "CLIPFLOW_LAUNCHER", "value": "trainjob"}]
    assert all("env" not in e["container"] for name, e in executors.items() if name != "exec-train-component")
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["overrides"]["defaultValue"] == [
        "cluster.image_tag=3f2a9c1",
        f"tracking.uri={params.cluster.tracking_uri}",
        f"index.uri={params.cluster.index_uri}",
        f"index.artifact_root={params.cluster.index_root}",
    ]
    # what the launcher step will read: its nodes, GPUs and training image come from these params
    shipped = parse_params(inputs["params"]["defaultValue"], inputs["overrides"]["defaultValue"])
    assert shipped.cluster == dataclasses.replace(params.cluster, image_tag="3f2a9c1")
    assert trainjob.image(shipped.cluster, trainjob.TRAIN_IMAGE) == "ghcr.io/clipflow/clipflow-train:3f2a9c1"


def test_the_reindex_pipeline_spreads_a_catalogue_over_gpu_pods_on_a_cluster(tmp_path):
    """`clipflow compile --pipeline reindex --target cluster`: plan, a ParallelFor of embedding pods (one per
    group the plan makes, `cluster.index_pods` by default, each with its GPUs), then the index step."""
    output = tmp_path / "reindex.yaml"
    assert main(["compile", "--pipeline", "reindex", "--target", "cluster", "--output", str(output)]) == 0
    spec, platform = yaml.safe_load_all(output.read_text())
    params = load_params(REPO / "params.yaml")
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["index_pods"]["defaultValue"] == params.cluster.index_pods
    assert "defaultValue" not in inputs["source"]  # a catalogue must be named
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["plan-index-component"]["inputs"]["parameters"]["pods"]["componentInputParameter"] == "index_pods"
    loop = tasks["for-loop-1"]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--plan-index-component-groups"
    assert "embed-index-component" in spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    assert set(tasks["index-component"]["dependentTasks"]) >= {"for-loop-1", "plan-index-component"}
    executors = spec["deploymentSpec"]["executors"]
    embed = executors["exec-embed-index-component"]["container"]
    assert embed["image"] == f"{params.cluster.registry}/clipflow-train:{params.cluster.image_tag}"
    assert embed["resources"]["accelerator"]["resourceCount"] == str(params.cluster.index_gpus_per_pod)
    for name in ("exec-plan-index-component", "exec-index-component"):
        container = executors[name]["container"]
        assert container["image"] == f"{params.cluster.registry}/clipflow:{params.cluster.image_tag}"
        assert "accelerator" not in container["resources"]
        assert container["resources"]["resourceCpuRequest"] == params.cluster.resources["index"].cpu
    secrets = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-embed-index-component"]
    assert {s["secretName"] for s in secrets["secretAsEnv"]} == {"clipflow-s3", "clipflow-mlflow"}


def test_local_compile_is_untouched_by_the_cluster_settings(tmp_path):
    (spec,) = yaml.safe_load_all(compile_pipeline(tmp_path / "local.yaml").read_text())
    executors = spec["deploymentSpec"]["executors"].values()
    assert all(":3f2a9c1" not in e["container"]["image"] and "env" not in e["container"] for e in executors)
    assert all("resources" not in e["container"] for e in executors)
    assert spec["root"]["inputDefinitions"]["parameters"]["overrides"]["defaultValue"] == []


def test_dry_run_prints_the_trainjob_for_the_current_params(capsys):
    assert main(["train", "--launcher", "trainjob", "--dry-run", "--set", "cluster.nodes=4"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["kind"] == "TrainJob" and job["spec"]["trainer"]["numNodes"] == 4
    assert main(["train", "--launcher", "trainjob", "--dry-run", "--data-uri", "data/builtin"]) == 1
    assert capsys.readouterr().err.strip() == "clipflow: error: a TrainJob reads its data from S3; got 'data/builtin'"
    assert main(["train", "--dry-run"]) == 1
    assert "use it with --launcher trainjob" in capsys.readouterr().err
