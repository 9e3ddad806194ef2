"""The on-disk contract between steps: file names, each step's report, the data version and lineage.

Every step reads what an earlier one wrote through this module, never through the other step's
code, so a step can change how it works without its readers noticing. A data directory:

    {split}/{split}-000000.tar ...   the WebDataset shards
    {split}/sizes.json               shard name -> samples
    metadata.parquet                 one row per kept sample: key, split, shard, caption, sha256, ...
    quarantine.parquet               one row per rejected input row: row, key, source, reason
    ingest.json                      `IngestReport`: rows in, kept per split, quarantined, the data version

A validation folder holds `validation.json` (`ValidationReport`) beside its data docs; a training
output folder holds the checkpoint and `train.json` (`TrainReport`); an evaluation folder holds
`metrics.json` (read by `read_metrics`) and `summary.md` beside its plots and tables.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Self

from clipflow.errors import ClipflowError

METADATA_FILE = "metadata.parquet"
QUARANTINE_FILE = "quarantine.parquet"
SIZES_FILE = "sizes.json"
INGEST_REPORT = "ingest.json"
VALIDATION_REPORT = "validation.json"
TRAIN_REPORT = "train.json"
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.md"  # the evaluation in Markdown, beside metrics.json
# Where `evaluate` logs its folder among the training run's artifacts; `promote` completes its summary there.
EVALUATION_ARTIFACTS = "evaluation"
# One row per evaluation item and per-item metric, for the gate's paired bootstrap: columns `model` (PER_ITEM_MODEL
# for the evaluated model, PER_ITEM_BASELINE for the model it was fine-tuned from), `metric` (the metrics.json
# name whose value is the mean of `hit`), `set` (zero-shot set or retrieval split), `key` (the sample) and `hit`.
PER_ITEM_FILE = "per_item.parquet"
PER_ITEM_MODEL = "model"
PER_ITEM_BASELINE = "baseline"
# The starting model's figures in metrics.json: `baseline_<metric>` beside each `<metric>` of the fine-tuned one.
BASELINE_PREFIX = "baseline_"
# The tag of a logged model and registered version whose weights are a WiSE-FT mix: the fine-tuned weights' share.
WISEFT_ALPHA_TAG = "wiseft_alpha"


class JsonRecord:
    """JSON in and out for a frozen dataclass of JSON values: a step's report, as a file or a KFP output."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Self:
        return cls(**json.loads(text))


def _report_text(folder: str | Path, name: str, what: str) -> str:
    path = Path(folder) / name
    if not path.is_file():
        raise ClipflowError(f"not {what} (no {name}): {folder}")
    return path.read_text()


@dataclass(frozen=True)
class IngestReport(JsonRecord):
    """What ingest wrote about a data directory (`ingest.json`), written last: it means the data is complete.

    `input_rows` reconciles: every row read is either kept (in a shard and `metadata.parquet`)
    or quarantined (in `quarantine.parquet`, with its reason).
    """

    source: str
    output: str
    counts: dict[str, int]  # kept samples per split
    input_rows: int
    kept: int
    quarantined: int
    quarantine_reasons: dict[str, int]
    data_version: str
    git_revision: str | None
    seconds: float
    # The model curation (`clipflow.data.curate`): its model, weights' digest, thresholds and rows quarantined
    # per reason kind; None when ingest did not curate.
    curation: dict[str, Any] | None = None

    @classmethod
    def read(cls, data_dir: str | Path) -> IngestReport:
        """Raises: ClipflowError: the folder is not an ingested data directory."""
        return cls.from_json(_report_text(data_dir, INGEST_REPORT, "an ingested data directory"))


@dataclass(frozen=True)
class ExpectationResult:
    expectation: str
    column: str
    reason: str
    threshold: str  # what the expectation allows, in words, with the params that set it
    success: bool
    unexpected_count: int


@dataclass(frozen=True)
class ValidationReport(JsonRecord):
    """What validate wrote beside its data docs (`validation.json`).

    `input_rows` counts the rows ingest read, so the quarantine covers both stages:
    `quarantined = quarantined_at_ingest + quarantined_by_suite` and `kept + quarantined = input_rows`.
    """

    success: bool
    input_rows: int
    kept: int
    quarantined: int
    quarantined_at_ingest: int
    quarantined_by_suite: int
    quarantine_reasons: dict[str, int]
    splits: dict[str, dict[str, int]]  # split of the metadata table -> its "rows", "kept" and "quarantined"
    bad_fraction: float
    max_bad_fraction: float
    expectations: tuple[ExpectationResult, ...]
    report: str  # the report page, index.html (self-contained; the data docs are beside it)
    seconds: float

    def write(self, report_dir: str | Path) -> None:
        (Path(report_dir) / VALIDATION_REPORT).write_text(self.to_json())

    @classmethod
    def from_json(cls, text: str) -> ValidationReport:
        values = json.loads(text)
        expectations = tuple(ExpectationResult(**each) for each in values.pop("expectations"))
        return cls(**values, expectations=expectations)


