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
