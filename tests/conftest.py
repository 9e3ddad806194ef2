import os
from pathlib import Path

import pytest

from clipflow.params import load_params

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


@pytest.fixture(scope="session")
def small_params():
    """The `test` profile of the repository's params.yaml."""
    return load_params(REPO / "params.yaml", profile="test")
