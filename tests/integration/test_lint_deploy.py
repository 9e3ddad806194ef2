"""The workflows pass actionlint, the Dockerfiles hadolint, and the serving manifests say what they must."""

import subprocess
import sys
from pathlib import Path

import yaml

from tests.support import REPO

BIN = Path(sys.executable).parent


def test_workflows_pass_actionlint():
    workflows = sorted((REPO / ".github/workflows").glob("*.yml"))
    assert {w.name for w in workflows} >= {"ci.yml", "retrain.yml"}
    result = subprocess.run([BIN / "actionlint", *workflows], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "on: push\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    steps:\n      - run: echo ${{ github.nope }}\n"
    )
    assert subprocess.run([BIN / "actionlint", broken], capture_output=True).returncode == 1


def test_dockerfiles_pass_hadolint():
    dockerfiles = sorted((REPO / "deploy").glob("Dockerfile*"))
    assert len(dockerfiles) == 2
    for dockerfile in dockerfiles:
        result = subprocess.run([BIN / "hadolint", dockerfile], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "USER 10001" in dockerfile.read_text()


def test_retrain_runs_on_merges_that_change_data_params_or_code():
    workflow = yaml.safe_load((REPO / ".github/workflows/retrain.yml").read_text())
    push = workflow[True]["push"]  # YAML 1.1 reads the key `on` as True
    assert push["branches"] == ["main"]
    assert set(push["paths"]) == {"params.yaml", "**.dvc", "src/**", "components/**", "pipelines/**"}
    script = workflow["jobs"]["run"]["steps"][-1]["run"]
    assert "clipflow submit --wait" in script and "github.sha" in script and "GITHUB_STEP_SUMMARY" in script


def test_serving_deployment_probes_and_api_key_secret():
    deployment, service, hpa = yaml.safe_load_all((REPO / "deploy/k8s/serving.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["resources"]["requests"]
    (key,) = [e for e in container["env"] if e["name"] == "CLIPFLOW_API_KEY"]
    assert "secretKeyRef" in key["valueFrom"] and "value" not in key
    assert (service["kind"], hpa["kind"]) == ("Service", "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
