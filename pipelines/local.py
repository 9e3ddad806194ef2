"""`clipflow run` and `clipflow compile`: the DAG through `kfp.local` on this machine, its YAML, the run summary.

The DAG is `pipelines.pipeline`, installed beside the library; `clipflow run` executes exactly that
definition, not a second copy of it.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clipflow.artifacts import SUMMARY_FILE, IngestReport, TrainReport, ValidationReport
from clipflow.errors import ClipflowError
from clipflow.metric_names import ZEROSHOT_CHANCE, ZEROSHOT_TOP1
from clipflow.params import Params, ServeParams
from clipflow.progress import StepLogs, shown
from clipflow.registry.promote import PromoteResult
from clipflow.serve.package import PackageResult
from clipflow.tracking import absolute_uri
from pipelines import params_json
from pipelines.pipeline import STEPS, clipflow_pipeline
from pipelines.reindex import INDEX_STEPS, clipflow_reindex

DEFAULT_PIPELINE_ROOT = Path("outputs/kfp")
# What `clipflow compile --pipeline` and `clipflow submit --pipeline` name.
PIPELINES = {"clipflow": clipflow_pipeline, "reindex": clipflow_reindex}


def pipeline_named(name: str):
    """The pipeline `name` (a key of PIPELINES).

    Raises:
        ClipflowError: no pipeline has that name.
    """
    if name not in PIPELINES:
        raise ClipflowError(f"--pipeline must be one of {', '.join(PIPELINES)}, got {name!r}")
    return PIPELINES[name]


def compile_pipeline(output: str | Path, name: str = "clipflow") -> Path:
    """Write the pipeline `name` as Kubeflow Pipelines IR YAML."""
    from kfp import compiler

    pipeline = pipeline_named(name)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(output))
    return output


def run_pipeline(
    params_file: Path,
    params: Params,
    overrides: list[str],
    source: str = "builtin",
    pipeline_root: Path = DEFAULT_PIPELINE_ROOT,
    verbose: bool = False,
    index_source: str = "",
) -> dict[str, Any]:
    """Execute the whole DAG with kfp.local's SubprocessRunner and return the run summary.

    `params` must already be the result of loading `params_file` with `overrides`, so bad
    input fails here in one line before any step starts. Each step prints a line as it starts
    and ends, its output goes to `<pipeline_root>/<run>/logs/<step>.log`, and with `verbose`
    also to the terminal, as kfp.local prints it. A non-empty `index_source` adds the index steps
    (see `pipelines.reindex`): the champion embeds that catalogue after packaging.

    Raises:
        ClipflowError: a step failed (the last lines of its log are on stderr).
    """
    from kfp import local

    # Steps run as subprocesses: a relative sqlite path must mean the same file to all of them.
    tracking_uri = absolute_uri(params.tracking.uri)
    overrides = [*overrides, f"tracking.uri={tracking_uri}"]
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    logs = StepLogs(STEPS + (INDEX_STEPS if index_source else ()), verbose=verbose)
    artifacts: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    try:
        with logs.run(), _logged_tasks(logs, artifacts):
            outputs = clipflow_pipeline(
                source=source,
                overrides=overrides,
                profile=params.profile or "",
                params=params_json(params_file),
                index_source=index_source,
            ).outputs
    except RuntimeError as exc:
        if logs.failed is None:  # kfp.local itself failed, before or between the steps
            raise ClipflowError(f"pipeline failed: {exc}") from None
        raise ClipflowError(f"pipeline failed at {logs.failed}; its log: {shown(logs.paths[logs.failed])}") from None
    reports = {step: outputs[f"{step}_report"] for step in STEPS}
    summary = summarize(reports, total_seconds=time.perf_counter() - started)
    if index_source:
        summary["index"] = json.loads(_report(artifacts["index"]))
        total = summary["timings"].pop("total")
        summary["timings"] |= {"index": summary["index"]["seconds"], "total": total}
    evaluation = Path(artifacts["evaluate"]["evaluation"].path)
    return {
        **summary,
        "tracking_uri": tracking_uri,
        "logs": {name: str(path.resolve()) for name, path in logs.paths.items()},
        "reports": {
            "evaluation": str(evaluation / SUMMARY_FILE),
            "plots": str(evaluation),
            "validation": ValidationReport.from_json(reports["validate"]).report,
            "promotion": artifacts["promote"]["summary"].path,
        },
    }


@contextlib.contextmanager
def _logged_tasks(logs: StepLogs, artifacts: dict[str, dict[str, Any]]) -> Iterator[None]:
    """Run each kfp.local task inside `logs.step`, and keep each finished task's outputs in `artifacts`.

    kfp.local has no per-task hook: it prints every task's subprocess output to this process's
    stdout. Both of its orchestrators run a task through `task_executor.execute_single_task`, so
    wrapping that one function marks where each task starts and ends, with its outputs.
    """
    from kfp.local import status
    from kfp.local.orchestrator import task_executor

    execute = task_executor.execute_single_task

    def execute_logged(*, task_name: str, pipeline_root: str, pipeline_resource_name: str, **rest: Any):
        step = task_name.removesuffix("-component")
        with logs.step(step, Path(pipeline_root) / pipeline_resource_name / "logs") as succeeded:
            outputs, task_status = execute(
                task_name=task_name, pipeline_root=pipeline_root, pipeline_resource_name=pipeline_resource_name, **rest
            )
            if task_status == status.Status.SUCCESS:
                artifacts[step] = outputs
                succeeded(step_figures(step, _report(outputs)))
        return outputs, task_status

    task_executor.execute_single_task = execute_logged
    try:
        yield
    finally:
        task_executor.execute_single_task = execute


def _report(outputs: dict[str, Any]) -> str:
    """A step's JSON report: its single return value, which KFP names `Output`, or else its `report` output."""
    return outputs["Output"] if "Output" in outputs else outputs["report"]


