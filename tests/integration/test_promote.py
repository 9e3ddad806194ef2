"""Registration, the promotion gate, rollback and racing promotions against a real `mlflow server`
whose artifacts live in a SeaweedFS S3 bucket."""

import dataclasses
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from clipflow import model as clip_model
from clipflow import tracking
from clipflow.artifacts import EVALUATION_ARTIFACTS, PER_ITEM_FILE, WISEFT_ALPHA_TAG
from clipflow.errors import ClipflowError
from clipflow.registry import promote as promotion
from clipflow.registry.models import download_checkpoint, log_clip_model
from clipflow.registry.promote import (
    AGAINST_BASELINE,
    AGAINST_CHAMPION,
    CHALLENGER,
    CHAMPION,
    OVER_CHANCE,
    PerItem,
    check_metrics,
    gate,
    promote,
    promotion_lock,
    rollback,
)
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


def _items(hits, metric="zeroshot_top1_digits", model="model", keys=None) -> pd.DataFrame:
    """per_item.parquet rows of one model: one per item, as the evaluate step writes them."""
    keys = keys if keys is not None else [f"test-{i:06d}" for i in range(len(hits))]
    return pd.DataFrame(
        {"model": model, "metric": metric, "set": "digits", "key": keys, "hit": np.asarray(hits, dtype="int8")}
    )


def _flipped(hits: np.ndarray, lost: int, gained: int) -> np.ndarray:
    """`hits` with its first `lost` hits turned to misses and its first `gained` misses to hits."""
    changed = hits.copy()
    changed[np.flatnonzero(hits)[:lost]] = False
    changed[np.flatnonzero(~hits)[:gained]] = True
    return changed


# 200 evaluation images, 120 right: the reference model's hits.
REFERENCE = np.arange(200) < 120
FLOORS = {"zeroshot_top1_digits": 0.3}


def test_gate_refuses_a_model_worse_than_its_baseline_beyond_noise_and_shows_the_interval():
    worse = _flipped(REFERENCE, lost=40, gained=5)  # 0.425 against the baseline's 0.6
    metrics = {"zeroshot_top1_digits": worse.mean(), "baseline_zeroshot_top1_digits": REFERENCE.mean()}
    per_item = PerItem(candidate=_items(worse), baseline=_items(REFERENCE, model="baseline"), samples=1000)
    decision = gate(metrics, FLOORS, 0.02, None, per_item=per_item)
    assert not decision.passed
    (check,) = [c for c in decision.checks if c.against == AGAINST_BASELINE]
    assert check.items == 200 and check.difference == pytest.approx(-0.175)
    low, high = check.interval
    assert low < -0.175 < high < -0.02
    assert decision.reason.startswith(
        "zeroshot_top1_digits=0.4250 is worse than the baseline it was fine-tuned from (0.6000) "
        "beyond noise: difference -0.1750, 95% interval ["
    )
    assert f"[{low:+.4f}, {high:+.4f}] over 200 paired items, all below -0.02" in decision.reason
    # better than its baseline: passes, with an interval above zero
    better = gate(
        {"zeroshot_top1_digits": REFERENCE.mean(), "baseline_zeroshot_top1_digits": worse.mean()},
        FLOORS,
        0.02,
        None,
        per_item=PerItem(candidate=_items(REFERENCE), baseline=_items(worse, model="baseline")),
    )
    assert better.passed and better.reason == "passes every floor and holds up against the baseline; no champion yet"
    assert better.checks[-1].interval[0] > 0


def test_a_same_quality_retrain_inside_the_noise_is_accepted_where_a_plain_comparison_refuses():
    # The case: another seed moved top-1 by 0.035 on 200 images, more than max_drop 0.02.
    retrain = _flipped(REFERENCE, lost=25, gained=18)
    metrics, champion = {"zeroshot_top1_digits": retrain.mean()}, {"zeroshot_top1_digits": REFERENCE.mean()}
    assert metrics["zeroshot_top1_digits"] == pytest.approx(0.565)
    plain = gate(metrics, FLOORS, 0.02, champion)
    assert not plain.passed and "drops more than 0.02 below the champion (0.6000)" in plain.reason
    assert "this model's per-item results were not found: plain comparison" in plain.reason
    paired = gate(
        metrics, FLOORS, 0.02, champion, per_item=PerItem(candidate=_items(retrain), champion=_items(REFERENCE))
    )
    assert paired.passed, paired.reason
    (check,) = [c for c in paired.checks if c.against == AGAINST_CHAMPION]
    assert check.difference == pytest.approx(-0.035) and check.interval[0] < -0.035 < -0.02 < check.interval[1]


