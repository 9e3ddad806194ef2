"""`clipflow VERB`: one verb per pipeline step, plus run, export, serve, compile and submit.

Every verb takes `--params FILE`, `--profile NAME` and repeatable `--set KEY=VALUE`, and
reports bad input as one line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from clipflow.errors import ClipflowError
from clipflow.params import DEFAULT_PARAMS, LAUNCHERS, PACKAGED_PARAMS, Params, load_params
from clipflow.references import EXAMPLES
from components import checkout

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Train, evaluate and serve CLIP models: the clipflow pipeline, step by step or whole.",
)

ParamsOption = Annotated[Path, typer.Option("--params", help="The params file.")]
SetOption = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override a parameter: section.key=value (repeatable).")
]
ProfileOption = Annotated[
    Optional[str], typer.Option("--profile", help="A params profile, such as 'test' (default: $CLIPFLOW_PROFILE).")
]

PipelineOption = Annotated[
    str, typer.Option(help="clipflow (the DAG) or reindex (embed a catalogue with the champion and swap it in).")
]
MODEL_HELP = f"A model reference: {EXAMPLES}."
ModelOption = Annotated[str, typer.Option(help=MODEL_HELP)]
ModelConfigOption = Annotated[
    Optional[str], typer.Option(help="The open_clip config of a checkpoint that does not record it (ViT-B-32).")
]


def _params(params_file: Path, overrides: list[str] | None, profile: str | None) -> Params:
    return load_params(params_file, overrides or [], profile)


def _print_json(result: Any) -> None:
    """Print a step's result: a dict, or one of the typed reports (anything with `to_dict`)."""
    values = result if isinstance(result, dict) else result.to_dict()
    typer.echo(json.dumps(values, indent=2, default=str))


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise ClipflowError(f"{what} not found: {path}")


@app.command()
def init(
    to: Annotated[Path, typer.Option(help="Where to write the params file.")] = DEFAULT_PARAMS,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Write the packaged default params to a file to edit; every verb reads ./params.yaml when there is one."""
    if to.exists() and not force:
        raise ClipflowError(f"{to} exists; pass --force to replace it with the packaged defaults")
    to.parent.mkdir(parents=True, exist_ok=True)
    to.write_text(PACKAGED_PARAMS.read_text())
    typer.echo(f"wrote {to}: edit it, or override single keys with --set section.key=value")


@app.command()
def run(
    summary: Annotated[Path, typer.Option(help="Where to write the run summary JSON.")] = Path(
        "outputs/run-summary.json"
    ),
    source: Annotated[str, typer.Option(help="What to ingest: builtin, or a manifest/shard location.")] = "builtin",
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Stream every step's whole output, as kfp.local prints it.")
    ] = False,
    index_source: Annotated[
        str,
        typer.Option(
            help="After packaging, index this catalogue with the champion: `ingested` (this run's data), "
            "a data folder, shards or a manifest (default: no index step)."
        ),
    ] = "",
    params_file: ParamsOption = DEFAULT_PARAMS,
    overrides: SetOption = None,
    profile: ProfileOption = None,
) -> None:
    """Run the whole DAG (ingest to package) through kfp.local: a line per step, each step's log in a file."""
    from pipelines.local import describe, run_pipeline

    params = _params(params_file, overrides, profile)
    result = run_pipeline(
        params_file, params, overrides or [], source=source, verbose=verbose, index_source=index_source
    )
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps(result, indent=2))
    typer.echo(describe(result, summary, params.serve))


@app.command()
def ingest(
    output: Annotated[str, typer.Option(help="The data directory to write: a folder or s3://bucket/prefix.")] = (
        "data/builtin"
    ),
    source: Annotated[
        str, typer.Option(help="What to ingest: builtin, a CSV/Parquet/JSONL manifest, or WebDataset shards.")
    ] = "builtin",
    params_file: ParamsOption = DEFAULT_PARAMS,
    overrides: SetOption = None,
    profile: ProfileOption = None,
) -> None:
    """Write WebDataset shards, metadata.parquet and sizes.json from a source."""
    from clipflow.data.ingest import ingest as run_ingest

    params = _params(params_file, overrides, profile)
    _print_json(run_ingest(source, output, params.data, params.validate, params.tracking))


