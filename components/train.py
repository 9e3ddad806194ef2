from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import CLIPFLOW_IMAGE, compile_main


@dsl.component(base_image=CLIPFLOW_IMAGE)
def train_component(
    params: str,
    overrides: list,
    profile: str,
    data: Input[Dataset],
    model: Output[Model],
    resume: str = "",
) -> NamedTuple("TrainOutputs", [("mlflow_run_id", str), ("model_uri", str), ("report", str)]):
    """Train with torchrun (`train.nproc` processes) and log the run and model to MLflow.

    Args:
        params: the content of params.yaml, as JSON.
        overrides: `section.key=value` strings applied on top of it.
        profile: a params profile name, or "" for none.
        data: the validated data directory.
        model: the folder that receives the open_clip checkpoint.
        resume: "" to start fresh, `latest` or a checkpoint location (see `clipflow train --resume`).
    """
    import json
    import os
    from collections import namedtuple

    from clipflow.params import parse_params
    from clipflow.train.launch import train

    resolved = parse_params(params, overrides, profile or None)
    # Only the cluster build sets CLIPFLOW_LAUNCHER (to trainjob); kfp.local runs torchrun in the step itself.
    launcher = os.environ.get("CLIPFLOW_LAUNCHER", "torchrun")
    result = train(data.path, model.path, resolved, resume=resume or None, launcher=launcher, data_uri=data.uri)
    model.metadata.update({"mlflow_run_id": result.mlflow_run_id, "framework": "open_clip"})
    outputs = namedtuple("TrainOutputs", ["mlflow_run_id", "model_uri", "report"])
    return outputs(result.mlflow_run_id, result.model_uri, json.dumps(result.to_dict()))


if __name__ == "__main__":
    compile_main(train_component)