def test_the_champion_scored_on_other_items_is_compared_plainly_and_the_check_says_so():
    retrain = _flipped(REFERENCE, lost=2, gained=0)
    other_data = _items(REFERENCE, keys=[f"other-{i}" for i in range(200)])
    decision = gate(
        {"zeroshot_top1_digits": retrain.mean()},
        FLOORS,
        0.02,
        {"zeroshot_top1_digits": REFERENCE.mean()},
        per_item=PerItem(candidate=_items(retrain), champion=other_data),
    )
    (check,) = [c for c in decision.checks if c.against == AGAINST_CHAMPION]
    assert decision.passed and check.interval is None and check.items == 0
    assert check.note == "the champion was scored on other items (another data version?)"
    assert check.difference == pytest.approx(-0.01)


def test_min_over_chance_asks_top1_to_clear_its_sets_chance_by_the_margin():
    # ten digit classes: chance is 0.1
    margin = {"zeroshot_top1_digits": 0.15}
    near_chance = gate({"zeroshot_top1_digits": 0.2, "zeroshot_chance_digits": 0.1}, {}, 0.02, None, margin)
    assert not near_chance.passed
    assert near_chance.reason == "zeroshot_top1_digits=0.2000 is not 0.1500 above chance (0.1000)"
    (check,) = near_chance.checks
    assert (check.against, check.threshold, check.reference) == (OVER_CHANCE, pytest.approx(0.25), 0.1)
    assert gate({"zeroshot_top1_digits": 0.3, "zeroshot_chance_digits": 0.1}, {}, 0.02, None, margin).passed
    no_chance = gate({"zeroshot_top1_digits": 0.9}, {}, 0.02, None, margin)
    assert not no_chance.passed and no_chance.reason == "metrics missing for the gate: zeroshot_chance_digits"


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
    assert first.promoted and first.aliases == ["champion"]

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
    # challenger names the last refused version, never one that became champion
    assert client.get_registered_model("clip-gate").aliases == {
        CHAMPION: better.model_version,
        CHALLENGER: below_floor.model_version,
    }
    rejected = client.get_model_version("clip-gate", worse.model_version)
    assert rejected.tags["promotion"] == "rejected" and "drops more than" in rejected.tags["promotion_reason"]
    # the description explains the refusal: the floor held, the drop against the champion did not
    assert "**Not promoted**" in rejected.description
    assert "| `zeroshot_top1_heldout` | 0.4000 | its floor | 0.3000 or more | pass |" in rejected.description
    # its run holds no evaluation with per-item results: the plain difference, and the check says why
    against_champion = (
        f"champion version {first.model_version}: 0.5000, less the allowed drop 0.0500 "
        "(this model's per-item results were not found: plain comparison)"
    )
    assert f"| `zeroshot_top1_heldout` | 0.4000 | {against_champion} | 0.4500 or more | **fail** |" in (
        rejected.description
    )

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


def _logged_with_items(registry, items: pd.DataFrame, tags: dict[str, str] | None = None) -> str:
    """A logged model whose run holds an evaluation's per_item.parquet, as the evaluate step logs it."""
    with mlflow.start_run(), tempfile.TemporaryDirectory() as folder:
        uri = log_clip_model(registry["checkpoint"])
        path = Path(folder) / PER_ITEM_FILE
        items.to_parquet(path, index=False)
        mlflow.log_artifact(str(path), artifact_path=EVALUATION_ARTIFACTS)
        if tags:
            mlflow.set_logged_model_tags(uri.removeprefix("models:/"), tags)
        return uri


def test_the_gate_pairs_the_evaluations_the_runs_logged(registry, small_params):
    params = _params(small_params, registry, "clip-paired")
    params = dataclasses.replace(
        params, promote=dataclasses.replace(params.promote, floors=FLOORS, max_drop=0.02, bootstrap_samples=500)
    )
    tracking.setup(params.tracking)
    client = mlflow.MlflowClient()
    first = promote(_logged_with_items(registry, _items(REFERENCE)), {"zeroshot_top1_digits": 0.6}, params, "v1")
    assert first.promoted

    # a retrain 0.035 below the champion, inside the noise, and far above its baseline; a WiSE-FT mix
    retrain, baseline = _flipped(REFERENCE, lost=25, gained=18), _flipped(REFERENCE, lost=60, gained=0)
    items = pd.concat([_items(retrain), _items(baseline, model="baseline")])
    uri = _logged_with_items(registry, items, {WISEFT_ALPHA_TAG: "0.5"})
    metrics = {"zeroshot_top1_digits": 0.565, "baseline_zeroshot_top1_digits": 0.3}
    second = promote(uri, metrics, params, data_version="v1")
    assert second.promoted, second.reason
    assert second.reason == "passes every floor and holds up against the baseline and the champion"
    checks = {check.against: check for check in second.checks}
    assert checks[AGAINST_CHAMPION].items == checks[AGAINST_BASELINE].items == 200
    version = client.get_model_version("clip-paired", second.model_version)
    assert version.tags[WISEFT_ALPHA_TAG] == "0.5"
    low, high = checks[AGAINST_CHAMPION].interval
    shown = f"difference -0.0350, 95% interval [{low:+.4f}, {high:+.4f}] over 200 paired items"
    assert f"champion version {first.model_version}: 0.6000; {shown} | upper bound -0.0200 or more | pass |" in (
        version.description
    )

    # worse than its own baseline beyond noise: refused, and the reason names the baseline and the interval
    worse = _flipped(REFERENCE, lost=40, gained=5)
    uri = _logged_with_items(registry, pd.concat([_items(worse), _items(REFERENCE, model="baseline")]))
    refused = promote(uri, {"zeroshot_top1_digits": 0.425, "baseline_zeroshot_top1_digits": 0.6}, params, "v1")
    assert not refused.promoted and refused.aliases == [CHALLENGER]
    assert refused.reason.startswith("zeroshot_top1_digits=0.4250 is worse than the baseline")
    assert "95% interval [" in refused.reason and "over 200 paired items, all below -0.02" in refused.reason
    assert client.get_model_version("clip-paired", refused.model_version).tags["promotion_reason"] == refused.reason
    assert WISEFT_ALPHA_TAG not in client.get_model_version("clip-paired", refused.model_version).tags

    # evaluated on another data version than the champion: the plain difference, and the check says why
    # (0.025 below the champion's 0.565: refused by the plain difference, which knows no noise)
    lower = _items(_flipped(REFERENCE, lost=30, gained=18))
    other = promote(_logged_with_items(registry, lower), {"zeroshot_top1_digits": 0.54}, params, "v2")
    (check,) = [check for check in other.checks if check.against == AGAINST_CHAMPION]
    assert check.interval is None and check.note == ("the champion was evaluated on data version v1, this model on v2")
    assert not other.promoted and "plain comparison" in other.reason


