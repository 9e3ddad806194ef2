"""Start from a pretrained CLIP, fine-tune it on shifted data, never ship worse than where it started.

No model can be downloaded here, so the "pretrained" model is made as a model hub would hold one:
clipflow trains CLIP-Tiny on the plain built-in data, and the checkpoint is exported in open_clip's layout
into a Hugging Face cache (`tests.support.pretrained`). Every run then names it `hf-hub:clipflow-test/clip-tiny`
with `HF_HUB_OFFLINE=1`, as on a machine whose cache was filled, and fine-tunes it on a shifted variant of
the built-in data: textured backgrounds and counted objects it has never seen.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from clipflow.artifacts import PER_ITEM_FILE, WISEFT_ALPHA_TAG
from clipflow.evaluate.wiseft import WISEFT_FILE, WISEFT_PLOT
from tests.support import REPO
from tests.support.pretrained import PretrainedModel, make_pretrained
from tests.support.servers import bentoml_server, free_port

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "CLIPFLOW_PROFILE": "test"}
# The test profile's 12 steps at lr 0.002 leave CLIP-Tiny at chance; these learn within a minute on a CPU.
LEARNING = ["--set", "train.lr=0.0005", "--set", "train.warmup_steps=10", "--set", "train.checkpoint_every=0"]
SHIFTED = ["--set", "data.backgrounds=[stripes, checker, noise]", "--set", "data.count_fraction=0.3"]
TARGET = "seen"  # the test split's compositions, the set the default floors gate
ALPHAS = [0.0, 0.5, 1.0]
# The gate as a user runs it (the test profile allows any drop): worse than the baseline beyond noise is refused.
GATED = ["--set", "promote.max_drop=0.02"]


def clipflow(workdir: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(BIN / "clipflow"), *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=1500
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> PretrainedModel:
    """CLIP-Tiny trained for 60 steps on the plain built-in data, in a Hugging Face cache."""
    root = tmp_path_factory.mktemp("pretraining")
    clipflow(root, "ingest", "--output", "data", env=ENV)
    clipflow(root, "train", "--data", "data", "--output", "model", "--set", "train.steps=60", *LEARNING, env=ENV)
    return make_pretrained(root, checkpoint=root / "model" / "checkpoint.pt")


def run_dag(workdir: Path, pretrained: PretrainedModel, *settings: str) -> tuple[dict, dict]:
    """`clipflow run` from the pretrained reference, offline; returns the run summary and metrics.json."""
    env = pretrained.offline_env({**ENV, "BENTOML_HOME": str(workdir / "bentoml_home")})
    start = ["--set", f"train.pretrained={pretrained.reference}"]
    clipflow(workdir, "run", "--summary", "summary.json", *start, *settings, env=env)
    summary = json.loads((workdir / "summary.json").read_text())
    metrics = json.loads(Path(summary["reports"]["evaluation"]).with_name("metrics.json").read_text())["metrics"]
    return summary, metrics


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, pretrained):
    workdir = tmp_path_factory.mktemp("finetune")
    settings = [*SHIFTED, "--set", "train.steps=40", *LEARNING, *GATED]
    settings += ["--set", f"evaluate.wiseft.alphas={json.dumps(ALPHAS)}", "--set", "evaluate.wiseft.retention=heldout"]
    return workdir, *run_dag(workdir, pretrained, *settings)


def test_the_fine_tuned_model_beats_its_baseline_with_both_logged_side_by_side(finetuned, pretrained):
    workdir, summary, metrics = finetuned
    top1, baseline = f"zeroshot_top1_{TARGET}", f"baseline_zeroshot_top1_{TARGET}"
    curve = json.loads(Path(summary["reports"]["plots"], WISEFT_FILE).read_text())
    by_alpha = {point["alpha"]: point for point in curve["points"]}
    assert sorted(by_alpha) == ALPHAS
    # a = 0 is the starting model itself, a = 1 the fine-tuned one: both scored as the baseline and the evaluation are
    assert by_alpha[0.0]["target_top1"] == pytest.approx(metrics[baseline])
    assert by_alpha[1.0]["target_top1"] > metrics[baseline], curve
    assert metrics[top1] == max(point["target_top1"] for point in curve["points"])
    assert summary["promoted"], summary

    report = Path(summary["reports"]["evaluation"]).read_text()
    assert "baseline" in report.lower() and pretrained.reference in report
    per_item = pd.read_parquet(Path(summary["reports"]["plots"], PER_ITEM_FILE))
    assert set(per_item["model"]) == {"model", "baseline"}
    assert (Path(summary["reports"]["plots"]) / WISEFT_PLOT).stat().st_size > 0

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        run = client.get_run(summary["mlflow_run_id"])
        assert run.data.metrics[f"eval/{baseline}"] == pytest.approx(metrics[baseline])
        assert run.data.metrics[f"eval/{top1}"] == pytest.approx(metrics[top1])
        history = client.get_metric_history(run.info.run_id, "wiseft/target_top1")
        assert sorted(point.step for point in history) == [round(a * 100) for a in ALPHAS]
        version = client.get_model_version(summary["model_name"], summary["model_version"])
        assert float(version.tags[WISEFT_ALPHA_TAG]) == curve["chosen"] == float(run.data.tags[WISEFT_ALPHA_TAG])
    finally:
        mlflow.set_tracking_uri(None)


def test_a_fine_tune_made_worse_on_purpose_is_refused_against_its_baseline(finetuned, pretrained):
    # After the good fine-tune, as a user's next run: the champion stays packaged while the gate refuses this one.
    workdir, champion, _ = finetuned
    # No WiSE-FT mixing here: a = 0 would hand back the starting weights and hide the damage from the gate.
    worse = [*SHIFTED, "--set", "train.steps=20", "--set", "train.lr=0.05", "--set", "train.warmup_steps=0"]
    summary, metrics = run_dag(workdir, pretrained, *worse, "--set", "evaluate.wiseft.alphas=[]", *GATED)
    assert metrics[f"zeroshot_top1_{TARGET}"] < metrics[f"baseline_zeroshot_top1_{TARGET}"]
    assert not summary["promoted"]
    assert summary["model_version"] != champion["model_version"]
    promotion = Path(summary["reports"]["promotion"]).read_text()
    # the first check that failed is the one against the model it started from, with the bootstrap interval
    refusal = f"zeroshot_top1_{TARGET}={metrics[f'zeroshot_top1_{TARGET}']:.4f} is worse than the baseline it was"
    assert refusal in promotion and "interval" in promotion, promotion


def test_zero_steps_serve_the_pretrained_model_as_it_is_and_classify_agrees_with_its_evaluation(tmp_path, pretrained):
    # fp32 serving: the evaluation runs in fp32, and package's precision check guards what bf16 may change.
    summary, metrics = run_dag(tmp_path, pretrained, "--set", "train.steps=0", "--set", "serve.precision=fp32")
    assert summary["promoted"] and summary["bento_tag"]
    assert not [name for name in metrics if name.startswith("baseline_")]  # the model is its own baseline

    env = {**ENV, "BENTOML_HOME": str(tmp_path / "bentoml_home")}
    port = free_port()
    with bentoml_server([str(BIN / "clipflow"), "serve", "--port", str(port)], port, env, tmp_path) as url:
        client = subprocess.run(
            [sys.executable, str(REPO / "serving/client_example.py"), "--url", url]
            + ["--data", summary["data_dir"], "--split", "test", "--limit", "100000"],
            capture_output=True,
            text=True,
            timeout=900,
        )
    assert client.returncode == 0, client.stderr[-3000:]
    served = json.loads(client.stdout.strip().splitlines()[-1])
    assert served["top1"] == pytest.approx(metrics[f"zeroshot_top1_{TARGET}"])
    # not only the same count: the same images are wrong
    wrong_served = {line.split(":")[0] for line in client.stderr.splitlines() if ", truly " in line}
    per_item = pd.read_parquet(Path(summary["reports"]["plots"], PER_ITEM_FILE))
    hits = per_item[(per_item["metric"] == f"zeroshot_top1_{TARGET}") & (per_item["model"] == "model")]
    assert wrong_served == set(hits.loc[hits["hit"] == 0, "key"])
