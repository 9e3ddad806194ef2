from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components import CLIPFLOW_IMAGE, compile_main


@dsl.component(base_image=CLIPFLOW_IMAGE)
def evaluate_component(
    params: str,
    overrides: list,
    profile: str,
    data: Input[Dataset],
    model: Input[Model],
    mlflow_run_id: str,
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    summary: Output[Markdown],
    evaluation: Output[Artifact],
    model_uri: str = "",
) -> NamedTuple("EvaluateOutputs", [("metrics_json", str), ("report", str), ("model_uri", str)]):
    """Zero-shot top-1 on each zero-shot set, with chance beside it, and retrieval recall@k on the test split.

    Args:
        params: the content of params.yaml, as JSON.
        overrides: `section.key=value` strings applied on top of it.
        profile: a params profile name, or "" for none.
        data: the data directory.
        model: the trained checkpoint folder.
        mlflow_run_id: the training run that receives the metrics.
        metrics: the metrics, shown in the Kubeflow UI.
        confusion: the confusion matrix of the gated zero-shot set (else the first set).
        summary: the evaluation as Markdown tables.
        evaluation: the report folder: metrics.json, CLIP_benchmark results, plots, per-item hits, the WiSE-FT curve.
        model_uri: the logged MLflow model of `model` (the train step's).

    Returns:
        `metrics_json`, the `report` (metrics.json without per-set details), and `model_uri`: the model to
        register, the chosen WiSE-FT mix when one was chosen and logged, else the given `model_uri`.
    """
    import json
    from collections import namedtuple
    from pathlib import Path

    from clipflow.evaluate.report import markdown_summary
    from clipflow.evaluate.step import evaluate
    from clipflow.params import parse_params

    resolved = parse_params(params, overrides, profile or None)
    result = evaluate(model.path, data.path, evaluation.path, resolved, mlflow_run_id=mlflow_run_id)
    for name, value in result.metrics.items():
        metrics.log_metric(name, value)
    shown = resolved.gated_set(result.zeroshot)
    if shown is not None:
        confusion.log_confusion_matrix(result.zeroshot[shown].classes, result.zeroshot[shown].confusion.tolist())
    # The Kubeflow UI shows this file alone, where the summary's relative figure links lead nowhere.
    Path(summary.path).write_text(markdown_summary(result, figures_in=evaluation.uri))
    report = {key: value for key, value in result.to_dict().items() if key not in ("zeroshot", "baseline")}
    outputs = namedtuple("EvaluateOutputs", ["metrics_json", "report", "model_uri"])
    return outputs(json.dumps(result.metrics), json.dumps(report), result.model_uri or model_uri)


if __name__ == "__main__":
    compile_main(evaluate_component)
