"""Registration, the promotion gate, rollback and racing promotions against a real `mlflow server`
whose artifacts live in a SeaweedFS S3 bucket."""

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from clipflow import model as clip_model
from clipflow import tracking
from clipflow.errors import ClipflowError
from clipflow.registry.models import download_checkpoint, log_clip_model
from clipflow.registry.promote import CHAMPION, check_metrics, gate, promote, promotion_lock, rollback
from tests.support.servers import mlflow_server, seaweedfs

CLIPFLOW = str(Path(sys.executable).with_name("clipflow"))


def test_gate_floors_and_allowed_drop():
    floors = {"acc": 0.5}
    assert gate({"acc": 0.6}, floors, 0.02, None).passed
    below = gate({"acc": 0.4}, floors, 0.02, None)
    assert not below.passed and "below its floor" in below.reason
    assert gate({"acc": 0.59}, floors, 0.02, {"acc": 0.6}).passed
    dropped = gate({"acc": 0.55}, floors, 0.02, {"acc": 0.6})
    assert not dropped.passed and "drops more than 0.02" in dropped.reason
    assert not gate({}, floors, 0.02, None).passed
    assert not gate({"acc": float("nan")}, floors, 0.02, None).passed
    # a champion tagged inf before the metrics were checked does not block every later model
    assert gate({"acc": 0.6}, floors, 0.02, {"acc": float("inf")}).passed


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (float("nan"), "not a finite number"),
        (float("inf"), "not a finite number"),
        ("0.9", "not a finite number"),
        (None, "not a finite number"),
        (True, "not a finite number"),
        (1.5, r"outside \[0, 1\]"),
        (-0.1, r"outside \[0, 1\]"),
    ],
)
def test_gated_metrics_must_be_finite_fractions(value, problem):
    with pytest.raises(ClipflowError, match=f"metric acc={value!r} is {problem}; nothing was registered"):
        check_metrics({"acc": value, "other": "ignored: not gated"}, {"acc": 0.5})
    check_metrics({"acc": 0.5}, {"acc": 0.5})  # a floor value is a valid metric


@pytest.fixture(scope="module")
def registry(tmp_path_factory, small_params):
    """A tracking server on S3-backed artifacts, a checkpoint, and params pointing at them."""
    tmp = tmp_path_factory.mktemp("registry")
    with seaweedfs(tmp / "s3") as s3, mlflow_server(tmp / "mlflow", s3) as url:
        checkpoint = clip_model.save_checkpoint(tmp / "model", clip_model.create("CLIP-Tiny").model, "CLIP-Tiny", {})
        yield {"url": url, "s3": s3, "checkpoint": checkpoint, "tmp": tmp}
    mlflow.set_tracking_uri(None)


def _params(small_params, registry, model_name):
    return dataclasses.replace(
        small_params,
        tracking=dataclasses.replace(small_params.tracking, uri=registry["url"], experiment="promote-test"),
        promote=dataclasses.replace(
            small_params.promote, model_name=model_name, floors={"zeroshot_top1_heldout": 0.3}, max_drop=0.05
        ),
    )


def _logged_model(registry) -> str:
    with mlflow.start_run():
        return log_clip_model(registry["checkpoint"])


def _cli_args(params) -> list[str]:
    return [
        "--set", f"tracking.uri={params.tracking.uri}",
        "--set", f"tracking.experiment={params.tracking.experiment}",
        "--set", f"promote.model_name={params.promote.model_name}",
        "--set", "promote.floors={zeroshot_top1_heldout: 0.3}",
        "--set", "promote.max_drop=0.05",
    ]  # fmt: skip


