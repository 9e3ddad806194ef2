"""Curation with the model at ingest, as a user meets it: a manifest of PNG files and a CSV.

A CLIP-Tiny trained briefly on the built-in data (in process, under a minute) scores a manifest of
built-in test images that it never trained on: half of them carry their own caption, half the
caption of another image with another colour and shape (shuffled on purpose). Four more rows
repeat an image re-encoded as a larger JPEG, one in the chunk of its original, three in later
chunks (found through the Milvus Lite collection rather than in memory).
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from clipflow import model as clip_model
from clipflow.artifacts import IngestReport
from clipflow.data import chunks as chunk_module
from clipflow.data.ingest import ingest
from clipflow.data.shards import ShardIndex
from clipflow.errors import ClipflowError
from clipflow.params import load_params
from clipflow.train import worker
from clipflow.train.job import WorkerJob
from clipflow.validate.suite import validate
from tests.support import REPO

CLIPFLOW = str(Path(sys.executable).with_name("clipflow"))
# The test profile's 12 steps only show that training runs; these give a model that aligns captions.
LEARNING = ["train.steps=150", "train.lr=0.0005", "train.warmup_steps=20", "train.log_every=10"]
PAIRS = 32  # manifest rows before the duplicates: even ones captioned correctly, odd ones shuffled
# Measured on this model: correct pairs score 0.68 to 0.91, shuffled ones -0.84 to 0.61; a re-encoded image
# is at cosine 0.9995 or more to its original, while two distinct renders of one composition reach 0.998.
SCORE_FLOOR = 0.64
NEAR_DUPLICATE = 0.999
# The trained model is not perfect: at most this many of each half may land on the wrong side.
MAX_MISJUDGED = 1
CHUNK_ROWS = 8  # data.shard_size: the 36 rows span five chunks
DUPLICATED = {2: "same chunk", 10: "next chunk", 20: "later chunk", 30: "last chunk"}  # original row -> where
SCORE = re.compile(r"clip score too low: (-?\d\.\d{3}) < validate\.clip_score_min 0\.64 under (.+)")
DUPLICATE = re.compile(
    r"near-duplicate image: repeats (\w+) \(cosine (\d\.\d{4}) >= validate\.near_duplicate_cosine 0\.999\)"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Built-in data ingested, and a checkpoint trained on its train split."""
    root = tmp_path_factory.mktemp("curation")
    params = load_params(REPO / "params.yaml", overrides=LEARNING, profile="test")
    ingest("builtin", root / "builtin", params.data)
    # With a metrics file the leader logs its steps there, and MLflow is never called.
    metrics = str(root / "metrics.jsonl")
    job = WorkerJob(replace(params.train, nproc=1), "curation-test", checkpoint_extra={}, metrics_file=metrics)
    worker.train(job, root / "builtin", root / "model")
    return {"root": root, "checkpoint": root / "model" / clip_model.CHECKPOINT_FILE}


@pytest.fixture(scope="module")
def manifest(trained) -> dict:
    """manifest.csv over images/*.png (and the re-encoded duplicates, images/*.jpg), as a user brings it."""
    root = trained["root"]
    images = root / "images"
    images.mkdir()
    test_split = ShardIndex.of_split(root / "builtin", "test")
    facts = pd.read_parquet(root / "builtin" / "metadata.parquet").set_index("key")
    keys = test_split.keys[:PAIRS]
    captions = [test_split.read(i, "txt").decode() for i in range(PAIRS)]
    rows, shuffled = [], set()
    for i, key in enumerate(keys):
        path = images / f"{key}.png"
        path.write_bytes(test_split.read(i, "png"))
        caption = captions[i]
        if i % 2:
            mine = facts.loc[key]
            other = next(
                j
                for j in [*range(i + 1, PAIRS), *range(i)]
                if facts.loc[keys[j], "color"] != mine["color"] and facts.loc[keys[j], "shape"] != mine["shape"]
            )
            caption = captions[other]
            shuffled.add(str(path))
        rows.append({"image": str(path), "caption": caption})
    duplicates = {}
    for original, where in DUPLICATED.items():
        repeat = images / f"{keys[original]}-larger.jpg"
        with Image.open(io.BytesIO(test_split.read(original, "png"))) as image:
            image.convert("RGB").resize((128, 128), Image.Resampling.BICUBIC).save(repeat, format="JPEG", quality=95)
        duplicates[str(repeat)] = str(images / f"{keys[original]}.png")
        row = {"image": str(repeat), "caption": captions[original]}
        if where == "same chunk":
            rows.insert(original + 1, row)
        else:
            rows.append(row)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return {"csv": root / "manifest.csv", "rows": len(rows), "shuffled": shuffled, "duplicates": duplicates}


