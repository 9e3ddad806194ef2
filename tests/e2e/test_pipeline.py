"""The pipeline as users run it: compiled for Kubeflow, run whole through kfp.local, and as DVC stages."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
import yaml

from clipflow.artifacts import IngestReport
from clipflow.model import register_configs
from pipelines.local import compile_pipeline
from pipelines.pipeline import STEPS
from tests.support import REPO
from tests.support.processes import process_group
from tests.support.servers import _http_ok as http_ok
from tests.support.servers import _wait as wait_until
from tests.support.servers import bentoml_server, free_port

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "CLIPFLOW_PROFILE": "test"}


def test_compiled_pipeline_has_six_tasks_in_dag_order_then_an_optional_index(tmp_path):
    spec = yaml.safe_load(compile_pipeline(tmp_path / "pipeline.yaml").read_text())  # also proves it parses
    tasks = spec["root"]["dag"]["tasks"]
    # The index step runs only when the run names a catalogue, after the package step.
    condition = tasks.pop("condition-1")
    assert condition["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--index_source'] != ''"
    assert "package-component" in condition["dependentTasks"]
    assert list(spec["components"]["comp-condition-1"]["dag"]["tasks"]) == ["index-component"]
    names = {name.removesuffix("-component"): task for name, task in tasks.items()}
    assert sorted(names) == sorted(STEPS)
    upstream = {step: {d.removesuffix("-component") for d in names[step].get("dependentTasks", [])} for step in STEPS}
    assert upstream["ingest"] == set()
    for before, after in zip(STEPS, STEPS[1:], strict=False):
        assert before in upstream[after], f"{after} must wait for {before}"
    assert {task["taskInfo"]["name"] for task in tasks.values()} == {step.capitalize() for step in STEPS}
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["source"]["defaultValue"] == "builtin"
    assert json.loads(inputs["params"]["defaultValue"])["train"]["model"] == "CLIP-Tiny"
    # A stopped training resumes from the UI: the pipeline's `resume` reaches the train step.
    assert inputs["resume"]["defaultValue"] == ""
    assert names["train"]["inputs"]["parameters"]["resume"]["componentInputParameter"] == "resume"


def clipflow_run(workdir: Path, *options: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`clipflow run` in `workdir` with a copy of the repository's params.yaml, on the test profile."""
    shutil.copy(REPO / "params.yaml", workdir / "params.yaml")
    return subprocess.run(
        [str(BIN / "clipflow"), "run", *options],
        cwd=workdir,
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """`clipflow run` on the test profile, in a fresh working directory, as a user starts it."""
    workdir = tmp_path_factory.mktemp("run")
    result = clipflow_run(workdir, "--summary", "summary.json", env={"BENTOML_HOME": str(workdir / "bentoml_home")})
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, json.loads((workdir / "summary.json").read_text()), result.stdout


def test_whole_pipeline_runs_through_kfp_local(pipeline_run):
    workdir, summary, stdout = pipeline_run
    assert set(summary["timings"]) == {*STEPS, "total"}
    assert all(seconds > 0 for seconds in summary["timings"].values())
    for name in ("zeroshot_top1_heldout", "retrieval_i2t_r1", "retrieval_t2i_r1"):
        assert 0.0 <= summary["metrics"][name] <= 1.0
    assert summary["validation"]["input_rows"] == summary["validation"]["kept"] + summary["validation"]["quarantined"]
    # the test profile's gate has zero floors, so the first model becomes champion
    assert summary["promoted"] and "champion" in summary["aliases"]
    assert summary["bento_tag"].startswith("clipflow")
    for fact in (summary["mlflow_run_id"], summary["bento_tag"], "make serve", "chance"):
        assert fact in stdout

    # the evaluation's plots and reports are KFP outputs of the run
    evaluation = next((workdir / "outputs/kfp").glob("*/evaluate-component/evaluation"))
    for name in ("confusion_heldout.png", "retrieval_grid.png", "probes.png", "summary.md"):
        assert (evaluation / name).stat().st_size > 0
    assert "| heldout |" in next((workdir / "outputs/kfp").glob("*/evaluate-component/summary")).read_text()

    # the checkpoint is open_clip's own format: open_clip loads it by name, as it is
    open_clip = pytest.importorskip("open_clip")
    register_configs()
    open_clip.create_model_and_transforms("CLIP-Tiny", pretrained=summary["checkpoint"], weights_only=True)

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    try:
        run = mlflow.get_run(summary["mlflow_run_id"])
        assert run.data.tags["data_version"] == summary["data_version"]
        heldout = summary["metrics"]["zeroshot_top1_heldout"]
        assert run.data.metrics["eval/zeroshot_top1_heldout"] == pytest.approx(heldout)
        assert "train/loss" in run.data.metrics
        version = mlflow.MlflowClient().get_model_version_by_alias(summary["model_name"], "champion")
        assert str(version.version) == summary["model_version"]
    finally:
        mlflow.set_tracking_uri(None)


def test_clipflow_serve_classifies_test_images_with_the_run_s_bento(pipeline_run):
    """What `make serve` does after `make run`, checked with the client example a user would run."""
    workdir, summary, _ = pipeline_run
    port = free_port()
    env = {**ENV, "BENTOML_HOME": str(workdir / "bentoml_home")}
    command = [str(BIN / "clipflow"), "serve", "--port", str(port)]
    with bentoml_server(command, port, env, workdir) as url:
        client = subprocess.run(
            [sys.executable, str(REPO / "serving/client_example.py"), "--url", url]
            + ["--data", summary["data_dir"], "--split", "test", "--limit", "20"],
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert client.returncode == 0, client.stderr[-3000:]
    result = json.loads(client.stdout.strip().splitlines()[-1])
    params = yaml.safe_load((REPO / "params.yaml").read_text())["data"]
    assert result["images"] == 20
    assert result["labels"] == len(params["colors"]) * len(params["shapes"])
    # the test profile trains for seconds, so only the mistakes' accounting is checked here;
    # the default run's accuracy is measured with the same script (README)
    mistakes = [line for line in client.stderr.splitlines() if ", truly " in line]
    assert result["top1"] == pytest.approx(1 - len(mistakes) / 20)


def test_run_prints_a_line_per_step_and_keeps_each_step_s_log(pipeline_run):
    workdir, summary, stdout = pipeline_run
    lines = stdout.splitlines()
    assert len(lines) <= 40, stdout
    assert "Executing task" not in stdout  # kfp.local's own stream stays in the logs
    ended = {}
    for number, step in enumerate(STEPS, start=1):
        own = [line for line in lines if line.startswith(f"[{number}/{len(STEPS)}] {step} ")]
        assert len(own) == 2, stdout
        log = Path(summary["logs"][step])
        assert log.is_relative_to(workdir.resolve() / "outputs/kfp") and log.parent.name == "logs"
        assert own[0].endswith(f"started; log {log.relative_to(workdir.resolve())}")
        assert " done in " in own[1]
        ended[step] = own[1]
        # kfp's executor names the component it runs: each log holds its own step's output, and only that
        text = log.read_text()
        assert f"`{step}_component`" in text
        assert not [other for other in STEPS if other != step and f"`{other}_component`" in text]
    ingested = IngestReport.read(summary["data_dir"])
    assert f"kept {ingested.kept} of {ingested.input_rows} rows" in ended["ingest"]
    assert f"data version {summary['data_version']}" in ended["ingest"]
    validated = summary["validation"]
    assert f"kept {validated['kept']}, quarantined {validated['quarantined']}" in ended["validate"]
    assert re.search(r": \d+ samples/s, final loss \d+\.\d{4}$", ended["train"]), ended["train"]
    metrics = summary["metrics"]
    for name in ("seen", "heldout"):  # the default set, and the built-in data's own
        figures = f"{name} {metrics[f'zeroshot_top1_{name}']:.3f} (chance {metrics[f'zeroshot_chance_{name}']:.3f})"
        assert figures in ended["evaluate"], ended["evaluate"]
    assert f"version {summary['model_version']} promoted to champion" in ended["promote"]
    assert f"bento {summary['bento_tag']}" in ended["package"]

    # the closing summary says where to look next, and each place exists
    assert Path(summary["reports"]["evaluation"]).name == "summary.md"
    assert (Path(summary["reports"]["plots"]) / "retrieval_grid.png").is_file()
    assert Path(summary["reports"]["validation"]).is_file()
    promotion = Path(summary["reports"]["promotion"]).read_text()
    assert f"models:/{summary['model_name']}/{summary['model_version']}" in promotion
    for path in summary["reports"].values():
        assert str(Path(path).relative_to(workdir.resolve())) in stdout
    serve = yaml.safe_load((workdir / "params.yaml").read_text())["serve"]
    assert f"web page:       http://{serve['host']}:{serve['port']}/ after make serve" in lines


def test_the_printed_mlflow_ui_command_opens_the_run(pipeline_run, tmp_path):
    workdir, summary, stdout = pipeline_run
    line = next(line for line in stdout.splitlines() if line.startswith("MLflow UI:"))
    command = line.removeprefix("MLflow UI:").partition("(then")[0].split()
    assert command[1:] == ["ui", "--backend-store-uri", f"sqlite:///{workdir.resolve() / 'mlflow.db'}"]
    port = free_port()
    env = {**ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "mlflow-ui.log"
    # Started elsewhere than the run's folder: the command needs nothing from the working directory.
    with (
        log_path.open("wb") as log,
        process_group(
            [*command, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        ) as process,
    ):
        wait_until(lambda: http_ok(f"{url}/health"), process, log_path, "mlflow ui")
        run = httpx.get(f"{url}/api/2.0/mlflow/runs/get", params={"run_id": summary["mlflow_run_id"]}).json()["run"]
        files = httpx.get(f"{url}/api/2.0/mlflow/artifacts/list", params={"run_id": summary["mlflow_run_id"]}).json()
    assert run["data"]["tags"]
    assert {tag["key"]: tag["value"] for tag in run["data"]["tags"]}["data_version"] == summary["data_version"]
    assert "evaluation" in {entry["path"] for entry in files["files"]}


def test_a_failing_step_shows_its_log_s_tail_and_stops_the_run_with_one_clear_last_line(tmp_path):
    # every rendered image is 64 px wide, so all rows break the width expectation
    result = clipflow_run(tmp_path, "--set", "validate.max_side=32")
    assert result.returncode != 0
    log = next((tmp_path / "outputs/kfp").glob("*/logs/validate.log")).relative_to(tmp_path)
    errors = result.stderr.strip().splitlines()
    assert errors[-1] == f"clipflow: error: pipeline failed at validate; its log: {log}"
    tail = errors[errors.index(f"last 20 lines of {log}:") + 1 : -1]
    assert len(tail) == 20
    logged = (tmp_path / log).read_text()
    failure = next(line for line in tail if "validation failed:" in line)
    assert failure.strip() in logged
    assert result.stdout.splitlines()[-1].startswith("[2/6] validate FAILED after ")
    assert len(result.stdout.splitlines()) == 4  # ingest started and done, validate started and failed
    assert not (tmp_path / "outputs/run-summary.json").exists()


def test_verbose_streams_what_kfp_local_prints_and_still_keeps_the_log(tmp_path):
    missing = tmp_path / "no-such-manifest.csv"  # passes params load, fails in the ingest step
    result = clipflow_run(tmp_path, "--verbose", "--source", str(missing))
    assert result.returncode != 0
    log = next((tmp_path / "outputs/kfp").glob("*/logs/ingest.log"))
    assert result.stderr.strip().splitlines()[-1] == (
        f"clipflow: error: pipeline failed at ingest; its log: {log.relative_to(tmp_path)}"
    )
    streamed = ("Executing task", "Looking for component `ingest_component`", f"manifest not found: {missing}")
    for text in streamed:
        assert text in result.stdout
        assert text in log.read_text()
    assert "DockerRunner" in result.stderr  # kfp.local's warnings, on stderr as without clipflow


def test_dvc_stages_reproduce_the_same_dag(tmp_path):
    """`dvc repro` runs the stages of dvc.yaml; afterwards `dvc repro --dry` has nothing left to do."""
    for item in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / item, tmp_path / item)
    for folder in ("src", "serving"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = {**ENV, "BENTOML_HOME": str(tmp_path / "bentoml_home")}

    def dvc(*args):
        return subprocess.run([str(BIN / "dvc"), *args], cwd=tmp_path, env=env, capture_output=True, text=True)

    assert dvc("init", "--no-scm", "-q").returncode == 0
    dry = dvc("repro", "--dry", "--single-item", "ingest")
    assert dry.returncode == 0, dry.stderr
    assert "clipflow ingest" in dry.stdout
    full = dvc("repro")
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    for step in STEPS:
        assert f"Running stage '{step}'" in full.stdout
    again = dvc("repro", "--dry")
    assert again.returncode == 0, again.stderr
    assert "Running stage" not in again.stdout
    metrics = json.loads((tmp_path / "outputs/evaluation/metrics.json").read_text())["metrics"]
    assert "zeroshot_top1_heldout" in metrics


def test_run_with_an_index_step_serves_search_from_the_vector_store(tmp_path):
    """`clipflow run --index-source ingested`: the champion embeds the run's data after packaging, the
    Bento's `search` answers from that collection in the Milvus Lite folder, and a filter restricts it."""
    env = {"BENTOML_HOME": str(tmp_path / "bentoml_home")}
    result = clipflow_run(tmp_path, "--summary", "summary.json", "--index-source", "ingested", env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = (*STEPS, "index")
    ended = [line for line in result.stdout.splitlines() if line.startswith(f"[{len(steps)}/{len(steps)}] index")]
    assert len(ended) == 2 and " done in " in ended[1], result.stdout
    ingested = IngestReport.read(summary["data_dir"])
    index = summary["index"]
    assert (index["input_rows"], index["rows"], index["quarantined"]) == (ingested.kept, ingested.kept, 0)
    assert index["model_version"] == summary["model_version"] and index["data_version"] == summary["data_version"]
    assert index["store"]["rows"] == ingested.kept and index["store"]["alias"] in result.stdout
    assert list(summary["timings"]) == [*steps, "total"]

    port = free_port()
    command = [str(BIN / "clipflow"), "serve", "--port", str(port)]
    with bentoml_server(command, port, {**ENV, **env}, tmp_path) as url:
        info = httpx.post(f"{url}/model_info", json={}, timeout=30).json()
        assert info["index_collection"] == index["store"]["collection"]
        hits = httpx.post(f"{url}/search", json={"text": "a red circle", "k": 5}, timeout=30).json()
        test_only = {"text": "a red circle", "k": 5, "filter": {"split": "test"}}
        filtered = httpx.post(f"{url}/search", json=test_only, timeout=30).json()
    keys = set(pd.read_parquet(Path(summary["data_dir"]) / "metadata.parquet")["key"])
    assert len(hits) == 5 and {hit["id"] for hit in hits} <= keys
    assert [hit["score"] for hit in hits] == sorted((hit["score"] for hit in hits), reverse=True)
    assert len(filtered) == 5 and {hit["metadata"]["split"] for hit in filtered} == {"test"}