def test_register_gate_refuse_and_roll_back(registry, small_params):
    params = _params(small_params, registry, "clip-gate")
    tracking.setup(params.tracking)
    first = promote(_logged_model(registry), {"zeroshot_top1_heldout": 0.5}, params, data_version="v1")
    assert first.promoted and first.aliases == ["challenger", "champion"]

    worse = promote(_logged_model(registry), {"zeroshot_top1_heldout": 0.4}, params, data_version="v1")
    assert not worse.promoted and worse.aliases == ["challenger"]
    assert "drops more than 0.05" in worse.reason
    below_floor = promote(_logged_model(registry), {"zeroshot_top1_heldout": 0.2}, params)
    assert not below_floor.promoted and "below its floor" in below_floor.reason

    better = promote(_logged_model(registry), {"zeroshot_top1_heldout": 0.6}, params, data_version="v2")
    assert better.promoted and better.previous_champion == first.model_version

    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("clip-gate", CHAMPION)
    assert str(champion.version) == better.model_version
    assert champion.tags["data_version"] == "v2" and champion.tags["metric.zeroshot_top1_heldout"] == "0.6"
    rejected = client.get_model_version("clip-gate", worse.model_version).tags
    assert rejected["promotion"] == "rejected" and "drops more than" in rejected["promotion_reason"]

    # the champion's weights come back from the S3 bucket, through the tracking server
    restored = clip_model.load(download_checkpoint("models:/clip-gate@champion"))
    assert restored.name == "CLIP-Tiny"
    keys = [o["Key"] for o in registry["s3"].client().list_objects_v2(Bucket="mlflow")["Contents"]]
    assert any(key.endswith("checkpoint.pt") for key in keys)

    rolled = subprocess.run(
        [CLIPFLOW, "promote", "--rollback", *_cli_args(params)], capture_output=True, text=True, timeout=300
    )
    assert rolled.returncode == 0, rolled.stderr
    assert json.loads(rolled.stdout)["champion"] == first.model_version
    assert str(client.get_model_version_by_alias("clip-gate", CHAMPION).version) == first.model_version
    assert client.get_model_version("clip-gate", better.model_version).tags["promotion"] == "rolled_back"
    with pytest.raises(ClipflowError, match="nothing to roll back to"):
        rollback(params)


def test_two_racing_promotions_leave_the_better_champion(registry, small_params, tmp_path):
    params = _params(small_params, registry, "clip-race")
    tracking.setup(params.tracking)
    promote(_logged_model(registry), {"zeroshot_top1_heldout": 0.60}, params)
    # each passes against the old champion; only the better one may win against the other
    better, worse = _logged_model(registry), _logged_model(registry)
    processes = []
    for name, uri, value in (("better", better, 0.90), ("worse", worse, 0.58)):
        metrics = tmp_path / f"{name}.json"
        metrics.write_text(json.dumps({"metrics": {"zeroshot_top1_heldout": value}}))
        command = [CLIPFLOW, "promote", "--model-uri", uri, "--metrics", str(metrics), *_cli_args(params)]
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        results.append(json.loads(stdout))

    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("clip-race", CHAMPION)
    assert champion.tags["metric.zeroshot_top1_heldout"] == "0.9"
    assert champion.tags["promotion"] == "champion"
    assert results[0]["promoted"]
    assert not client.search_registered_models(filter_string="name = 'clip-race.promotion-lock'")


def test_a_promotion_waits_while_another_holds_the_lock(registry, small_params, tmp_path):
    params = _params(small_params, registry, "clip-lock")
    tracking.setup(params.tracking)
    uri = _logged_model(registry)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"metrics": {"zeroshot_top1_heldout": 0.7}}))
    client = mlflow.MlflowClient()
    with promotion_lock(client, "clip-lock"):
        process = subprocess.Popen(
            [CLIPFLOW, "promote", "--model-uri", uri, "--metrics", str(metrics), *_cli_args(params)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # it registers its version and aliases it challenger, then waits for the lock
        deadline = time.monotonic() + 120
        while not client.search_model_versions("name = 'clip-lock'") and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3)
        assert process.poll() is None
        with pytest.raises(mlflow.exceptions.MlflowException):
            client.get_model_version_by_alias("clip-lock", CHAMPION)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert json.loads(stdout)["promoted"]
    assert str(client.get_model_version_by_alias("clip-lock", CHAMPION).version) == "1"


@pytest.mark.parametrize("value", ["NaN", "Infinity", '"0.9"', "null"])
def test_promote_refuses_a_bad_metric_before_registering_anything(registry, small_params, tmp_path, value):
    params = _params(small_params, registry, "clip-hostile")
    tracking.setup(params.tracking)
    uri = _logged_model(registry)
    metrics = tmp_path / "metrics.json"
    # What json.dumps writes for NaN and inf, and what a hand-edited file holds.
    metrics.write_text(f'{{"metrics": {{"zeroshot_top1_heldout": {value}}}}}')
    promoted = subprocess.run(
        [CLIPFLOW, "promote", "--model-uri", uri, "--metrics", str(metrics), *_cli_args(params)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert promoted.returncode == 1 and "Traceback" not in promoted.stderr
    assert "zeroshot_top1_heldout" in promoted.stderr and "nothing was registered" in promoted.stderr
    assert len(promoted.stderr.strip().splitlines()) == 1
    client = mlflow.MlflowClient()
    assert not client.search_model_versions("name = 'clip-hostile'")
