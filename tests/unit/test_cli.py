"""Bad input to every verb ends in one clear line on stderr and a non-zero exit, never a traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml

from clipflow import cli
from clipflow.errors import ClipflowError
from components import checkout
from tests.support import REPO

CLIPFLOW = str(Path(sys.executable).with_name("clipflow"))


def _clipflow(*args, cwd=REPO):
    return subprocess.run([CLIPFLOW, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--set", "train.nope=1"], "unknown parameter 'train.nope'"),
        (["run", "--set", "train.steps=abc"], "train.steps must be int"),
        (["ingest", "--source", "builtin", "--set", "data.num_train=many"], "data.num_train must be int"),
        (["ingest", "--source", "/no/such/manifest.csv"], "manifest not found: /no/such/manifest.csv"),
        (["ingest", "--source", "ftp://host/manifest.csv"], "unsupported source"),
        (["validate", "--data", "/no/such/dir"], "data directory not found: /no/such/dir"),
        (["train", "--data", "/no/such/dir"], "data directory not found"),
        (["train", "--nproc", "0"], "Invalid value for '--nproc'"),
        (["evaluate", "--model", "/no/such/model", "--data", "."], "not an ingested data directory"),
        (["evaluate", "--data", "."], "Missing option '--model'"),
        (["promote", "--model-uri", "/no/such/run", "--metrics", "m.json"], "not a training output folder"),
        (["package", "--params", "/no/such/params.yaml"], "params file not found"),
        (["serve", "--profile", "huge"], "unknown profile 'huge'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["compile", "--output", "/proc/clipflow/pipeline.yaml"], "/proc/clipflow"),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, message):
    result = _clipflow(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("clipflow: error: ")
    assert message in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_help_lists_every_verb():
    result = _clipflow("--help")
    assert result.returncode == 0
    commands = result.stdout.partition("Commands:")[2]
    listed = [line.split()[0] for line in commands.splitlines() if line.strip()]
    # The names as listed, not words found anywhere in the text ("run" is inside "torchrun").
    expected = [
        "init",
        "run",
        "ingest",
        "validate",
        "train",
        "evaluate",
        "promote",
        "package",
        "index",
        "export",
        "pull-model",
        "serve",
        "compile",
        "submit",
    ]
    assert listed == expected


def test_compile_works_outside_the_checkout(tmp_path):
    """The pipeline is an installed package: compiling needs no checkout as working directory."""
    result = _clipflow("compile", "--output", "p.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "p.yaml"
    spec = yaml.safe_load((tmp_path / "p.yaml").read_text())
    default = spec["root"]["inputDefinitions"]["parameters"]["params"]["defaultValue"]
    assert json.loads(default) == yaml.safe_load((REPO / "params.yaml").read_text())


def test_init_writes_the_packaged_defaults_and_never_replaces_an_edited_file_unasked(tmp_path):
    assert _clipflow("init", cwd=tmp_path).returncode == 0
    written = tmp_path / "params.yaml"
    assert written.read_text() == (REPO / "params.yaml").read_text()

    edited = written.read_text() + "# the user's own line\n"
    written.write_text(edited)
    again = _clipflow("init", cwd=tmp_path)
    assert again.returncode != 0
    assert again.stderr.strip() == (
        "clipflow: error: params.yaml exists; pass --force to replace it with the packaged defaults"
    )
    assert written.read_text() == edited
    assert _clipflow("init", "--force", cwd=tmp_path).returncode == 0
    assert written.read_text() == (REPO / "params.yaml").read_text()


def test_a_verb_outside_any_checkout_reads_the_packaged_defaults(tmp_path):
    """A folder with no params.yaml: the packaged defaults, with the profile and --set applied to them."""
    small = ["--set", "data.num_train=40", "--set", "data.num_test=10", "--set", "data.num_heldout=10"]
    result = _clipflow("ingest", "--source", "builtin", "--output", "data", "--profile", "test", *small, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["counts"]["train"] == 40, report


def test_checkout_is_the_working_directory_holding_the_pipeline_and_the_service(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert checkout() == REPO
    for marker in ("pipelines/pipeline.py", "serving/service.py"):
        (tmp_path / marker).parent.mkdir()
        (tmp_path / marker).touch()
    monkeypatch.chdir(tmp_path)
    assert checkout() == tmp_path


def test_elsewhere_checkout_is_the_one_clipflow_is_installed_from(tmp_path, monkeypatch):
    import components

    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines/pipeline.py").touch()
    monkeypatch.chdir(tmp_path)
    assert checkout() == REPO
    monkeypatch.setattr(components, "CHECKOUT", tmp_path)  # a wheel installed away from any checkout
    with pytest.raises(ClipflowError) as error:
        checkout()
    assert str(error.value) == f"cannot find serving/service.py in {tmp_path}: run clipflow from its source checkout"


@pytest.mark.parametrize(
    ("raised", "code", "message"),
    [
        (EOFError("file ended early"), 1, "clipflow: error: unexpected end of input (file ended early)"),
        (typer.Abort(), 130, "clipflow: interrupted"),  # what click raises for Ctrl-C
    ],
)
def test_an_end_of_input_is_an_error_and_only_ctrl_c_is_an_interruption(monkeypatch, capsys, raised, code, message):
    """click turns an EOFError into Abort, as it does Ctrl-C; a truncated input must not look like Ctrl-C."""
    app = typer.Typer()

    @app.command()
    def verb() -> None:
        raise raised

    @app.command()
    def other() -> None:  # two commands, so the verb is named as on the real command line
        pass

    monkeypatch.setattr(cli, "app", app)
    assert cli.main(["verb"]) == code
    assert capsys.readouterr().err.strip() == message


@pytest.mark.parametrize(
    ("tracking_uri", "opens"),
    [
        # a tracking server is its own UI
        ("https://mlflow.example.org", "https://mlflow.example.org"),
        # a local store: the UI command of the mlflow installed beside clipflow, not one on PATH
        (
            "sqlite:////runs/mlflow.db",
            f"{Path(sys.executable).with_name('mlflow')} ui --backend-store-uri sqlite:////runs/mlflow.db"
            "   (then http://127.0.0.1:5000)",
        ),
    ],
)
def test_the_run_summary_says_how_to_open_the_mlflow_ui(tmp_path, monkeypatch, tracking_uri, opens):
    from pipelines.local import mlflow_ui

    monkeypatch.chdir(tmp_path)  # outside the environment, so the command names mlflow by its full path
    assert mlflow_ui(tracking_uri) == opens
