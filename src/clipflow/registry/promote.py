"""The promote step: register a model version and move `champion` only through the gate.

Every promoted model becomes a registered version with its metrics and data version as tags.
`champion` moves to it only when every floor in `promote.floors` holds and no gated metric
falls more than `promote.max_drop` below the current champion's; a version the gate refuses is
aliased `challenger` instead, so `challenger` never names a version that became champion. The
decision and its reason are tagged on the version (MLflow 3 aliases; stages are not used), its
description explains them (each floor and each comparison with the champion, with the numbers),
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
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from clipflow import tracking
from clipflow.artifacts import EVALUATION_ARTIFACTS, SUMMARY_FILE, JsonRecord
from clipflow.errors import ClipflowError
from clipflow.params import Params

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
AGAINST_CHAMPION = "champion"
# The section `promote` adds to the evaluation's summary.md; a later promotion of the same run replaces it.
SUMMARY_HEADING = "## Promotion"


@dataclass(frozen=True)
class GateCheck:
    """One comparison of the gate: a metric against its floor, or against the champion's value less `max_drop`."""

    metric: str
    against: str  # FLOOR or AGAINST_CHAMPION
    value: float | None  # None: the evaluation did not report it
    threshold: float  # the lowest value that passes
    passed: bool
    champion: float | None = None  # against the champion: its value


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    checks: tuple[GateCheck, ...] = ()


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
        checks = tuple(GateCheck(**each) for each in values.pop("checks", ()))
        return cls(**values, checks=checks)


@dataclass(frozen=True)
class RollbackResult(JsonRecord):
    model_name: str
    champion: str  # the version that is champion again
    rolled_back: str


def check_metrics(metrics: dict[str, Any], floors: dict[str, float]) -> None:
    """Every gated metric must be a finite fraction, as `clipflow evaluate` writes them.

    NaN compares false with every floor and would pass; Infinity would make a champion that no
    later model can beat; a string or null would fail only after the version is registered.

    Raises:
        ClipflowError: a gated metric that is missing, not a number, or outside [0, 1].
    """
    for name in sorted(floors):
        if name not in metrics:
            continue  # the gate rejects it, with its reason recorded on the version
        value = metrics[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ClipflowError(f"metric {name}={value!r} is not a finite number; nothing was registered")
        if not 0.0 <= value <= 1.0:
            raise ClipflowError(f"metric {name}={value!r} is outside [0, 1]; nothing was registered")


def gate(
    metrics: dict[str, float], floors: dict[str, float], max_drop: float, champion: dict[str, float] | None
) -> GateDecision:
    """Decide whether `metrics` may replace the current `champion` metrics (None: no champion yet).

    Every check is made, so the decision lists them all; the reason names the first that failed.
    """

    def check(name: str, against: str, threshold: float, champion_value: float | None = None) -> GateCheck:
        value = metrics.get(name)
        passed = value is not None and value >= threshold  # NaN fails here too
        return GateCheck(name, against, value, threshold, passed, champion_value)

    checks = [check(name, FLOOR, floor) for name, floor in sorted(floors.items())]
    if champion:
        # A champion tagged with a non-finite metric (before check_metrics existed) must not block every successor.
        gated = [name for name in sorted(floors) if name in champion and math.isfinite(champion[name])]
        checks += [check(name, AGAINST_CHAMPION, champion[name] - max_drop, champion[name]) for name in gated]
    missing = sorted(set(floors) - set(metrics))
    failed = next((c for c in checks if not c.passed), None)
    if missing:
        reason = f"metrics missing for the gate: {', '.join(missing)}"
    elif failed and failed.against == FLOOR:
        reason = f"{failed.metric}={failed.value:.4f} is below its floor {failed.threshold:.4f}"
    elif failed:
        reason = (
            f"{failed.metric}={failed.value:.4f} drops more than {max_drop} below the champion's {failed.champion:.4f}"
        )
    elif champion:
        reason = "passes every floor and holds up against the champion"
    else:
        reason = "passes every floor; no champion yet"
    return GateDecision(not missing and failed is None, reason, tuple(checks))


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
    params.promote.check()  # at params load too; params built in code reach here unchecked
    check_metrics(metrics, params.promote.floors)
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

    with promotion_lock(client, name):
        champion = _champion(client, name)
        decision = gate(metrics, params.promote.floors, params.promote.max_drop, champion and version_metrics(champion))
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
        if check.against == FLOOR:
            against = "its floor"
        else:
            drop = check.champion - check.threshold
            against = f"champion version {result.compared_with}: {check.champion:.4f}, less the allowed drop {drop:.4f}"
        passed = "pass" if check.passed else "**fail**"
        lines.append(f"| `{check.metric}` | {value} | {against} | {check.threshold:.4f} or more | {passed} |")
    if result.compared_with is None:
        lines += ["", "There was no champion to compare with: only the floors applied."]
    lines += ["", f"- Registered model: `{result.model_uri}` (aliases: {', '.join(result.aliases) or 'none'})"]
    origin = f", logged by run `{result.run_id}`" if result.run_id else ""
    lines.append(f"- Logged model: `{result.source_model}`{origin}")
    if result.data_version:
        lines.append(f"- Data version: `{result.data_version}`")
    return "\n".join(lines) + "\n"


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
