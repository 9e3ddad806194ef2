import os

import pytest

from clipflow.params import load_params
from tests.support import REPO

# The packaged Bento that the serving, page and load tests share; the components chained once on the test profile.
pytest_plugins = ["tests.support.serving_fixtures", "tests.support.component_run"]

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


@pytest.fixture(scope="session")
def small_params():
    """The `test` profile of the repository's params.yaml."""
    return load_params(REPO / "params.yaml", profile="test")
