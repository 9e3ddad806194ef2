"""Every component compiles alone (`python -m components.<step>`), as CI compiles each one."""

import subprocess
import sys

import pytest
import yaml

COMMON = {"params", "overrides", "profile"}
# What the pipeline wires into and out of each step: a renamed argument breaks the DAG.
INPUTS = {
    "ingest": COMMON | {"source"},
    "validate": COMMON | {"data"},
    "train": COMMON | {"data", "resume"},
    "evaluate": COMMON | {"data", "model", "mlflow_run_id", "model_uri"},
    "promote": COMMON | {"model_uri", "metrics_json", "data_version"},
    "package": COMMON | {"model_name", "data", "index_source"},
    "index": COMMON | {"source", "model", "output", "data"},
}
OUTPUTS = {
    "ingest": {"data", "data_version", "report"},
    "validate": {"report", "validation", "Output"},
    "train": {"model", "mlflow_run_id", "model_uri", "report"},
    "evaluate": {"metrics", "confusion", "summary", "evaluation", "metrics_json", "report", "model_uri"},
    "promote": {"summary", "model_name", "model_version", "report"},
    "package": {"Output"},
    "index": {"Output"},
}


def names(definitions: dict) -> set[str]:
    return set(definitions.get("parameters", {})) | set(definitions.get("artifacts", {}))


@pytest.mark.parametrize("step", sorted(INPUTS))
def test_each_component_compiles_alone_with_its_inputs_and_outputs(tmp_path, step):
    # From a folder outside the checkout: `components` is an installed package, not the working directory.
    result = subprocess.run(
        [sys.executable, "-m", f"components.{step}", "--output", "out/component.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "out/component.yaml"
    text = (tmp_path / "out/component.yaml").read_text()
    assert text.splitlines()[1] == f"# Name: {step}-component"
    spec = yaml.safe_load(text)
    (component,) = spec["components"].values()
    assert names(component["inputDefinitions"]) == INPUTS[step]
    assert names(component["outputDefinitions"]) == OUTPUTS[step]
    assert names(spec["root"]["inputDefinitions"]) == INPUTS[step]


def test_a_component_compiles_to_its_own_name_in_the_working_directory_by_default(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "components.promote"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "promote_component.yaml"
    assert yaml.safe_load((tmp_path / "promote_component.yaml").read_text())["root"]["dag"]["tasks"]


def test_promote_registers_the_model_that_evaluate_judged(tmp_path):
    # evaluate hands on the train step's model, or the WiSE-FT mix of it that it chose and evaluated instead
    from kfp import compiler

    from pipelines.pipeline import clipflow_pipeline

    compiler.Compiler().compile(clipflow_pipeline, str(tmp_path / "pipeline.yaml"))
    tasks = yaml.safe_load((tmp_path / "pipeline.yaml").read_text())["root"]["dag"]["tasks"]

    def source(task: str) -> dict:
        return tasks[task]["inputs"]["parameters"]["model_uri"]["taskOutputParameter"]

    assert source("evaluate-component") == {"outputParameterKey": "model_uri", "producerTask": "train-component"}
    assert source("promote-component") == {"outputParameterKey": "model_uri", "producerTask": "evaluate-component"}
