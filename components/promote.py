from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Markdown, Output

from components import CLIPFLOW_IMAGE, compile_main


@dsl.component(base_image=CLIPFLOW_IMAGE)
def promote_component(
    params: str,
    overrides: list,
    profile: str,
    model_uri: str,
    metrics_json: str,
    data_version: str,
    summary: Output[Markdown],
) -> NamedTuple("PromoteOutputs", [("model_name", str), ("model_version", str), ("report", str)]):
    """Register the model version; move `champion` only when the gate in params passes.

    Args:
        params: the content of params.yaml, as JSON.
        overrides: `section.key=value` strings applied on top of it.
        profile: a params profile name, or "" for none.
        model_uri: the logged MLflow model to register: the one the evaluate step judged (the trained model,
            or the WiSE-FT mix it chose); its run's evaluation/per_item.parquet feeds the gate's bootstrap.
        metrics_json: the evaluation metrics, a JSON object.
        data_version: the version of the data the model was trained on.
        summary: the decision with every check of the gate and the registered model's URI, as Markdown
            (also the version's description in MLflow, and the last section of the run's evaluation summary).
    """
    import json
    from collections import namedtuple
    from pathlib import Path

    from clipflow.params import parse_params
    from clipflow.registry.promote import describe, promote

    resolved = parse_params(params, overrides, profile or None)
    result = promote(model_uri, json.loads(metrics_json), resolved, data_version=data_version)
    Path(summary.path).write_text(describe(result))
    outputs = namedtuple("PromoteOutputs", ["model_name", "model_version", "report"])
    return outputs(result.model_name, result.model_version, json.dumps(result.to_dict()))


if __name__ == "__main__":
    compile_main(promote_component)