def step_figures(step: str, report: str) -> str:
    """The key figures of a finished step, from its JSON report, for its line on the terminal."""
    if step == "index":
        indexed = json.loads(report)
        return (
            f"{indexed['rows']} of {indexed['input_rows']} rows embedded ({indexed['quarantined']} quarantined)"
            f" by {indexed['model']}; {indexed['store']['alias']} -> {indexed['store']['collection']}"
        )
    if step == "ingest":
        ingested = IngestReport.from_json(report)
        return (
            f"kept {ingested.kept} of {ingested.input_rows} rows, quarantined {ingested.quarantined};"
            f" data version {ingested.data_version}"
        )
    if step == "validate":
        validated = ValidationReport.from_json(report)
        return (
            f"kept {validated.kept}, quarantined {validated.quarantined}"
            f" (bad fraction {validated.bad_fraction:.3f}, at most {validated.max_bad_fraction:.3f})"
        )
    if step == "train":
        trained = TrainReport.from_json(report)
        return (
            f"{_number(trained.samples_per_second, '.0f')} samples/s, final loss {_number(trained.final_loss, '.4f')}"
        )
    if step == "evaluate":
        m = json.loads(report)["metrics"]
        return (
            f"zero-shot top-1 {_zeroshot_figures(m)},"
            f" R@1 image->text {m['retrieval_i2t_r1']:.3f}, text->image {m['retrieval_t2i_r1']:.3f}"
        )
    if step == "promote":
        promoted = PromoteResult.from_json(report)
        return (
            f"{promoted.model_name} version {promoted.model_version} {_verdict(promoted.promoted)}: {promoted.reason}"
        )
    packaged = PackageResult.from_json(report)
    return f"bento {packaged.bento_tag} (serve.precision {packaged.precision})"


def _zeroshot_figures(metrics: dict[str, float]) -> str:
    """Each zero-shot set's top-1 by its name, with chance beside it."""
    sets = [name.removeprefix(ZEROSHOT_TOP1) for name in metrics if name.startswith(ZEROSHOT_TOP1)]
    return (
        ", ".join(
            f"{name} {metrics[ZEROSHOT_TOP1 + name]:.3f} (chance {metrics[ZEROSHOT_CHANCE + name]:.3f})"
            for name in sets
        )
        or "-"
    )


def _number(value: float | None, spec: str) -> str:
    """A figure a step may not have measured (a TrainJob's leader keeps its step metrics on the cluster)."""
    return "-" if value is None else format(value, spec)


def _verdict(promoted: bool) -> str:
    return "promoted to champion" if promoted else "not promoted"


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


def describe(summary: dict[str, Any], summary_path: Path, serve: ServeParams) -> str:
    """The run summary in words: the figures, then where to look (MLflow, the page, the reports, the logs)."""
    m = summary["metrics"]
    timings = ", ".join(f"{step} {seconds:.0f}s" for step, seconds in summary["timings"].items())
    reports = summary["reports"]
    return "\n".join(
        [
            f"MLflow run:     {summary['mlflow_run_id']}",
            f"data:           {summary['data_dir']} (version {summary['data_version']})",
            f"zero-shot top-1: {_zeroshot_figures(m)}",
            f"retrieval R@1:  image->text {m['retrieval_i2t_r1']:.3f}, text->image {m['retrieval_t2i_r1']:.3f}",
            "probes:         "
            + (", ".join(f"{k.removeprefix('probe_')} {v:.3f}" for k, v in m.items() if k.startswith("probe_")) or "-"),
            f"model:          {summary['model_name']} version {summary['model_version']}"
            f" aliases {', '.join(summary['aliases']) or '-'} ({_verdict(summary['promoted'])}:"
            f" {summary['promotion_reason']})",
            f"bento:          {summary['bento_tag']} (serve.precision {summary['serve_precision']})",
            *_index_lines(summary.get("index")),
            f"timings:        {timings}",
            f"evaluation:     {shown(Path(reports['evaluation']))} (the plots beside it)",
            f"promotion:      {shown(Path(reports['promotion']))} (every check of the gate)",
            f"validation:     {shown(Path(reports['validation']))}",
            f"step logs:      {shown(Path(summary['logs']['ingest']).parent)}",
            f"summary:        {summary_path}",
            f"MLflow UI:      {mlflow_ui(summary['tracking_uri'])}",
            "serve it with:  make serve   (or: clipflow serve)",
            f"web page:       http://{serve.host}:{serve.port}/ after make serve",
        ]
    )


def _index_lines(index: dict[str, Any] | None) -> list[str]:
    """What the index step left, for a run that had one: the artifact, and what `search` reads."""
    if index is None:
        return []
    store = index["store"]
    return [
        f"index:          {index['rows']} of {index['input_rows']} rows embedded ({index['quarantined']} quarantined)"
        f" in {shown(Path(index['artifact']))}",
        f"search reads:   {store['alias']} -> {store['collection']}",
    ]


def mlflow_ui(tracking_uri: str) -> str:
    """How to open the run's MLflow UI: a tracking server's own address, or `mlflow ui` over a local store."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri
    # The mlflow beside this Python: `make run` leaves it in .venv/bin, not on PATH.
    mlflow = shown(Path(sys.executable).parent / "mlflow")
    return f"{mlflow} ui --backend-store-uri {tracking_uri}   (then http://127.0.0.1:5000)"
