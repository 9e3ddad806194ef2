"""Orchestration of the clipflow DAG: wiring over the library, no step logic.

- `pipelines.pipeline`: the DAG (ingest -> validate -> train -> evaluate -> promote -> package -> optional index).
- `pipelines.reindex`: the index steps, and the pipeline that re-indexes a catalogue with the champion.
- `pipelines.local`: `clipflow run` (the DAG through kfp.local), `clipflow compile`, the run summary.
- `pipelines.cluster`: the cluster build (images, Secrets, resources, retries, the TrainJob launcher).
- `pipelines.submit`: `clipflow submit` (upload a pipeline version to Kubeflow, start a run, wait).

Installed with clipflow (pyproject.toml's package list), so `import pipelines.pipeline` works from any
working directory of an editable install; nothing here edits `sys.path`.
"""

import json
from pathlib import Path

import yaml

from clipflow.params import params_file
from components import CHECKOUT


def params_json(path: str | Path) -> str:
    """The pipeline's `params` argument: a params file's content as JSON on one line.

    One line, because KFP copies parameter defaults into comments of the compiled YAML, where a
    multi-line value would break the file.

    Args:
        path: a params.yaml (`params.yaml` where there is none: the packaged defaults).

    Returns:
        The file's YAML as compact JSON text, which `clipflow.params.parse_params` reads.

    Raises:
        ClipflowError: `path` names a file that does not exist.
        OSError: the file cannot be read.
    """
    return json.dumps(yaml.safe_load(params_file(path).read_text()))


# The compiled default of every pipeline's `params`: the checkout's params.yaml (see `components.CHECKOUT`).
DEFAULT_PARAMS = params_json(CHECKOUT / "params.yaml")