def _params(checkpoint: Path, *overrides: str):
    return load_params(
        REPO / "params.yaml",
        overrides=[
            f"validate.clip_score_model={checkpoint}",
            f"validate.clip_score_min={SCORE_FLOOR}",
            f"validate.near_duplicate_cosine={NEAR_DUPLICATE}",
            f"data.shard_size={CHUNK_ROWS}",
            "validate.max_bad_fraction=1.0",
            *overrides,
        ],
        profile="test",
    )


def _ingest(manifest: dict, output: Path, params) -> IngestReport:
    return ingest(str(manifest["csv"]), output, params.data, params.validate, params.tracking)


def _outcomes(output: Path) -> dict[str, str | None]:
    """Source path -> its quarantine reason, or None for a kept row."""
    kept = pd.read_parquet(output / "metadata.parquet")
    quarantined = pd.read_parquet(output / "quarantine.parquet")
    return {**dict.fromkeys(kept["source"]), **dict(zip(quarantined["source"], quarantined["reason"], strict=True))}


@pytest.fixture(scope="module")
def curated(trained, manifest) -> dict:
    output = trained["root"] / "curated"
    params = _params(trained["checkpoint"])
    return {"output": output, "report": _ingest(manifest, output, params), "params": params}


def test_shuffled_captions_are_quarantined_with_their_score_and_correct_ones_kept(trained, manifest, curated):
    outcomes = _outcomes(curated["output"])
    report = curated["report"]
    assert report.input_rows == manifest["rows"] == report.kept + report.quarantined == len(outcomes)

    pairs = [source for source in outcomes if source not in manifest["duplicates"]]
    shuffled = [source for source in pairs if source in manifest["shuffled"]]
    correct = [source for source in pairs if source not in manifest["shuffled"]]
    assert len(shuffled) == len(correct) == PAIRS // 2
    scores = {}
    for source in pairs:
        match = SCORE.fullmatch(outcomes[source] or "")
        if match:
            assert match[2] == str(trained["checkpoint"])
            scores[source] = float(match[1])
            assert scores[source] < SCORE_FLOOR
        else:
            assert outcomes[source] is None, outcomes[source]  # no other reason touches a distinct image
    caught = [source for source in shuffled if source in scores]
    wrongly = [source for source in correct if source in scores]
    print(f"shuffled quarantined {len(caught)}/{len(shuffled)}, correct quarantined {len(wrongly)}/{len(correct)}")
    assert len(shuffled) - len(caught) <= MAX_MISJUDGED
    assert len(wrongly) <= MAX_MISJUDGED
    assert sorted(scores[source] for source in caught)[len(caught) // 2] < SCORE_FLOOR - 0.3  # median well below


def test_a_reencoded_image_is_quarantined_as_a_duplicate_of_the_original_key(manifest, curated):
    output = curated["output"]
    outcomes = _outcomes(output)
    key_of = dict(zip(*pd.read_parquet(output / "metadata.parquet")[["source", "key"]].T.values, strict=True))
    for repeat, original in manifest["duplicates"].items():
        match = DUPLICATE.fullmatch(outcomes[repeat] or "")
        assert match, (repeat, outcomes[repeat])
        assert outcomes[original] is None  # the first occurrence is kept
        assert match[1] == key_of[original]
        assert NEAR_DUPLICATE <= float(match[2]) <= 1.0


def test_the_reports_count_curated_rows_per_reason(manifest, curated, tmp_path):
    report, output = curated["report"], curated["output"]
    reasons = pd.read_parquet(output / "quarantine.parquet")["reason"]
    by_score = int(reasons.str.startswith("clip score too low:").sum())
    as_duplicates = int(reasons.str.startswith("near-duplicate image:").sum())
    assert as_duplicates == len(manifest["duplicates"])
    assert report.curation["quarantined"] == {"clip score too low": by_score, "near-duplicate image": as_duplicates}
    assert report.curation["model"] == str(curated["params"].validate.clip_score_model)
    assert report.quarantine_reasons == {"clip score too low": by_score, "near-duplicate image": as_duplicates}
    assert IngestReport.read(output) == report

    validation = validate(output, tmp_path / "report", curated["params"].validate)
    assert validation.input_rows == manifest["rows"] == validation.kept + validation.quarantined
    assert validation.quarantined_at_ingest == by_score + as_duplicates
    assert validation.quarantine_reasons["near-duplicate image"] == as_duplicates
    assert validation.quarantine_reasons["clip score too low"] == by_score


class _Crash(Exception):
    pass


def _crash_after(monkeypatch, chunks: int) -> None:
    """Kill the ingest (as a crash would) once `chunks` chunks are committed."""
    write = chunk_module.ChunkWriter.write

    def write_then_crash(self, *args, **kwargs):
        if self.chunks == chunks:
            raise _Crash
        write(self, *args, **kwargs)

    monkeypatch.setattr(chunk_module.ChunkWriter, "write", write_then_crash)


def test_a_resumed_ingest_still_finds_duplicates_of_images_kept_before_the_crash(trained, manifest, curated, tmp_path):
    output = tmp_path / "data"
    with pytest.MonkeyPatch.context() as patch:
        _crash_after(patch, 3)  # the originals of the later duplicates are committed, the duplicates are not
        with pytest.raises(_Crash):
            _ingest(manifest, output, curated["params"])
    assert (output / ".ingest" / "curated-000002.npz").is_file()
    resumed = _ingest(manifest, output, curated["params"])
    assert _outcomes(output) == _outcomes(curated["output"])
    assert resumed.data_version == curated["report"].data_version


def test_a_resume_with_other_curation_settings_starts_over(trained, manifest, curated, tmp_path):
    output = tmp_path / "data"
    with pytest.MonkeyPatch.context() as patch:
        _crash_after(patch, 3)
        with pytest.raises(_Crash):
            _ingest(manifest, output, curated["params"])
    lenient = _params(trained["checkpoint"], "validate.clip_score_min=-1.0")
    report = _ingest(manifest, output, lenient)
    # Under the first settings the committed chunks had rows quarantined by score; none may survive.
    assert report.curation["clip_score_min"] == -1.0
    assert report.curation["quarantined"] == {"clip score too low": 0, "near-duplicate image": 4}
    assert report.kept == manifest["rows"] - len(manifest["duplicates"])


@pytest.mark.parametrize("model", ["missing.pt", "not-a-checkpoint.pt"])
def test_a_bad_curation_model_fails_in_one_line_before_any_work(trained, manifest, tmp_path, model):
    (tmp_path / "not-a-checkpoint.pt").write_bytes(b"no weights here")
    output = tmp_path / "data"
    output.mkdir()
    (output / "earlier.txt").write_text("a user's earlier output")
    command = [CLIPFLOW, "ingest", "--params", str(REPO / "params.yaml"), "--profile", "test"]
    command += ["--source", str(manifest["csv"]), "--output", str(output)]
    command += ["--set", f"validate.clip_score_model={model}", "--set", "validate.clip_score_min=0.2"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode not in (0, 130), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("clipflow: error: ") and model in lines[-1], result.stderr[-3000:]
    assert "ingest chunks" not in result.stderr  # no row was read
    assert sorted(path.name for path in output.iterdir()) == ["earlier.txt"]


def test_curating_the_built_in_dataset_is_refused_in_one_line(tmp_path):
    """Its captions are rendered from the scenes: the settings are refused, not silently ignored."""
    params = load_params(REPO / "params.yaml", profile="test")
    checks = replace(params.validate, clip_score_model=str(tmp_path / "model"), clip_score_min=0.2)
    with pytest.raises(ClipflowError, match="curate manifest and shard sources, not the built-in dataset"):
        ingest("builtin", tmp_path / "data", params.data, checks)
    assert not (tmp_path / "data").exists()