@app.command()
def validate(
    data: Annotated[Path, typer.Option(help="An ingested data directory.")] = Path("data/builtin"),
    report: Annotated[Path, typer.Option(help="Where to write the validation report.")] = Path("outputs/validation"),
    mlflow: Annotated[
        bool, typer.Option("--mlflow", help="Also log the report (data docs, quarantine) as an MLflow run.")
    ] = False,
    params_file: ParamsOption = DEFAULT_PARAMS,
    overrides: SetOption = None,
    profile: ProfileOption = None,
) -> None:
    """Check the metadata with the Great Expectations suite, and the evaluation's sets and floors against the data."""
    from clipflow.evaluate.plan import check_evaluation_plan
    from clipflow.validate import check_passed
    from clipflow.validate import validate as run_validate

    params = _params(params_file, overrides, profile)
    _require_dir(data, "data directory")
    check_evaluation_plan(data, params)
    result = run_validate(data, report, params.validate)
    if mlflow:
        from clipflow.validate.tracking import log_report

        _print_json({**result.to_dict(), "mlflow_run_id": log_report(report, result, params.tracking, data)})
    else:
        _print_json(result)
    check_passed(result, params.validate)


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="An ingested, validated data directory.")] = Path("data/builtin"),
    output: Annotated[Path, typer.Option(help="Where to write the checkpoint.")] = Path("outputs/model"),
    nproc: Annotated[Optional[int], typer.Option(min=1, help="torchrun processes (default: train.nproc).")] = None,
    launcher: Annotated[
        str, typer.Option(help="torchrun: here; trainjob: a Kubeflow Trainer v2 TrainJob (cluster section).")
    ] = "torchrun",
    data_uri: Annotated[Optional[str], typer.Option(help="With trainjob: the same data in S3 (s3://...).")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="With trainjob: print the TrainJob as YAML and create nothing.")
    ] = False,
    resume: Annotated[
        Optional[str], typer.Option(help="Resume from 'latest' (the newest checkpoint) or a checkpoint path/URI.")
    ] = None,
    nnodes: Annotated[Optional[int], typer.Option(min=1, help="Nodes (default: train.nnodes).")] = None,
    node_rank: Annotated[Optional[int], typer.Option(min=0, help="This node (default: train.node_rank).")] = None,
    rdzv_endpoint: Annotated[
        Optional[str], typer.Option(help="Node 0's host:port for the rendezvous (default: train.rdzv_endpoint).")
    ] = None,
    params_file: ParamsOption = DEFAULT_PARAMS,
    overrides: SetOption = None,
    profile: ProfileOption = None,
) -> None:
    """Train with torchrun (gloo DDP on CPU, NCCL on GPU), resumably, or on a cluster as a TrainJob; log to MLflow."""
    from clipflow.train.launch import train as run_train

    if launcher not in LAUNCHERS:
        raise ClipflowError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    # The options are params: a global batch that does not split over the processes fails as they load.
    settings = {"nproc": nproc, "nnodes": nnodes, "node_rank": node_rank, "rdzv_endpoint": rdzv_endpoint}
    extra = [f"train.{key}={value}" for key, value in settings.items() if value is not None]
    if launcher == "trainjob":
        extra.append("cluster.launcher=trainjob")  # the split over the TrainJob's processes is checked too
    params = _params(params_file, (overrides or []) + extra, profile)
    if dry_run:
        if launcher != "trainjob":
            raise ClipflowError("--dry-run prints the TrainJob: use it with --launcher trainjob")
        from clipflow.train.trainjob import dry_run_manifest

        typer.echo(dry_run_manifest(params, data_uri), nl=False)
        return
    _require_dir(data, "data directory")
    _print_json(run_train(data, output, params, resume=resume, launcher=launcher, data_uri=data_uri))


@app.command()
def evaluate(
    model: ModelOption,
    data: Annotated[Path, typer.Option(help="An ingested data directory.")] = Path("data/builtin"),
    output: Annotated[Path, typer.Option(help="Where to write metrics.json.")] = Path("outputs/evaluation"),
    run_id: Annotated[
        Optional[str],
        typer.Option(help="An MLflow run to log the metrics to (default: the run that trained a train output folder)."),
    ] = None,
    model_config: ModelConfigOption = None,
    params_file: ParamsOption = DEFAULT_PARAMS,
    overrides: SetOption = None,
    profile: ProfileOption = None,
) -> None:
    """Zero-shot accuracy on each zero-shot set, with chance beside it, and retrieval recall@k (both ways)."""
    from clipflow.artifacts import TrainReport
    from clipflow.evaluate.step import evaluate as run_evaluate
    from clipflow.registry.models import is_model_uri

    params = _params(params_file, overrides, profile)
    _require_dir(data, "data directory")
    if is_model_uri(model):
        from clipflow import tracking

        tracking.setup(params.tracking)
    elif run_id is None and TrainReport.exists(model):
        run_id = TrainReport.read(model).mlflow_run_id
    result = run_evaluate(model, data, output, params, mlflow_run_id=run_id, model_config=model_config)
    report = result.to_dict()
    _print_json(
        {"metrics": report["metrics"], "probes": report["probes"], "files": result.files, "seconds": result.seconds}
    )


