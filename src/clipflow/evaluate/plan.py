"""Before training: the evaluation and the gate checked against the ingested data.

Everything the evaluate and promote steps would otherwise fail on only after the training, when the
data alone tells: a zero-shot set whose split or label column the data lacks, whose images are not all
labelled or labelled outside its classes, or that has fewer than two classes; a retrieval split or label
column the data lacks; a floor or margin of `promote` on a metric that no evaluation of this data produces
(`clipflow.metric_names`). The validate step runs `check_evaluation_plan` after ingest.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from clipflow.artifacts import METADATA_FILE, IngestReport
from clipflow.data.builtin import PROBE_SPLIT, PROBES, SHIFT_SPLIT, SHIFTS
from clipflow.errors import ClipflowError
from clipflow.metric_names import evaluation_metrics
from clipflow.params import EvaluateParams, Params, ZeroshotSet


def evaluation_sets(data_dir: str | Path, settings: EvaluateParams) -> dict[str, ZeroshotSet]:
    """The zero-shot sets an evaluation of `data_dir` runs: `evaluate.zeroshot`, and the built-in data's own.

    Raises:
        ClipflowError: `data_dir` is not an ingested data directory.
    """
    report = IngestReport.read(data_dir)
    return settings.zeroshot_sets(report.source == "builtin", _splits(report))


def check_evaluation_plan(data_dir: str | Path, params: Params) -> None:
    """Fail in one line on what would fail the evaluate or promote step after training.

    Raises:
        ClipflowError: the first problem found, naming the parameter to change.
    """
    data_dir = Path(data_dir)
    report = IngestReport.read(data_dir)
    splits = _splits(report)
    settings = params.evaluate
    sets = settings.zeroshot_sets(report.source == "builtin", splits)
    path = data_dir / METADATA_FILE
    try:
        columns = pq.read_schema(path).names
    except (OSError, ValueError) as exc:  # pyarrow's errors for a missing or damaged file
        raise ClipflowError(f"cannot read {path}: {exc}") from None
    if "split" not in columns:
        raise ClipflowError(f"{path} lacks columns ['split']")
    label_fields = {spec.label_field for spec in sets.values()} | ({settings.retrieval_label_field} - {None})
    read = ["split", *sorted(field for field in label_fields if field in columns)]
    metadata = pd.read_parquet(path, columns=read)
    has = f"the data has splits {sorted(splits)}"

    if settings.retrieval_split not in splits:
        raise ClipflowError(f"evaluate.retrieval_split {settings.retrieval_split!r} is not in the data: {has}")
    if settings.retrieval_label_field is not None:
        where = "evaluate.retrieval_label_field (null: recall by pairs only)"
        labels = _labels(metadata, settings.retrieval_split, settings.retrieval_label_field, columns, where)
        if labels.isna().all():
            raise ClipflowError(f"{where}: no row of split {settings.retrieval_split!r} has a value in its column")
    for name, spec in sets.items():
        where = f"zero-shot set {name!r} (evaluate.zeroshot.{name})"
        if spec.split not in splits:
            raise ClipflowError(f"{where} reads split {spec.split!r}, which is not in the data: {has}")
        labels = _labels(metadata, spec.split, spec.label_field, columns, where)
        if labels.isna().any():
            raise ClipflowError(
                f"{where}: {int(labels.isna().sum())} of {len(labels)} rows of split {spec.split!r} "
                f"have no {spec.label_field!r}"
            )
        classes = spec.classes or sorted({str(v) for v in metadata[spec.label_field].dropna()})
        outside = sorted({str(v) for v in labels} - set(classes))
        if outside:
            raise ClipflowError(f"{where}: split {spec.split!r} has labels outside its classes: {outside[:5]}")
        if len(classes) < 2:
            raise ClipflowError(
                f"{where} has {len(classes)} class ({classes}) in column {spec.label_field!r}: it needs at least 2"
            )

    probes = PROBES if PROBE_SPLIT in splits else ()
    shifts = SHIFTS if SHIFT_SPLIT in splits else ()
    produced = evaluation_metrics(sets, settings.recall_k, settings.retrieval_label_field is not None, probes, shifts)
    gates = {"floors": params.promote.floors, "min_over_chance": params.promote.min_over_chance}
    for key, metrics in gates.items():
        unknown = sorted(set(metrics) - produced)
        if unknown:
            raise ClipflowError(
                f"promote.{key} names {unknown[0]!r}, which no evaluation of this data produces "
                f"(its zero-shot sets: {', '.join(sets) or 'none'}); name a metric of evaluate.zeroshot's sets, "
                f"such as zeroshot_top1_{next(iter(sets), 'NAME')}, or retrieval_i2t_r1"
            )


def _splits(report: IngestReport) -> set[str]:
    return {split for split, kept in report.counts.items() if kept}


def _labels(metadata: pd.DataFrame, split: str, field: str, columns: list[str], where: str) -> pd.Series:
    """Column `field` of `split`'s rows (null where a row has no value)."""
    if field not in columns:
        # Ingest's own columns (key, shard, digest, size, source) are no labels: the rest are the source's own.
        ours = ("key", "split", "shard", "sha256", "width", "height")
        shown = [c for c in columns if c not in ours and c != "source" and not c.startswith("source_")]
        raise ClipflowError(f"{where}: the data has no label column {field!r}; its columns are {shown}")
    return metadata.loc[metadata["split"] == split, field]
