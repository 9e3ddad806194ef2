from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Output

from components import CLIPFLOW_IMAGE, compile_main


@dsl.component(base_image=CLIPFLOW_IMAGE)
def validate_component(
    params: str,
    overrides: list,
    profile: str,
    data: Input[Dataset],
    report: Output[HTML],
    validation: Output[Artifact],
) -> str:
    """Run the Great Expectations suite over the metadata; fail when too many rows break it, or when the
    evaluation's zero-shot sets, retrieval split or the gate's floors do not fit the data.

    The report folder is also logged to MLflow, as a run tagged with the data's version.

    Args:
        params: the content of params.yaml, as JSON.
        overrides: `section.key=value` strings applied on top of it.
        profile: a params profile name, or "" for none.
        data: the ingested data directory.
        report: the report page, self-contained, shown in the Kubeflow UI.
        validation: the full report folder (data docs, validation.json, quarantine.parquet).

    Returns:
        The step's JSON report.
    """
    import json
    from pathlib import Path

    from clipflow.evaluate.plan import check_evaluation_plan
    from clipflow.params import parse_params
    from clipflow.validate import check_passed, validate
    from clipflow.validate.page import report_page
    from clipflow.validate.tracking import log_report

    resolved = parse_params(params, overrides, profile or None)
    # What would fail the evaluation or the gate fails here, before the training.
    check_evaluation_plan(data.path, resolved)
    result = validate(data.path, validation.path, resolved.validate)
    # The Kubeflow UI shows this page alone, away from the folder: it names the folder's files instead of linking them.
    Path(report.path).write_text(report_page(validation.path, folder=validation.uri))
    validation.metadata.update({k: getattr(result, k) for k in ("input_rows", "kept", "quarantined")})
    validation.metadata["mlflow_run_id"] = log_report(validation.path, result, resolved.tracking, data.path)
    check_passed(result, resolved.validate)
    return json.dumps(result.to_dict())


if __name__ == "__main__":
    compile_main(validate_component)