@app.command()
def promote(
    model_uri: Annotated[
        Optional[str],
        typer.Option(
            help="The logged MLflow model to register (models:/m-...), or a `clipflow train` output folder"
            " (whose WiSE-FT mix is registered when the evaluation chose one)."
        ),
    ] = None,
    metrics: Annotated[Optional[Path], typer.Option(help="metrics.json written by `clipflow evaluate`.")] = None,
    rollback: Annotated[bool, typer.Option("--rollback", help="Move champion back to the previous champion.")] = False,
    params_file: ParamsOption = DEFAULT_PARAMS,
    overrides: SetOption = None,
    profile: ProfileOption = None,
) -> None:
    """Register a model version and move `champion` to it only when the gate passes (or --rollback)."""
    from clipflow.artifacts import TrainReport, read_metrics
    from clipflow.registry import promote as promotion
    from clipflow.registry.models import is_model_uri

    params = _params(params_file, overrides, profile)
    if rollback:
        if model_uri or metrics:
            raise ClipflowError("--rollback takes neither --model-uri nor --metrics")
        _print_json(promotion.rollback(params))
        return
    if not model_uri or not metrics:
        raise ClipflowError("promote needs --model-uri and --metrics (or --rollback)")
    data_version = None
    trained = None if is_model_uri(model_uri) else TrainReport.read(model_uri)
    values = read_metrics(metrics)
    if trained is not None:
        model_uri, data_version = trained.judged_model_uri(metrics), trained.data_version
    _print_json(promotion.promote(model_uri, values, params, data_version=data_version))


@app.command()
def package(
    model: Annotated[
        Optional[str], typer.Option(help=f"The model to serve (default: models:/NAME@champion). {MODEL_HELP}")
    ] = None,
    gallery: Annotated[
        Optional[Path],
        typer.Option(help="An ingested data directory whose serve.gallery_split images `search` answers from."),
    ] = None,
    index: Annotated[
        bool,
        typer.Option("--index", help="`search` answers from the vector store at index.uri (index.alias) instead."),
    ] = False,
    params_file: ParamsOption = DEFAULT_PARAMS,
    overrides: SetOption = None,
    profile: ProfileOption = None,
) -> None:
    """Build a Bento from the registry's champion, with a search gallery or the catalogue's vector store."""
    from clipflow.serve.package import package as run_package

    params = _params(params_file, overrides, profile)
    if gallery is not None:
        _require_dir(gallery, "gallery data directory")
    model_uri = model or f"models:/{params.promote.model_name}@champion"
    store = params.index if index else None
    _print_json(run_package(model_uri, params, checkout() / "serving", gallery=gallery, index=store))


@app.command()
def index(
    source: Annotated[
        Optional[str],
        typer.Option(help="The catalogue: an ingested data folder, WebDataset shards, or a CSV/Parquet/JSONL manifest"),
    ] = None,
    model: Annotated[
        Optional[str], typer.Option(help=f"The model (default: models:/NAME@champion). {MODEL_HELP}")
    ] = None,
    output: Annotated[
        Optional[str],
        typer.Option(help="The embedding artifact's folder (default: outputs/index/<model version>-<data version>)."),
    ] = None,
    no_store: Annotated[
        bool, typer.Option("--no-store", help="Only embed: leave the vector store and its alias as they are.")
    ] = False,
    restore: Annotated[
        bool, typer.Option("--restore", help="Point index.alias back at the previous collection; embed nothing.")
    ] = False,
    params_file: ParamsOption = DEFAULT_PARAMS,
    overrides: SetOption = None,
    profile: ProfileOption = None,
) -> None:
    """Embed a catalogue in clip-retrieval's layout, resumably, and publish it to the vector store (index.alias)."""
    params = _params(params_file, overrides, profile)
    if restore:
        if source or model:
            raise ClipflowError("--restore takes neither --source nor --model")
        from clipflow.index.store import restore as restore_alias

        _print_json(restore_alias(params.index))
        return
    if not source:
        raise ClipflowError("index needs --source (or --restore)")
    from clipflow.index.step import build_index

    model = model or f"models:/{params.promote.model_name}@champion"
    _print_json(build_index(source, model, output, params, publish=not no_store))


