"""One KFP component per pipeline step: thin, typed functions that call clipflow.

Each is a lightweight Python component: KFP ships the function's source and runs it in the
clipflow image (locally, in this environment through `kfp.local`). Heavy imports stay inside
the function bodies, and every component returns a JSON `report` of its step, which the
pipeline exposes as an output.

Each component also compiles alone, to a YAML that can be uploaded or reused in another pipeline:

    python -m components.train                      # writes ./train_component.yaml
    python -m components.train --output train.yaml
"""

import argparse
import os
from pathlib import Path

# The container image every step runs in on a cluster; kfp.local ignores it.
CLIPFLOW_IMAGE = os.environ.get("CLIPFLOW_IMAGE", "clipflow:latest")


def compile_main(component, argv: list[str] | None = None) -> Path:
    """`python -m components.<step>`: compile that one component to KFP IR YAML and print the file's path.

    Args:
        component: the step's `@dsl.component` function.
        argv: the command-line arguments (default: `sys.argv[1:]`).

    Returns:
        The file written: `--output`, by default `<function name>.yaml` in the working directory.
    """
    from kfp import compiler

    name = component.python_func.__name__
    parser = argparse.ArgumentParser(prog=f"python -m components.{name.removesuffix('_component')}")
    parser.add_argument("--output", type=Path, default=Path(f"{name}.yaml"), help=f"default: ./{name}.yaml")
    output = parser.parse_args(argv).output
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(component, str(output))
    print(output)
    return output


# The checkout this package lives in: the source tree of an editable install, or /app in the step
# image (deploy/Dockerfile copies the checkout there and puts /app first on PYTHONPATH). A wheel
# installed elsewhere would point into site-packages, where neither params.yaml nor serving/ exist.
CHECKOUT = Path(__file__).resolve().parents[1]
# What marks a clipflow source checkout: the files the verbs and steps that need one read from it.
CHECKOUT_MARKERS = ("pipelines/pipeline.py", "serving/service.py")


def checkout() -> Path:
    """The clipflow source checkout: the working directory when it is one, else the one clipflow runs from.

    The user's own checkout (an edited `serving/`) wins. Otherwise the checkout of the installed
    packages: the source tree of an editable install, /app in the step image. So `clipflow run` in
    a folder that holds only a params.yaml works, as kfp.local runs the steps there.

    Raises:
        ClipflowError: neither folder holds pipelines/pipeline.py and serving/service.py.
    """
    from clipflow.errors import ClipflowError

    for root in dict.fromkeys((Path.cwd(), CHECKOUT)):
        if all((root / marker).is_file() for marker in CHECKOUT_MARKERS):
            return root
    missing = " and ".join(marker for marker in CHECKOUT_MARKERS if not (Path.cwd() / marker).is_file())
    raise ClipflowError(f"cannot find {missing} in {Path.cwd()}: run clipflow from its source checkout")


# The catalogue name that means "the data this run ingested": the index step's `data` artifact.
INGESTED = "ingested"


def catalogue_source(source: str, data) -> str:
    """The location an index step reads: `data`'s folder for `ingested`, else `source` as given.

    Raises:
        ClipflowError: `ingested` in a pipeline that passes no ingested data.
    """
    from clipflow.errors import ClipflowError

    if source != INGESTED:
        return source
    if data is None:
        raise ClipflowError(f"the catalogue {INGESTED!r} means the run's ingested data, which this pipeline lacks")
    return data.path
