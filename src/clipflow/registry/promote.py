"""The promote step: register a model version and move `champion` only through the gate.

Every promoted model becomes a registered version with its metrics and data version as tags.
`champion` moves to it only when the gate passes: every floor in `promote.floors` holds, every
zero-shot top-1 in `promote.min_over_chance` is that far above its set's chance, and no gated
metric (one with a floor or a margin) is worse than the starting model's (`baseline_<metric>`,
when fine-tuning started from one) or the current champion's by more than `promote.max_drop`
beyond evaluation noise. Noise is judged with a paired bootstrap over the evaluation items
(`per_item.parquet` of both evaluations, paired by sample key): a comparison fails when the upper
bound of the interval of (this model - the other) lies below -max_drop. Where the other's
per-item results are missing or cover other items (another data version), the comparison is the
plain difference of the two values, and the check says so.

A version the gate refuses is aliased `challenger` instead, so `challenger` never names a version
that became champion. The decision and its reason are tagged on the version (MLflow 3 aliases;
stages are not used), its description explains them (each check with its numbers and interval),
and each new champion remembers the one it replaced, so `rollback` can move back. The same
explanation completes the evaluation summary (`evaluation/summary.md`) of the run that trained it.

Reading the champion, deciding and moving the aliases happen under a registry-wide lock, so
two promotions racing cannot both pass against the same old champion and leave the worse
one in place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipflow import tracking
from clipflow.artifacts import (
    BASELINE_PREFIX,
    EVALUATION_ARTIFACTS,
    PER_ITEM_BASELINE,
    PER_ITEM_FILE,
    PER_ITEM_MODEL,
    SUMMARY_FILE,
    WISEFT_ALPHA_TAG,
    JsonRecord,
)
from clipflow.errors import ClipflowError
from clipflow.metric_names import ZEROSHOT_CHANCE, ZEROSHOT_TOP1
from clipflow.params import Params
from clipflow.registry.bootstrap import paired_bootstrap

if TYPE_CHECKING:
    import pandas as pd

CHAMPION = "champion"
CHALLENGER = "challenger"
METRIC_TAG_PREFIX = "metric."
PREVIOUS_CHAMPION_TAG = "previous_champion"
LOCK_SUFFIX = ".promotion-lock"
LOCK_TIMEOUT_S = 120.0
# A lock older than this is taken to belong to a promotion that died without releasing it.
LOCK_STALE_S = 600.0
# What a gate check compares a metric with.
FLOOR = "floor"
OVER_CHANCE = "chance"
AGAINST_BASELINE = "baseline"
AGAINST_CHAMPION = "champion"
# Below this share of the candidate's items found in the other's results, the two were evaluated on other
# data (another data version, another split): pairing a few would judge a different set of images.
MIN_PAIRED_SHARE = 0.9
# The section `promote` adds to the evaluation's summary.md; a later promotion of the same run replaces it.
SUMMARY_HEADING = "## Promotion"


@dataclass(frozen=True)
class GateCheck:
    """One comparison of the gate: a metric against its floor, its set's chance plus a margin, or another model.

    Against another model (the baseline or the champion) `difference` is this model's value less the
    other's. With `interval` (the paired bootstrap over `items` evaluation items) the check passes when
    the interval's upper bound is at least `threshold` (-max_drop); without, when `value` is at least
    `threshold` (the other's value less max_drop), and `note` says why it is a plain comparison.
    """

    metric: str
    against: str  # FLOOR, OVER_CHANCE, AGAINST_BASELINE or AGAINST_CHAMPION
    value: float | None  # None: the evaluation did not report it
    threshold: float  # the lowest value (of `value`, or of the interval's upper bound) that passes
    passed: bool
    reference: float | None = None  # the other model's value, or the chance level
    difference: float | None = None
    interval: tuple[float, float] | None = None
    confidence: float | None = None  # the interval's level
    items: int = 0
    note: str = ""


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    checks: tuple[GateCheck, ...] = ()


@dataclass(frozen=True)
class PerItem:
    """The per-item hits the gate pairs (rows of `per_item.parquet`: metric, key, hit), one table per model.

    A model without a table is compared plainly; `missing` says why it has none, by AGAINST_BASELINE or
    AGAINST_CHAMPION.
    """

    candidate: pd.DataFrame | None = None
    baseline: pd.DataFrame | None = None
    champion: pd.DataFrame | None = None
    missing: dict[str, str] = field(default_factory=dict)
    samples: int = 1000
    confidence: float = 0.95


@dataclass(frozen=True)
class PromoteResult(JsonRecord):
    model_name: str
    model_version: str
    aliases: list[str]  # of this version
    promoted: bool
    reason: str
    previous_champion: str | None  # the version it replaced
    seconds: float
    model_uri: str = ""  # the registered version, `models:/NAME/VERSION`
    source_model: str = ""  # the logged model that was registered
    run_id: str | None = None  # the run that logged it (and its evaluation)
    data_version: str | None = None
    compared_with: str | None = None  # the champion the gate judged it against
    checks: tuple[GateCheck, ...] = ()

    @classmethod
    def from_json(cls, text: str) -> PromoteResult:
        values = json.loads(text)
        checks = tuple(
            GateCheck(**{**each, "interval": tuple(each["interval"]) if each.get("interval") else None})
            for each in values.pop("checks", ())
        )
        return cls(**values, checks=checks)


@dataclass(frozen=True)
class RollbackResult(JsonRecord):
    model_name: str
    champion: str  # the version that is champion again
    rolled_back: str


def check_metrics(metrics: dict[str, Any], gated: Iterable[str]) -> None:
    """Every gated metric, and what it is compared with, must be a finite fraction, as `clipflow evaluate` writes them.

    NaN compares false with every floor and would pass; Infinity would make a champion that no
    later model can beat; a string or null would fail only after the version is registered.

    Args:
        metrics: the evaluation's metrics.
        gated: the metrics the gate reads; their `baseline_` figures and, for a zero-shot top-1, the set's
            chance are checked too where the evaluation reports them.

    Raises:
        ClipflowError: a gated metric that is missing, not a number, or outside [0, 1].
    """
    names = set(gated)
    names |= {f"{BASELINE_PREFIX}{name}" for name in names}
    names |= {_chance_metric(name) for name in names if name.startswith(ZEROSHOT_TOP1)}
    for name in sorted(names):
        if name not in metrics:
            continue  # the gate rejects it, with its reason recorded on the version
        value = metrics[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ClipflowError(f"metric {name}={value!r} is not a finite number; nothing was registered")
        if not 0.0 <= value <= 1.0:
            raise ClipflowError(f"metric {name}={value!r} is outside [0, 1]; nothing was registered")


def _chance_metric(top1: str) -> str:
    """`zeroshot_chance_<set>` of `zeroshot_top1_<set>` (or of its `baseline_` figure)."""
    return ZEROSHOT_CHANCE + top1.removeprefix(BASELINE_PREFIX).removeprefix(ZEROSHOT_TOP1)


def gate(
    metrics: dict[str, float],
    floors: dict[str, float],
    max_drop: float,
    champion: dict[str, float] | None,
    min_over_chance: dict[str, float] | None = None,
    per_item: PerItem | None = None,
) -> GateDecision:
    """Decide whether `metrics` may replace the current `champion` metrics (None: no champion yet).

    Args:
        metrics: the candidate's evaluation, with `baseline_<metric>` figures when it was fine-tuned.
        floors: metric -> the lowest value that passes.
        max_drop: how far a gated metric may fall below the baseline's and the champion's, beyond noise.
        champion: the current champion's metrics.
        min_over_chance: `zeroshot_top1_<set>` -> the margin above `zeroshot_chance_<set>` it needs.
        per_item: the per-item hits to pair for the bootstrap (None: every comparison is plain).

    Every check is made, so the decision lists them all; the reason names the first that failed.
    """
    min_over_chance = min_over_chance or {}
    per_item = per_item or PerItem()
    gated = sorted(set(floors) | set(min_over_chance))

    def floor(name: str, against: str, threshold: float, reference: float | None = None) -> GateCheck:
        value = metrics.get(name)
        passed = value is not None and bool(value >= threshold)  # NaN fails here too
        return GateCheck(name, against, value, threshold, passed, reference)

    checks = [floor(name, FLOOR, threshold) for name, threshold in sorted(floors.items())]
    for name, margin in sorted(min_over_chance.items()):
        chance = metrics.get(_chance_metric(name))
        checks.append(floor(name, OVER_CHANCE, (chance if chance is not None else 1.0) + margin, chance))
    baseline = {name: metrics[f"{BASELINE_PREFIX}{name}"] for name in gated if f"{BASELINE_PREFIX}{name}" in metrics}
    # A champion tagged with a non-finite metric (before check_metrics existed) must not block every successor.
    held = {name: champion[name] for name in gated if name in (champion or {}) and math.isfinite(champion[name])}
    for against, others, rows in (
        (AGAINST_BASELINE, baseline, per_item.baseline),
        (AGAINST_CHAMPION, held, per_item.champion),
    ):
        note = per_item.missing.get(against, "")
        checks += [
            _compare(name, metrics.get(name), others[name], rows, against, note, max_drop, per_item)
            for name in sorted(others)
        ]
    missing = sorted(set(gated) - set(metrics))
    missing += sorted(_chance_metric(name) for name in min_over_chance if _chance_metric(name) not in metrics)
    failed = next((c for c in checks if not c.passed), None)
    if missing:
        reason = f"metrics missing for the gate: {', '.join(missing)}"
    elif failed:
        reason = _failure(failed, max_drop)
    else:
        compared = [who for who, values in (("the baseline", baseline), ("the champion", held)) if values]
        reason = "passes every floor" + (f" and holds up against {' and '.join(compared)}" if compared else "")
        reason += "" if champion else "; no champion yet"
    return GateDecision(not missing and failed is None, reason, tuple(checks))


def _compare(
    name: str,
    value: float | None,
    reference: float,
    reference_rows: pd.DataFrame | None,
    against: str,
    note: str,
    max_drop: float,
    per_item: PerItem,
) -> GateCheck:
    """`name` against another model's value: paired over the items both evaluations scored, else plainly."""
    if value is None:
        return GateCheck(name, against, None, reference - max_drop, False, reference)
    paired = None
    if per_item.candidate is None:
        note = "this model's per-item results were not found"
    elif reference_rows is None:
        note = note or f"the {against}'s per-item results were not found"
    else:
        paired = _paired(per_item.candidate, reference_rows, name)
        if paired is None:
            note = f"the {against} was scored on other items (another data version?)"
    if paired is None:
        passed = bool(value >= reference - max_drop)
        return GateCheck(name, against, value, reference - max_drop, passed, reference, value - reference, note=note)
    result = paired_bootstrap(*paired, samples=per_item.samples, confidence=per_item.confidence)
    lowest = -max_drop or 0.0  # not -0.0, which reads as a drop
    return GateCheck(
        name,
        against,
        value,
        lowest,
        result.high >= lowest,
        reference,
        result.difference,
        (result.low, result.high),
        result.confidence,
        result.items,
    )


def _paired(candidate: pd.DataFrame, reference: pd.DataFrame, metric: str):
    """(candidate hits, reference hits) of `metric` over the keys both scored, or None when too few are shared."""
    mine = candidate[candidate["metric"] == metric]
    theirs = reference[reference["metric"] == metric]
    both = mine.merge(theirs, on="key", suffixes=("", "_reference"))
    if mine.empty or len(both) < MIN_PAIRED_SHARE * len(mine):
        return None
    return both["hit"].to_numpy(), both["hit_reference"].to_numpy()


def _failure(check: GateCheck, max_drop: float) -> str:
    """The reason of a refusal, naming the check that failed and its numbers."""
    if check.against == FLOOR:
        return f"{check.metric}={check.value:.4f} is below its floor {check.threshold:.4f}"
    if check.against == OVER_CHANCE:
        if check.reference is None:
            return f"{check.metric} has no chance level to be above ({_chance_metric(check.metric)} is missing)"
        return (
            f"{check.metric}={check.value:.4f} is not {check.threshold - check.reference:.4f} above "
            f"chance ({check.reference:.4f})"
        )
    who = "baseline it was fine-tuned from" if check.against == AGAINST_BASELINE else "champion"
    if check.value is None:
        return f"{check.metric} is missing, to compare with the {who}"
    if check.interval is None:
        return (
            f"{check.metric}={check.value:.4f} drops more than {max_drop} below the {who} ({check.reference:.4f}) "
            f"({check.note}: plain comparison)"
        )
    low, high = check.interval
    return (
        f"{check.metric}={check.value:.4f} is worse than the {who} ({check.reference:.4f}) beyond noise: "
        f"difference {check.difference:+.4f}, {check.confidence:.0%} interval [{low:+.4f}, {high:+.4f}] over "
        f"{check.items} paired items, all below -{max_drop}"
    )


def promote(
    model_uri: str, metrics: dict[str, float], params: Params, data_version: str | None = None
) -> PromoteResult:
    """Register `model_uri`; make it `champion` if the gate passes, else `challenger`.

    The version's description explains the decision (see `describe`), and the summary.md that
    `evaluate` logged to the model's run gets the same section.

    Raises:
        ClipflowError: a gated metric that is not a finite fraction (before anything is
            registered), or a model the registry cannot register.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    started = time.perf_counter()
    settings = params.promote
    settings.check()  # at params load too; params built in code reach here unchecked
    check_metrics(metrics, settings.gated)
    tracking.setup(params.tracking)
    client = mlflow.MlflowClient()
    name = params.promote.model_name
    tags = {f"{METRIC_TAG_PREFIX}{metric}": str(value) for metric, value in metrics.items()}
    if data_version:
        tags["data_version"] = data_version
    try:
        registered = mlflow.register_model(model_uri, name, tags=tags)
    except MlflowException as exc:
        raise ClipflowError(f"cannot register {model_uri}: {exc.message.splitlines()[0]}") from None
    version = str(registered.version)
    _copy_wiseft_tag(client, registered, model_uri)
    candidate = _run_per_item(client, registered.run_id)

    with promotion_lock(client, name):
        champion = _champion(client, name)
        per_item = _per_item(client, candidate, champion, data_version, settings.bootstrap_samples, settings.confidence)
        decision = gate(
            metrics,
            settings.floors,
            settings.max_drop,
            champion and version_metrics(champion),
            settings.min_over_chance,
            per_item,
        )
        if decision.passed:
            if champion:
                client.set_model_version_tag(name, version, PREVIOUS_CHAMPION_TAG, str(champion.version))
            client.set_registered_model_alias(name, CHAMPION, version)
        else:
            client.set_registered_model_alias(name, CHALLENGER, version)
    client.set_model_version_tag(name, version, "promotion", "champion" if decision.passed else "rejected")
    client.set_model_version_tag(name, version, "promotion_reason", decision.reason)
    result = PromoteResult(
        model_name=name,
        model_version=version,
        aliases=sorted(client.get_model_version(name, version).aliases),
        promoted=decision.passed,
        reason=decision.reason,
        previous_champion=str(champion.version) if champion and decision.passed else None,
        seconds=0.0,
        model_uri=f"models:/{name}/{version}",
        source_model=model_uri,
        run_id=registered.run_id or None,
        data_version=data_version,
        compared_with=str(champion.version) if champion else None,
        checks=decision.checks,
    )
    section = describe(result)
    client.update_model_version(name, version, description=section)
    if result.run_id:
        _complete_summary(client, result.run_id, section)
    return replace(result, seconds=round(time.perf_counter() - started, 2))


def _copy_wiseft_tag(client, version, model_uri: str) -> None:
    """The WiSE-FT `a` of the registered weights on the version: a mix's, tagged by `evaluate` on the logged model
    (`models:/m-...`); or 1 for the fine-tuned weights themselves, when the run's curve chose them."""
    import mlflow

    model_id = model_uri.removeprefix("models:/")
    alpha = mlflow.get_logged_model(model_id).tags.get(WISEFT_ALPHA_TAG) if model_id.startswith("m-") else None
    if alpha is None and version.run_id:
        chosen = client.get_run(version.run_id).data.tags.get(WISEFT_ALPHA_TAG)
        alpha = chosen if chosen is not None and float(chosen) == 1.0 else None
    if alpha is not None:
        client.set_model_version_tag(version.name, version.version, WISEFT_ALPHA_TAG, alpha)


def _run_per_item(client, run_id: str | None) -> pd.DataFrame | None:
    """The per_item.parquet that `evaluate` logged to a run; None when it logged none."""
    import pandas as pd

    path = f"{EVALUATION_ARTIFACTS}/{PER_ITEM_FILE}"
    if not run_id or path not in {artifact.path for artifact in client.list_artifacts(run_id, EVALUATION_ARTIFACTS)}:
        return None
    with tempfile.TemporaryDirectory() as folder:
        return pd.read_parquet(client.download_artifacts(run_id, path, folder))


def _per_item(client, candidate, champion, data_version: str | None, samples: int, confidence: float) -> PerItem:
    """What the gate pairs: the candidate's and its baseline's rows, and the champion's where they cover this data."""
    missing = {}
    baseline = None
    if candidate is not None:
        baseline = candidate[candidate["model"] == PER_ITEM_BASELINE]
        candidate = candidate[candidate["model"] == PER_ITEM_MODEL]
        if baseline.empty:
            baseline, missing[AGAINST_BASELINE] = None, "the evaluation holds no per-item results of the baseline"
    held = None
    if champion is not None:
        held_version = champion.tags.get("data_version")
        if data_version and held_version and held_version != data_version:
            missing[AGAINST_CHAMPION] = (
                f"the champion was evaluated on data version {held_version}, this model on {data_version}"
            )
        else:
            held = _run_per_item(client, champion.run_id)
            if held is None:
                missing[AGAINST_CHAMPION] = f"the champion's run {champion.run_id} holds no {PER_ITEM_FILE}"
            else:
                held = held[held["model"] == PER_ITEM_MODEL]
    return PerItem(candidate, baseline, held, missing, samples, confidence)


def describe(result: PromoteResult) -> str:
    """The promotion in Markdown: the decision, every check with its value and threshold, where the model is.

    It is the registered version's description and the last section of the evaluation summary.
    """
    name, version = result.model_name, result.model_version
    if result.promoted:
        verdict = f"**Promoted**: version {version} of `{name}` is now `{CHAMPION}`"
    else:
        champion = f"`{CHAMPION}` stays version {result.compared_with}" if result.compared_with else "no champion yet"
        verdict = f"**Not promoted**: version {version} of `{name}` is `{CHALLENGER}`; {champion}"
    lines = [
        SUMMARY_HEADING,
        "",
        f"{verdict}: {result.reason}.",
        "",
        "| metric | value | compared with | passes at | result |",
        "| --- | --- | --- | --- | --- |",
    ]
    for check in result.checks:
        value = "missing" if check.value is None else f"{check.value:.4f}"
        passed = "pass" if check.passed else "**fail**"
        lines.append(
            f"| `{check.metric}` | {value} | {_compared_with(check, result)} | {_passes_at(check)} | {passed} |"
        )
    if any(check.interval for check in result.checks):
        lines += [
            "",
            "Against another model with an interval: the difference (this model less the other) over the evaluation "
            "items both scored, with its paired bootstrap interval; such a check fails only when the whole interval "
            "lies below the allowed drop, that is beyond evaluation noise.",
        ]
    if result.compared_with is None:
        lines += ["", "There was no champion to compare with."]
    lines += ["", f"- Registered model: `{result.model_uri}` (aliases: {', '.join(result.aliases) or 'none'})"]
    origin = f", logged by run `{result.run_id}`" if result.run_id else ""
    lines.append(f"- Logged model: `{result.source_model}`{origin}")
    if result.data_version:
        lines.append(f"- Data version: `{result.data_version}`")
    return "\n".join(lines) + "\n"


def _compared_with(check: GateCheck, result: PromoteResult) -> str:
    if check.against == FLOOR:
        return "its floor"
    if check.against == OVER_CHANCE:
        if check.reference is None:
            return "chance: missing"
        return f"chance {check.reference:.4f}, plus the margin {check.threshold - check.reference:.4f}"
    who = f"champion version {result.compared_with}" if check.against == AGAINST_CHAMPION else "baseline"
    if check.value is None:
        return f"{who}: {check.reference:.4f}"
    if check.interval is None:
        drop = check.reference - check.threshold
        return f"{who}: {check.reference:.4f}, less the allowed drop {drop:.4f} ({check.note}: plain comparison)"
    low, high = check.interval
    return (
        f"{who}: {check.reference:.4f}; difference {check.difference:+.4f}, "
        f"{check.confidence:.0%} interval [{low:+.4f}, {high:+.4f}] over {check.items} paired items"
    )


def _passes_at(check: GateCheck) -> str:
    if check.interval is None:
        return f"{check.threshold:.4f} or more"
    return f"upper bound {check.threshold:+.4f} or more"


def _complete_summary(client, run_id: str, section: str) -> None:
    """Add `section` to the summary.md `evaluate` logged to the run, in place of an earlier promotion's.

    A run that holds no evaluation summary (promoted with metrics from elsewhere) is left as it is.
    """
    path = f"{EVALUATION_ARTIFACTS}/{SUMMARY_FILE}"
    if path not in {artifact.path for artifact in client.list_artifacts(run_id, EVALUATION_ARTIFACTS)}:
        return
    with tempfile.TemporaryDirectory() as folder:
        text = Path(client.download_artifacts(run_id, path, folder)).read_text(encoding="utf-8")
    evaluation = text.split(f"\n{SUMMARY_HEADING}\n")[0].rstrip("\n")
    client.log_text(run_id, f"{evaluation}\n\n{section}", path)


def rollback(params: Params) -> RollbackResult:
    """Move `champion` back to the version the current champion replaced.

    Repeated rollbacks walk further back through the champions' history.

    Raises:
        ClipflowError: there is no champion, or it replaced none.
    """
    import mlflow

    tracking.setup(params.tracking)
    client = mlflow.MlflowClient()
    name = params.promote.model_name
    with promotion_lock(client, name):
        current = _champion(client, name)
        if current is None:
            raise ClipflowError(f"{name} has no champion to roll back")
        previous = current.tags.get(PREVIOUS_CHAMPION_TAG)
        if not previous:
            raise ClipflowError(
                f"{name} version {current.version} replaced no earlier champion; nothing to roll back to"
            )
        client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_model_version_tag(name, current.version, "promotion", "rolled_back")
    client.set_model_version_tag(name, current.version, "promotion_reason", f"rolled back to version {previous}")
    return RollbackResult(model_name=name, champion=str(previous), rolled_back=str(current.version))


@contextlib.contextmanager
def promotion_lock(client, name: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the promotion lock of a registered model for the duration of the block.

    The lock is a registered model named `<name>.promotion-lock`: creating a registered
    model is atomic in every MLflow backend (the name is unique), so exactly one caller
    succeeds, through a tracking server or straight against a database.

    Raises:
        ClipflowError: another promotion held the lock for longer than `timeout_s`.
    """
    from mlflow.exceptions import MlflowException

    lock = f"{name}{LOCK_SUFFIX}"
    holder = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={"holder": holder, "acquired_at": str(time.time())},
                description=f"Held while a promotion of {name} moves its aliases; deleted afterwards.",
            )
            break
        except MlflowException as exc:
            # Taken, or released in between: MLflow answers a create that collides with a lock
            # deleted a moment later with "does not exist" (it looks the lock up to report it).
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        _remove_if_stale(client, lock)
        if time.monotonic() > deadline:
            raise ClipflowError(f"another promotion of {name} has held {lock!r} for over {timeout_s:.0f}s")
        time.sleep(random.uniform(0.1, 0.4))
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def _remove_if_stale(client, lock: str) -> None:
    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):  # released meanwhile: nothing to do
        acquired_at = float(client.get_registered_model(lock).tags.get("acquired_at", "0"))
        if time.time() - acquired_at > LOCK_STALE_S:
            client.delete_registered_model(lock)


def _champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def version_metrics(version) -> dict[str, float]:
    """The metrics `promote` tagged a registered model version with (`metric.<name>` tags).

    Raises:
        ClipflowError: a metric tag that is not a number.
    """
    metrics = {}
    for key, value in version.tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                metrics[key.removeprefix(METRIC_TAG_PREFIX)] = float(value)
            except ValueError:
                raise ClipflowError(
                    f"{version.name} version {version.version}: tag {key}={value!r} is not a number"
                ) from None
    return metrics