@app.command()
def export(
    model: ModelOption,
    to: Annotated[
        str, typer.Option(help="A new folder, an s3://bucket/prefix, or hf-hub:ORG/NAME (pushed with HF_TOKEN).")
    ],
    format: Annotated[str, typer.Option(help="open_clip (config + safetensors) or onnx (both towers).")] = "open_clip",
    model_config: ModelConfigOption = None,
    params_file: ParamsOption = DEFAULT_PARAMS,
    overrides: SetOption = None,
    profile: ProfileOption = None,
) -> None:
    """Write a model where other tools load it: open_clip's `local-dir:` layout, or ONNX graphs."""
    from clipflow.model.export import FORMATS
    from clipflow.model.export import export as run_export
    from clipflow.registry.models import is_model_uri, load_model

    params = _params(params_file, overrides, profile)
    if format not in FORMATS:  # before the model loads
        raise ClipflowError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if is_model_uri(model):
        from clipflow import tracking

        tracking.setup(params.tracking)
    _print_json(run_export(load_model(model, model_config, params.train.model_cache), to, format))


@app.command("pull-model")
def pull_model(
    reference: Annotated[str, typer.Argument(help="A pretrained tag (ViT-B-32:laion2b_s34b_b79k) or hf-hub:ORG/NAME.")],
    to: Annotated[str, typer.Option(help="The model cache to fill: a folder or an s3://bucket/prefix.")],
    params_file: ParamsOption = DEFAULT_PARAMS,
    overrides: SetOption = None,
    profile: ProfileOption = None,
) -> None:
    """Fetch a model from the hub (or the Hugging Face cache) into a model cache that train.model_cache reads."""
    from clipflow.model.hub import pull
    from clipflow.references import parse_reference

    params = _params(params_file, overrides, profile)
    _print_json(pull(parse_reference(reference, params.train.model), to))


@app.command()
def serve(
    port: Annotated[Optional[int], typer.Option(help="The port (default: serve.port).")] = None,
    bento: Annotated[Optional[str], typer.Option(help="The Bento tag (default: the latest built).")] = None,
    params_file: ParamsOption = DEFAULT_PARAMS,
    overrides: SetOption = None,
    profile: ProfileOption = None,
) -> None:
    """Serve the packaged Bento with `bentoml serve` on serve.host:serve.port."""
    params = _params(params_file, overrides, profile)
    tag = bento or f"{params.serve.bento_name}:latest"
    # exec, not a child process: Ctrl-C and a supervisor's SIGTERM reach bentoml directly. Its store
    # and telemetry switch are this process's own (`configure_process`); the launch module gives the
    # server a Prometheus folder of its own, so a second server does not wipe this one's metrics.
    command = [sys.executable, "-m", "clipflow.serve.launch", "serve", tag, "--host", params.serve.host]
    os.execv(sys.executable, [*command, "--port", str(port or params.serve.port)])


@app.command("compile")
def compile_command(
    output: Annotated[Path, typer.Option(help="Where to write the pipeline YAML.")] = Path("pipeline.yaml"),
    pipeline: PipelineOption = "clipflow",
    target: Annotated[
        str, typer.Option(help="local: plain steps; cluster: images, Secrets, resources and TrainJob from `cluster`.")
    ] = "local",
    image_tag: Annotated[Optional[str], typer.Option(help="The image tag (default: cluster.image_tag).")] = None,
    params_file: ParamsOption = DEFAULT_PARAMS,
    overrides: SetOption = None,
    profile: ProfileOption = None,
) -> None:
    """Compile a Kubeflow pipeline to YAML, ready to upload."""
    from pipelines.local import compile_pipeline, pipeline_named

    if target == "local":
        typer.echo(str(compile_pipeline(output, pipeline)))
        return
    if target != "cluster":
        raise ClipflowError(f"--target must be local or cluster, got {target!r}")
    from pipelines.cluster import compile_for_cluster

    params = _params(params_file, overrides, profile)
    typer.echo(str(compile_for_cluster(pipeline_named(pipeline), output, params_file, params, tag=image_tag)))


