"""The validate step on a real ingested dataset, clean and deliberately corrupted."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from clipflow.artifacts import ExpectationResult, IngestReport, ValidationReport
from clipflow.data.ingest import ingest
from clipflow.errors import ClipflowError
from clipflow.evaluate.plan import check_evaluation_plan, evaluation_sets
from clipflow.params import Params, load_params
from clipflow.validate.suite import check_passed, validate
from tests.support import REPO


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory, small_params: Params) -> Path:
    path = tmp_path_factory.mktemp("ingested") / "data"
    ingest("builtin", path, small_params.data)
    return path


def _metadata_copy(data_dir: Path, target: Path) -> pd.DataFrame:
    """The ingested metadata table, to corrupt and write to `target` (validate reads nothing else)."""
    target.mkdir()
    return pd.read_parquet(data_dir / "metadata.parquet")


def test_clean_dataset_passes(data_dir: Path, tmp_path: Path, small_params: Params) -> None:
    report = tmp_path / "report"
    validate(data_dir, report, small_params.validate)
    # A second run into the same folder must replace the data docs, not add to them.
    result = validate(data_dir, report, small_params.validate)

    assert result.success is True
    assert result.input_rows == result.kept == len(pd.read_parquet(data_dir / "metadata.parquet"))
    assert result.quarantined == 0 and result.bad_fraction == 0.0
    assert all(e.success and e.unexpected_count == 0 for e in result.expectations)
    counts = IngestReport.read(data_dir).counts
    assert result.splits == {split: {"rows": n, "kept": n, "quarantined": 0} for split, n in counts.items()}
    assert result.report == str(report / "index.html")
    assert "<html" in (report / "index.html").read_text()
    assert "<html" in (report / "data_docs" / "index.html").read_text()
    assert len(list((report / "data_docs" / "validations").rglob("*.html"))) == 1
    assert ValidationReport.from_json((report / "validation.json").read_text()) == result
    quarantine = pd.read_parquet(report / "quarantine.parquet")
    assert len(quarantine) == 0 and {"key", "split", "reason"} <= set(quarantine.columns)
    check_passed(result, small_params.validate)


def test_corrupt_rows_are_quarantined(data_dir: Path, tmp_path: Path, small_params: Params) -> None:
    bad_dir = tmp_path / "bad"
    metadata = _metadata_copy(data_dir, bad_dir)
    keys = metadata["key"].tolist()
    metadata.loc[3, "caption"] = None
    metadata.loc[4, "caption"] = "x" * 1000
    metadata.loc[4, "height"] = 10_000
    metadata.loc[6, "sha256"] = metadata.loc[5, "sha256"]
    metadata.loc[7, "width"] = 5
    metadata.loc[8, "split"] = "bogus"
    metadata.loc[10, "key"] = metadata.loc[9, "key"]
    metadata.to_parquet(bad_dir / "metadata.parquet", index=False)
    expected = {
        3: ["caption is null"],
        4: ["caption length outside [3, 300]", "height outside [16, 4096]"],
        5: ["sha256 not unique"],
        6: ["sha256 not unique"],
        7: ["width outside [16, 4096]"],
        8: [f"split not in {small_params.validate.splits}"],
        9: ["key not unique"],
        10: ["key not unique"],
    }

    report = tmp_path / "report"
    result = validate(bad_dir, report, small_params.validate)

    quarantine = pd.read_parquet(report / "quarantine.parquet").set_index("row")
    assert sorted(quarantine.index) == sorted(expected)
    for row, reasons in expected.items():
        assert sorted(quarantine.loc[row, "reason"].split("; ")) == sorted(reasons), row
        assert quarantine.loc[row, "split"] == metadata.loc[row, "split"]
    assert quarantine.loc[3, "key"] == keys[3]
    assert quarantine.loc[10, "key"] == keys[9]
    assert result.success is False
    assert result.quarantined == len(expected)
    assert result.input_rows == result.kept + result.quarantined == len(metadata)
    assert result.bad_fraction == pytest.approx(len(expected) / len(metadata))
    width = [e for e in result.expectations if e.column == "width" and "between" in e.expectation]
    assert width == [
        ExpectationResult(
            expectation="expect_column_values_to_be_between",
            column="width",
            reason="width outside [16, 4096]",
            threshold="16 to 4096 px (validate.min_side, validate.max_side)",
            success=False,
            unexpected_count=1,
        )
    ]
    assert (report / "index.html").is_file() and (report / "data_docs" / "index.html").is_file()
    assert ValidationReport.from_json((report / "validation.json").read_text()) == result
    bad_per_split = pd.Series([metadata.loc[row, "split"] for row in expected]).value_counts()
    rows_per_split = metadata["split"].value_counts()
    assert result.splits == {
        split: {
            "rows": rows_per_split[split],
            "kept": rows_per_split[split] - bad_per_split.get(split, 0),
            "quarantined": bad_per_split.get(split, 0),
        }
        for split in [*small_params.validate.splits, "bogus"]
    }
    assert list(result.splits)[-1] == "bogus"  # unexpected splits after the expected ones
    thresholds = {(e.column, e.expectation): e.threshold for e in result.expectations}
    assert thresholds[("split", "expect_column_values_to_be_in_set")] == (
        "one of train, test, heldout, shift, probe (validate.splits)"
    )
    assert thresholds[("caption", "expect_column_value_lengths_to_be_between")] == (
        "3 to 300 characters (validate.caption_min_chars, validate.caption_max_chars)"
    )

    with pytest.raises(ClipflowError) as failure:
        check_passed(result, small_params.validate)
    message = str(failure.value)
    assert "\n" not in message
    rows = len(pd.read_parquet(data_dir / "metadata.parquet"))
    assert message.startswith(
        f"validation failed: 8 of {rows} input rows ({8 / rows:.2%}) quarantined (0 at ingest, 8 by expectations)"
    )
    assert "validate.max_bad_fraction=0.0" in message and message.endswith(result.report)
    check_passed(result, dataclasses.replace(small_params.validate, max_bad_fraction=0.01))


def test_missing_data_dir_is_a_user_error(tmp_path: Path, small_params: Params) -> None:
    with pytest.raises(ClipflowError, match="not an ingested data directory"):
        validate(tmp_path / "absent", tmp_path / "report", small_params.validate)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.drop(columns=["caption"]), r"lacks columns \['caption'\]"),
        (lambda m: m.assign(width=m["width"].astype(str)), "column width must hold numbers"),
        (lambda m: m.iloc[:0], "has no rows"),
    ],
)
def test_malformed_metadata_is_a_user_error(
    data_dir: Path, tmp_path: Path, small_params: Params, change, message
) -> None:
    bad_dir = tmp_path / "bad"
    change(_metadata_copy(data_dir, bad_dir)).to_parquet(bad_dir / "metadata.parquet", index=False)
    with pytest.raises(ClipflowError, match=message):
        validate(bad_dir, tmp_path / "report", small_params.validate)


def test_report_is_logged_to_mlflow_with_the_data_lineage(data_dir: Path, tmp_path: Path, small_params: Params) -> None:
    import mlflow

    from clipflow.artifacts import dvc_md5
    from clipflow.params import TrackingParams
    from clipflow.validate.tracking import log_report

    report = tmp_path / "report"
    result = validate(data_dir, report, small_params.validate)
    tracking = TrackingParams(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="validate-test")
    run_id = log_report(report, result, tracking, data_dir)

    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.tags["clipflow.step"] == "validate"
    assert run.data.tags["data_version"] == IngestReport.read(data_dir).data_version
    assert run.data.tags["data_dvc_md5"] == dvc_md5(data_dir)
    # the commit ingest ran from (the tests run in the checkout), with -dirty when its tree had changes
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    assert run.data.tags["data_git_revision"].removesuffix("-dirty") == head.stdout.strip()
    assert run.data.metrics["validation_input_rows"] == result.input_rows
    logged = tmp_path / "logged"
    mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="validation", dst_path=str(logged))
    assert (logged / "validation" / "index.html").is_file()
    assert (logged / "validation" / "data_docs" / "index.html").is_file()
    assert (logged / "validation" / "quarantine.parquet").is_file()


def _as_manifest_data(data_dir: Path, target: Path, metadata: pd.DataFrame | None = None) -> Path:
    """The ingested data as a manifest source would have written it: the same rows, another source."""
    target.mkdir()
    (metadata if metadata is not None else pd.read_parquet(data_dir / "metadata.parquet")).to_parquet(
        target / "metadata.parquet", index=False
    )
    report = dataclasses.replace(IngestReport.read(data_dir), source=str(target / "manifest.csv"))
    (target / "ingest.json").write_text(report.to_json())
    return target


def test_the_builtin_data_adds_its_own_zeroshot_set_and_passes_the_plan(data_dir: Path, small_params: Params) -> None:
    assert list(evaluation_sets(data_dir, small_params.evaluate)) == ["seen", "heldout"]
    check_evaluation_plan(data_dir, small_params)
    # its floors and margins may name the built-in set and the probes: this data produces them
    gated = _with(
        small_params,
        [
            "promote.floors.zeroshot_top1_heldout=0.1",
            "promote.floors.probe_counting=0.1",
            "promote.floors.shift_zeroshot_top1_sketch=0.1",  # and the distribution-shift report
        ],
    )
    check_evaluation_plan(data_dir, gated)


def test_other_data_gets_only_the_configured_sets(data_dir: Path, tmp_path: Path, small_params: Params) -> None:
    manifest = _as_manifest_data(data_dir, tmp_path / "manifest")
    assert list(evaluation_sets(manifest, small_params.evaluate)) == ["seen"]
    check_evaluation_plan(manifest, small_params)
    with pytest.raises(ClipflowError) as caught:
        check_evaluation_plan(manifest, _with(small_params, ["promote.floors.zeroshot_top1_heldout=0.2"]))
    assert str(caught.value) == (
        "promote.floors names 'zeroshot_top1_heldout', which no evaluation of this data produces (its zero-shot "
        "sets: seen); name a metric of evaluate.zeroshot's sets, such as zeroshot_top1_seen, or retrieval_i2t_r1"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["evaluate.zeroshot.digits.split=test", "evaluate.zeroshot.digits.label_field=digit"],
            "zero-shot set 'digits' (evaluate.zeroshot.digits): the data has no label column 'digit'; its columns are",
        ),
        (
            ["evaluate.zeroshot.seen.split=val"],
            "zero-shot set 'seen' (evaluate.zeroshot.seen) reads split 'val', which is not in the data: "
            "the data has splits ['heldout', 'probe', 'shift', 'test', 'train']",
        ),
        (
            ["evaluate.zeroshot.seen.classes=[red circle, blue square]"],
            "zero-shot set 'seen' (evaluate.zeroshot.seen): split 'test' has labels outside its classes: [",
        ),
        (["evaluate.retrieval_split=val"], "evaluate.retrieval_split 'val' is not in the data"),
        (["evaluate.retrieval_label_field=digit"], "evaluate.retrieval_label_field (null: recall by pairs only): the"),
        (["promote.floors.retrieval_i2t_r20=0.1"], "promote.floors names 'retrieval_i2t_r20', which no evaluation"),
        (["promote.min_over_chance.zeroshot_top1_digits=0.1"], "promote.min_over_chance names 'zeroshot_top1_digits'"),
    ],
)
def test_what_would_fail_after_training_fails_the_plan_in_one_line(
    data_dir: Path, small_params: Params, overrides: list[str], message: str
) -> None:
    with pytest.raises(ClipflowError) as caught:
        check_evaluation_plan(data_dir, _with(small_params, overrides))
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_a_set_of_one_class_or_with_unlabelled_images_fails_the_plan(
    data_dir: Path, tmp_path: Path, small_params: Params
) -> None:
    metadata = pd.read_parquet(data_dir / "metadata.parquet")
    one_class = _as_manifest_data(data_dir, tmp_path / "one-class", metadata.assign(label="three"))
    with pytest.raises(ClipflowError, match=r"has 1 class \(\['three'\]\) in column 'label': it needs at least 2"):
        check_evaluation_plan(one_class, small_params)
    test_rows = metadata.index[metadata["split"] == "test"]
    metadata.loc[test_rows[:5], "label"] = None
    unlabelled = _as_manifest_data(data_dir, tmp_path / "unlabelled", metadata)
    with pytest.raises(ClipflowError, match=f"'seen' .*: 5 of {len(test_rows)} rows of split 'test' have no 'label'"):
        check_evaluation_plan(unlabelled, small_params)


def _with(params: Params, overrides: list[str]) -> Params:
    return load_params(REPO / "params.yaml", overrides, profile=params.profile)