@dataclass(frozen=True)
class TrainReport(JsonRecord):
    """What a finished training wrote beside its checkpoint (`train.json`)."""

    mlflow_run_id: str
    model_uri: str
    checkpoint: str
    data_version: str
    seconds: float
    # The last logged step's figures; None where the leader logged on a cluster (TrainJob) or in an older report.
    final_loss: float | None = None
    samples_per_second: float | None = None

    def write(self, output_dir: str | Path) -> None:
        (Path(output_dir) / TRAIN_REPORT).write_text(self.to_json())

    @classmethod
    def read(cls, output_dir: str | Path) -> TrainReport:
        """Raises: ClipflowError: the folder holds no finished training."""
        return cls.from_json(_report_text(output_dir, TRAIN_REPORT, "a training output folder"))

    @staticmethod
    def exists(output_dir: str | Path) -> bool:
        return (Path(output_dir) / TRAIN_REPORT).is_file()

    def judged_model_uri(self, metrics_file: str | Path) -> str:
        """The model an evaluation of this training judged, which promote registers: the WiSE-FT mix that the
        evaluation in `metrics_file` chose and logged (its metrics are the mix's), else the trained model."""
        return (json.loads(Path(metrics_file).read_text()).get("wiseft") or {}).get("model_uri") or self.model_uri


def read_metrics(path: str | Path) -> dict[str, float]:
    """The metrics of a `metrics.json` that `evaluate` wrote.

    Raises:
        ClipflowError: a missing file, or one that is not an evaluation result.
    """
    path = Path(path)
    if not path.is_file():
        raise ClipflowError(f"metrics file not found: {path}")
    try:
        metrics = json.loads(path.read_text())["metrics"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        metrics = None
    if not isinstance(metrics, dict):
        raise ClipflowError(f"{path} is not a {METRICS_FILE} from `clipflow evaluate`")
    return metrics


def data_version(data_dir: str | Path) -> str:
    """A content hash of every file in the data directory except ingest's own report.

    Two directories with the same version hold byte-identical data, so a model's
    `data_version` tag pins exactly what it was trained on.
    """
    data_dir = Path(data_dir)
    files = sorted(p for p in data_dir.rglob("*") if p.is_file() and p.name != INGEST_REPORT)
    return version_of({p.relative_to(data_dir).as_posix(): sha256_file(p) for p in files})


def version_of(hashes: dict[str, str]) -> str:
    """`data_version` from the sha256 of each file by relative path (for data that is not on local disk)."""
    digest = hashlib.sha256()
    for name in sorted(hashes):
        digest.update(name.encode())
        digest.update(bytes.fromhex(hashes[name]))
    return digest.hexdigest()[:16]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dvc_md5(data_dir: str | Path) -> str:
    """The hash DVC 3 gives this directory as an output (`md5: ....dir` in dvc.lock and .dvc files).

    It covers every file, `ingest.json` included, so it is computed when the directory is
    complete: training logs it, and it matches what `dvc repro`/`dvc add` record.
    """
    data_dir = Path(data_dir)
    entries = []
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file()):
        md5 = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                md5.update(block)
        entries.append({"md5": md5.hexdigest(), "relpath": path.relative_to(data_dir).as_posix()})
    entries.sort(key=lambda entry: entry["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode(), usedforsecurity=False).hexdigest() + ".dir"


def git_revision(cwd: str | Path = ".") -> str | None:
    """The commit checked out in `cwd`, with `-dirty` when tracked files changed; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def lineage(data_dir: str | Path) -> dict[str, str]:
    """What ties a model to its data: the content version, the DVC hash and the git revision of ingest."""
    report = IngestReport.read(data_dir)
    tags = {"data_version": report.data_version, "data_dvc_md5": dvc_md5(data_dir)}
    if report.git_revision:
        tags["data_git_revision"] = report.git_revision
    return tags
