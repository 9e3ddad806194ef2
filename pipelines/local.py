"""`clipflow run` and `clipflow compile`: the DAG through `kfp.local` on this machine, its YAML, the run summary.

The DAG is `pipelines.pipeline`, installed beside the library; `clipflow run` executes exactly that
definition, not a second copy of it.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from clipflow.artifacts import IngestReport, TrainReport, ValidationReport
from clipflow.errors import ClipflowError
from clipflow.params import Params
from clipflow.registry.promote import PromoteResult
from clipflow.serve.package import PackageResult
from clipflow.tracking import absolute_uri
from pipelines import params_json
from pipelines.pipeline import STEPS, clipflow_pipeline

DEFAULT_PIPELINE_ROOT = Path("outputs/kfp")


def compile_pipeline(output: str | Path) -> Path:
    """Write the pipeline as Kubeflow Pipelines IR YAML."""
    from kfp import compiler

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(clipflow_pipeline, str(output))
    return output


def run_pipeline(
    params_file: Path,
    params: Params,
    overrides: list[str],
    source: str = "builtin",
    pipeline_root: Path = DEFAULT_PIPELINE_ROOT,
) -> dict[str, Any]:
    """Execute the whole DAG with kfp.local's SubprocessRunner and return the run summary.

    `params` must already be the result of loading `params_file` with `overrides`, so bad
    input fails here in one line before any step starts.
    """
    from kfp import local

    # Steps run as subprocesses: a relative sqlite path must mean the same file to all of them.
    overrides = [*overrides, f"tracking.uri={absolute_uri(params.tracking.uri)}"]
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    started = time.perf_counter()
    try:
        outputs = clipflow_pipeline(
            source=source,
            overrides=overrides,
            profile=params.profile or "",
            params=params_json(params_file),
        ).outputs
    except RuntimeError as exc:
        raise ClipflowError(f"pipeline failed at {_failed_step(str(exc))}; its error is in the log above") from None
    reports = {step: outputs[f"{step}_report"] for step in STEPS}
    return summarize(reports, total_seconds=time.perf_counter() - started)


def _failed_step(message: str) -> str:
    """The step kfp.local names in its failure message ("Inner task failed: 'train-component'")."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", message)  # kfp.local colours task names
    tasks = re.findall(r"'([\w-]+)'", plain.partition("Inner task failed:")[2])
    return tasks[-1].removesuffix("-component") if tasks else "a step"


def summarize(reports: dict[str, str], total_seconds: float) -> dict[str, Any]:
    """The run summary from each step's JSON report: what was trained, how it scored, where it went, how long."""
    ingested = IngestReport.from_json(reports["ingest"])
    validated = ValidationReport.from_json(reports["validate"])
    trained = TrainReport.from_json(reports["train"])
    evaluated = json.loads(reports["evaluate"])
    promoted = PromoteResult.from_json(reports["promote"])
    packaged = PackageResult.from_json(reports["package"])
    timings = {
        "ingest": ingested.seconds,
        "validate": validated.seconds,
        "train": trained.seconds,
        "evaluate": evaluated["seconds"],
        "promote": promoted.seconds,
        "package": packaged.seconds,
    }
    return {
        "mlflow_run_id": trained.mlflow_run_id,
        "checkpoint": trained.checkpoint,
        "model_name": promoted.model_name,
        "model_version": promoted.model_version,
        "aliases": promoted.aliases,
        "promoted": promoted.promoted,
        "promotion_reason": promoted.reason,
        "bento_tag": packaged.bento_tag,
        "serve_precision": packaged.precision,
        "precision_check": packaged.precision_check,
        "data_version": ingested.data_version,
        "data_dir": ingested.output,
        "validation": {k: getattr(validated, k) for k in ("input_rows", "kept", "quarantined")},
        "metrics": evaluated["metrics"],
        "timings": {**timings, "total": round(total_seconds, 2)},
    }


def describe(summary: dict[str, Any], summary_path: Path) -> str:
    """The run summary in words, ending with the command that serves the model."""
    m = summary["metrics"]
    timings = ", ".join(f"{step} {seconds:.0f}s" for step, seconds in summary["timings"].items())
    verdict = "promoted to champion" if summary["promoted"] else "not promoted"
    return "\n".join(
        [
            f"MLflow run:     {summary['mlflow_run_id']}",
            f"data:           {summary['data_dir']} (version {summary['data_version']})",
            f"zero-shot top-1 on held-out compositions: {m['zeroshot_top1_heldout']:.3f}"
            f" (chance {m['zeroshot_chance_heldout']:.3f})",
            f"retrieval R@1:  image->text {m['retrieval_i2t_r1']:.3f}, text->image {m['retrieval_t2i_r1']:.3f}",
            "probes:         "
            + (", ".join(f"{k.removeprefix('probe_')} {v:.3f}" for k, v in m.items() if k.startswith("probe_")) or "-"),
            f"model:          {summary['model_name']} version {summary['model_version']}"
            f" aliases {', '.join(summary['aliases']) or '-'} ({verdict}: {summary['promotion_reason']})",
            f"bento:          {summary['bento_tag']} (serve.precision {summary['serve_precision']})",
            f"timings:        {timings}",
            f"summary:        {summary_path}",
            "serve it with:  make serve   (or: clipflow serve)",
        ]
    )
