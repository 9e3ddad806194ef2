"""The promote step: register a model version and move `champion` only through the gate.

Every promoted model becomes a registered version aliased `challenger`, with its metrics and
data version as tags. `champion` moves to it only when every floor in `promote.floors` holds
and no gated metric falls more than `promote.max_drop` below the current champion's. The
decision and its reason are tagged on the version (MLflow 3 aliases; stages are not used).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from clipflow import tracking
from clipflow.errors import ClipflowError
from clipflow.params import Params

CHAMPION = "champion"
CHALLENGER = "challenger"
METRIC_TAG_PREFIX = "metric."


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str


def gate(
    metrics: dict[str, float], floors: dict[str, float], max_drop: float, champion: dict[str, float] | None
) -> GateDecision:
    """Decide whether `metrics` may replace the current `champion` metrics (None: no champion yet)."""
    missing = sorted(set(floors) - set(metrics))
    if missing:
        return GateDecision(False, f"metrics missing for the gate: {', '.join(missing)}")
    for name, floor in sorted(floors.items()):
        if metrics[name] < floor:
            return GateDecision(False, f"{name}={metrics[name]:.4f} is below its floor {floor:.4f}")
    if champion:
        for name in sorted(floors):
            if name in champion and metrics[name] < champion[name] - max_drop:
                return GateDecision(
                    False,
                    f"{name}={metrics[name]:.4f} drops more than {max_drop} below the champion's {champion[name]:.4f}",
                )
        return GateDecision(True, "passes every floor and holds up against the champion")
    return GateDecision(True, "passes every floor; no champion yet")


def promote(
    model_uri: str, metrics: dict[str, float], params: Params, data_version: str | None = None
) -> dict[str, Any]:
    """Register `model_uri`, alias it `challenger`, and make it `champion` if the gate passes.

    Returns:
        `model_name`, `model_version`, `aliases` (of this version), `promoted`, `reason`, `seconds`.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    started = time.perf_counter()
    tracking.setup(params.tracking)
    client = mlflow.MlflowClient()
    name = params.promote.model_name
    try:
        version = mlflow.register_model(model_uri, name).version
    except MlflowException as exc:
        raise ClipflowError(f"cannot register {model_uri}: {exc.message.splitlines()[0]}") from None

    for metric, value in metrics.items():
        client.set_model_version_tag(name, version, f"{METRIC_TAG_PREFIX}{metric}", str(value))
    if data_version:
        client.set_model_version_tag(name, version, "data_version", data_version)
    client.set_registered_model_alias(name, CHALLENGER, version)

    champion = _champion_metrics(client, name)
    decision = gate(metrics, params.promote.floors, params.promote.max_drop, champion)
    if decision.passed:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promotion", "champion" if decision.passed else "rejected")
    client.set_model_version_tag(name, version, "promotion_reason", decision.reason)
    aliases = client.get_model_version(name, version).aliases
    return {
        "model_name": name,
        "model_version": str(version),
        "aliases": sorted(aliases),
        "promoted": decision.passed,
        "reason": decision.reason,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _champion_metrics(client, name: str) -> dict[str, float] | None:
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return {
        key[len(METRIC_TAG_PREFIX) :]: float(value)
        for key, value in champion.tags.items()
        if key.startswith(METRIC_TAG_PREFIX)
    }