class LockWaiters:
    """Which promotion threads have found the lock taken: they are waiting for it, not merely slow.

    `promotion_lock` checks for a stale lock after every failed attempt to take it; noting that
    call is how a test knows, without sleeping, that a promotion stands at the lock.
    """

    def __init__(self, monkeypatch):
        self.names: set[str] = set()
        self.changed = threading.Condition()
        check_stale = promotion._remove_if_stale

        def note_then_check(client, lock):
            with self.changed:
                self.names.add(threading.current_thread().name)
                self.changed.notify_all()
            check_stale(client, lock)

        monkeypatch.setattr(promotion, "_remove_if_stale", note_then_check)

    def wait_for(self, names: set[str], timeout_s: float = 120) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: names <= self.names, timeout_s)


def _promote_in_thread(name: str, uri: str, value: float, params) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = promote(uri, {"zeroshot_top1_heldout": value}, params)
        except BaseException as exc:  # handed to the test, which re-raises it
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread, outcome


def _finished(thread: threading.Thread, outcome: dict):
    thread.join(timeout=300)
    assert not thread.is_alive(), f"promotion {thread.name} still running"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _aliases(client, name: str) -> set[str]:
    return set(client.get_registered_model(name).aliases)


def test_two_racing_promotions_leave_the_better_champion(registry, small_params, monkeypatch):
    params = _params(small_params, registry, "clip-race")
    tracking.setup(params.tracking)
    promote(_logged_model(registry), {"zeroshot_top1_heldout": 0.60}, params)
    # Each passes against the old champion; only the better one may win against the other. Both
    # are held at the lock until both wait there, so they race for it every time this test runs.
    better, worse = _logged_model(registry), _logged_model(registry)
    waiters = LockWaiters(monkeypatch)
    client = mlflow.MlflowClient()
    with promotion_lock(client, "clip-race"):
        racing = [
            _promote_in_thread(n, uri, v, params) for n, uri, v in (("better", better, 0.90), ("worse", worse, 0.58))
        ]
        assert waiters.wait_for({"better", "worse"})
    results = {thread.name: _finished(thread, outcome) for thread, outcome in racing}

    champion = client.get_model_version_by_alias("clip-race", CHAMPION)
    assert str(champion.version) == results["better"].model_version
    assert champion.tags["metric.zeroshot_top1_heldout"] == "0.9" and champion.tags["promotion"] == "champion"
    assert results["better"].promoted
    assert not client.search_registered_models(filter_string="name = 'clip-race.promotion-lock'")


def test_a_promotion_waits_while_another_holds_the_lock(registry, small_params, monkeypatch):
    params = _params(small_params, registry, "clip-lock")
    tracking.setup(params.tracking)
    uri = _logged_model(registry)
    waiters = LockWaiters(monkeypatch)
    client = mlflow.MlflowClient()
    with promotion_lock(client, "clip-lock"):
        thread, outcome = _promote_in_thread("waiting", uri, 0.7, params)
        # it registers its version, then stands at the lock before any alias moves
        assert waiters.wait_for({"waiting"})
        assert thread.is_alive() and len(client.search_model_versions("name = 'clip-lock'")) == 1
        assert _aliases(client, "clip-lock") == set()
    result = _finished(thread, outcome)
    assert result.promoted and result.model_version == "1"
    assert _aliases(client, "clip-lock") == {CHAMPION}


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
