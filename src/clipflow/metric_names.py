"""The names of the evaluation's metrics, as metrics.json, MLflow and the promotion gate spell them.

The evaluate step names its results with these functions, and the validate step, before training,
lists the metrics an evaluation of the data will produce, so that a floor naming any other fails there.
"""

from __future__ import annotations

from collections.abc import Iterable

# Each zero-shot set gives these, as `zeroshot_<kind>_<set>`; chance is 1 / its number of classes.
ZEROSHOT_KINDS = ("top1", "top5", "mean_per_class_recall", "chance")
# The prefixes of a set's top-1 (what the gate reads of zero-shot) and of its chance level.
ZEROSHOT_TOP1 = "zeroshot_top1_"
ZEROSHOT_CHANCE = "zeroshot_chance_"


def zeroshot_metric(kind: str, set_name: str) -> str:
    return f"zeroshot_{kind}_{set_name}"


def prompt_sensitivity_metric(set_name: str) -> str:
    return f"prompt_sensitivity_{set_name}"


def retrieval_metric(direction: str, k: int, by_label: bool = False) -> str:
    """`retrieval_{i2t,t2i}_r{k}` per pair; `retrieval_{i2t,t2i}_label_r{k}` per label."""
    return f"retrieval_{direction}{'_label' if by_label else ''}_r{k}"


def probe_metric(kind: str) -> str:
    return f"probe_{kind}"


# The distribution-shift report's methods, and where each is scored besides every kind of shift.
SHIFT_METHODS = ("zeroshot", "linear_probe")
SHIFT_WHERE = ("in_distribution", "shifted")
# How much less top-1 zero-shot loses under the shift than the linear probe does (clipflow.evaluate.shift).
EFFECTIVE_ROBUSTNESS = "shift_effective_robustness"


def shift_metric(method: str, where: str) -> str:
    """`shift_<method>_top1_<where>`: a method's top-1 in distribution, shifted, or under one kind of shift."""
    return f"shift_{method}_top1_{where}"


def evaluation_metrics(
    zeroshot_sets: Iterable[str],
    recall_k: Iterable[int],
    by_label: bool,
    probes: Iterable[str],
    shifts: Iterable[str] = (),
) -> set[str]:
    """Every metric an evaluation produces with these zero-shot sets, ranks, label-level retrieval, probes and
    kinds of distribution shift (none: no shift report)."""
    zeroshot_sets = list(zeroshot_sets)
    names = {zeroshot_metric(kind, name) for name in zeroshot_sets for kind in ZEROSHOT_KINDS}
    names |= {prompt_sensitivity_metric(name) for name in zeroshot_sets}
    labels = (False, True) if by_label else (False,)
    names |= {retrieval_metric(d, k, label) for d in ("i2t", "t2i") for k in recall_k for label in labels}
    names |= {probe_metric(kind) for kind in probes}
    shifts = list(shifts)
    if shifts:
        names |= {shift_metric(m, where) for m in SHIFT_METHODS for where in (*SHIFT_WHERE, *shifts)}
        names.add(EFFECTIVE_ROBUSTNESS)
    return names