@app.command()
def submit(
    host: Annotated[Optional[str], typer.Option(help="The Kubeflow Pipelines API URL (default: $KFP_HOST).")] = None,
    token: Annotated[
        Optional[str], typer.Option(help="A bearer token for the API (default: $KFP_TOKEN; never logged).")
    ] = None,
    version: Annotated[
        Optional[str], typer.Option(help="The pipeline version's name (default: the image tag).")
    ] = None,
    image_tag: Annotated[Optional[str], typer.Option(help="The image tag (default: cluster.image_tag).")] = None,
    experiment: Annotated[str, typer.Option(help="The experiment of the run.")] = "clipflow",
    pipeline: PipelineOption = "clipflow",
    source: Annotated[
        str, typer.Option(help="What to ingest (clipflow), or the catalogue to index (reindex): builtin or a location.")
    ] = "builtin",
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the run to end; fail unless it succeeds.")] = False,
    timeout: Annotated[int, typer.Option(min=1, help="Seconds --wait waits.")] = 6 * 3600,
    summary: Annotated[
        Optional[Path], typer.Option(help="With --wait: append the run and the new model's metrics (Markdown).")
    ] = None,
    params_file: ParamsOption = DEFAULT_PARAMS,
    overrides: SetOption = None,
    profile: ProfileOption = None,
) -> None:
    """Compile for the cluster, upload a pipeline version, and start a run on Kubeflow Pipelines."""
    import kfp

    from pipelines import submit as submission
    from pipelines.local import pipeline_named

    params = _params(params_file, overrides, profile)
    if pipeline == "reindex" and source == "builtin":
        raise ClipflowError("--pipeline reindex needs --source: the catalogue to index")
    host = host or os.environ.get(submission.HOST_ENV)
    if not host:
        raise ClipflowError(f"submit needs --host or ${submission.HOST_ENV}")
    tag = image_tag or params.cluster.image_tag
    client = kfp.Client(host=host, existing_token=token or os.environ.get(submission.TOKEN_ENV))
    result = submission.submit(
        client,
        pipeline_named(pipeline),
        params_file,
        params,
        overrides or [],
        version=version or tag,
        experiment=experiment,
        source=source,
        tag=tag,
        wait_seconds=timeout if wait else None,
    )
    if summary is not None and wait:
        with summary.open("a") as out:
            out.write(submission.markdown(result, submission.newest_model(params)))
    _print_json(result)


# Telemetry stays off and every step of a run shares one BentoML store, unless the user chose otherwise.
PROCESS_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "BENTOML_HOME": "bentoml_home",
    # Its download bars, a line per refresh, fill the step logs (and the terminal with --verbose).
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def configure_process() -> None:
    """Settings of this process and the steps, servers and workers it starts, read once by MLflow and BentoML."""
    for key, value in PROCESS_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # A relative store would move with the working directory of each subprocess.
    os.environ["BENTOML_HOME"] = str(Path(os.environ["BENTOML_HOME"]).resolve())


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a verb and turn user errors into one line and a non-zero exit."""
    configure_process()
    try:
        app(args=argv, prog_name="clipflow", standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort as exc:
        if isinstance(exc.__cause__, EOFError):  # click wraps a verb's EOFError in Abort, as it does Ctrl-C
            typer.echo(f"clipflow: error: unexpected end of input ({exc.__cause__ or 'EOFError'})", err=True)
            return 1
        typer.echo("clipflow: interrupted", err=True)
        return 130
    except typer.TyperException as exc:  # usage errors: a missing option, a bad value, an unknown verb
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        typer.echo(f"clipflow: error: {message}", err=True)
        return 2
    except ClipflowError as exc:
        typer.echo(f"clipflow: error: {exc}", err=True)
        return 1
    except OSError as exc:  # a path the user named cannot be read or written
        typer.echo(f"clipflow: error: {exc}", err=True)
        return 1
    return 0


def entry_point() -> None:
    """The `clipflow` command: `main`, then an exit that skips collecting what the verb built.

    Nothing is left to free, yet the interpreter's teardown would walk every object that torch,
    MLflow and pandas created: a second at the end of `clipflow train` here.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
