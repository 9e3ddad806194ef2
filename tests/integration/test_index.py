"""`clipflow index` as a user runs it: real subprocesses of the CLI, a real CLIP-Tiny checkpoint, real sources.

The artifact is read back the way clip-retrieval's consumers read it (numpy over `img_emb/*.npy`, pandas over
`metadata/`), and checked against the model's own `encode_images` / `encode_text` of the same images and captions.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.support import REPO
from tests.support.bad_inputs import random_bytes, rgb_png, truncated_jpeg
from tests.support.processes import process_group

CLIPFLOW = Path(sys.executable).parent / "clipflow"
FLOAT16_TOLERANCE = 2e-3  # float16 keeps 11 bits: a unit vector's entries move by at most ~5e-4
PARAMS = ["--params", str(REPO / "params.yaml"), "--profile", "test"]


def clipflow_index(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLIPFLOW), "index", *PARAMS, "--no-store", *args], capture_output=True, text=True, timeout=timeout
    )


def report_of(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def clip_retrieval_read(folder: Path) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """What clip-retrieval's consumers do: the sorted .npy files stacked, the metadata folder as one table."""
    images = np.concatenate([np.load(path) for path in sorted((folder / "img_emb").glob("*.npy"))])
    texts = np.concatenate([np.load(path) for path in sorted((folder / "text_emb").glob("*.npy"))])
    return images, texts, pd.read_parquet(folder / "metadata")


def plain(column: pd.Series) -> list:
    """A column's values with every kind of missing value (None, NaN, pd.NA) as None."""
    return [None if pd.isna(value) else value for value in column]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from clipflow import model as clip_model

    folder = tmp_path_factory.mktemp("model")
    model = clip_model.create("CLIP-Tiny")
    return clip_model.save_checkpoint(folder, model.model, "CLIP-Tiny", extra={})


@pytest.fixture(scope="module")
def model(checkpoint):
    from clipflow.registry.models import load_model

    return load_model(checkpoint)


def builtin_rows(params) -> int:
    """The built-in dataset's samples, all splits."""
    from clipflow.data import builtin

    return sum(builtin.split_size(params.data, split) for split in builtin.SPLITS)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, small_params):
    from clipflow.data.ingest import ingest

    folder = tmp_path_factory.mktemp("data") / "builtin"
    return folder, ingest("builtin", folder, small_params.data)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, ingested, checkpoint):
    """Every split of the ingested folder, indexed by two worker processes."""
    output = tmp_path_factory.mktemp("index") / "embeddings"
    result = clipflow_index(
        "--source", str(ingested[0]), "--model", str(checkpoint), "--output", str(output), "--set", "index.workers=2"
    )
    return output, report_of(result)


def test_ingested_folder_counts_reconcile_and_read_as_clip_retrieval_reads(indexed, ingested, small_params):
    output, report = indexed
    data, ingest_report = ingested
    rows = builtin_rows(small_params)
    assert report["rows"] == report["input_rows"] == ingest_report.kept == rows
    assert report["quarantined"] == 0
    assert report["data_version"] == ingest_report.data_version
    assert report["model_version"].startswith("sha256-")
    shards = sorted(data.glob("*/*.tar"))
    assert report["parts"] == len(shards) > 1

    images, texts, metadata = clip_retrieval_read(output)
    assert images.dtype == texts.dtype == np.float16
    assert images.shape == texts.shape == (rows, report["dim"])
    assert len(metadata) == rows
    np.testing.assert_allclose(np.linalg.norm(images.astype(np.float32), axis=1), 1.0, atol=FLOAT16_TOLERANCE)
    # Row i of the stacked files is row i of the table: part by part, the keys come in the same order.
    for number, path in enumerate(sorted((output / "metadata").glob("*.parquet"))):
        assert len(pd.read_parquet(path)) == len(np.load(output / "img_emb" / f"img_emb_{number:06d}.npy"))
    source = pd.read_parquet(data / "metadata.parquet").set_index("key")
    assert sorted(metadata["key"]) == sorted(source.index)
    joined = source.loc[metadata["key"]]
    for column in ("label", "caption", "split", "answer"):  # the probe rows have no label, the others no answer
        assert plain(metadata[column]) == plain(joined[column]), column


def test_embeddings_equal_the_models_own_encoding_of_the_test_split(indexed, ingested, model):
    from clipflow.data.pairs import ShardPairs

    output, _ = indexed
    images, texts, metadata = clip_retrieval_read(output)
    pairs = ShardPairs(ingested[0], "test", model.preprocess, model.tokenizer)
    expected_images = pairs.embed_images(model.encode_images, 64, "reference").numpy()
    expected_texts = model.encode_text([pairs.caption(i) for i in range(len(pairs))]).numpy()
    rows = {key: row for row, key in enumerate(metadata["key"])}
    order = [rows[key] for key in pairs.index.keys]
    assert len(order) == 200
    np.testing.assert_allclose(images[order].astype(np.float32), expected_images, atol=FLOAT16_TOLERANCE)
    np.testing.assert_allclose(texts[order].astype(np.float32), expected_texts, atol=FLOAT16_TOLERANCE)


def test_manifest_bad_rows_are_quarantined_with_their_reasons(tmp_path, checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    good = {f"good{i}.png": rgb_png((40 * i, 200 - 20 * i, 90)) for i in range(7)}
    bad = {
        "noise.png": (random_bytes(), "a picture of noise", "not an image"),
        "tiny.png": (rgb_png((10, 10, 10), size=(8, 8)), "a very small picture", "side outside"),
        "cut.jpg": (truncated_jpeg(), "half of a photo", "does not decode"),
        "blank.png": (rgb_png((1, 2, 3)), "", "caption is missing"),  # CSV reads an empty cell as missing
        "spaces.png": (rgb_png((3, 2, 1)), "   ", "caption is empty"),
    }
    for name, payload in good.items():
        (images / name).write_bytes(payload)
    for name, (payload, _, _) in bad.items():
        (images / name).write_bytes(payload)
    rows = [(f"images/{name}", f"a coloured square number {i}", f"L{i}") for i, name in enumerate(good)]
    rows += [(f"images/{name}", caption, "bad") for name, (_, caption, _) in bad.items()]
    rows += [("images/missing.png", "a file that is not there", "bad"), ("", "no image at all", "bad")]
    manifest = tmp_path / "catalogue.csv"
    with manifest.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "caption", "label"])
        writer.writerows(rows)

    output = tmp_path / "embeddings"
    report = report_of(
        clipflow_index(
            "--source", str(manifest), "--model", str(checkpoint), "--output", str(output),
            "--set", "index.part_size=4", "--set", "index.workers=1",
        )
    )  # fmt: skip
    assert report["input_rows"] == len(rows) == 14
    assert report["rows"] == len(good)
    assert report["quarantined"] == len(rows) - len(good)
    assert report["parts"] == 4

    from clipflow.index.artifact import read_quarantine

    quarantine = read_quarantine(output)
    assert len(quarantine) == report["quarantined"]
    reasons = dict(zip(quarantine["source"].map(lambda source: Path(source).name), quarantine["reason"], strict=True))
    for name, (_, _, reason) in bad.items():
        assert reason in reasons[name], (name, reasons[name])
    assert "file not found" in reasons["missing.png"]
    assert any(reason == "image is missing" for reason in quarantine["reason"])
    assert sorted(quarantine["row"]) == list(range(len(good), len(rows)))

    images_emb, _, metadata = clip_retrieval_read(output)
    assert len(images_emb) == len(metadata) == len(good)
    assert list(metadata["label"]) == [f"L{i}" for i in range(len(good))]
    assert [Path(path).name for path in metadata["image_path"]] == list(good)


def test_a_killed_run_resumes_to_the_embeddings_of_an_uninterrupted_one(tmp_path, checkpoint, small_params):
    import dataclasses

    from clipflow.data.ingest import ingest
    from clipflow.index import artifact
    from clipflow.index.embed import embed_catalogue

    data = tmp_path / "data"
    ingest("builtin", data, dataclasses.replace(small_params.data, shard_size=100))
    output = tmp_path / "killed"
    # Small batches: the run is slow enough to be caught between its first and its last part.
    settings = ["--set", "index.workers=2", "--set", "index.batch_size=4"]
    command = [str(CLIPFLOW), "index", *PARAMS, "--no-store", "--source", str(data), "--model", str(checkpoint)]
    command += ["--output", str(output), *settings]
    with process_group(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as process:
        deadline = time.monotonic() + 60
        while not artifact.part_numbers(output) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
    finished = artifact.part_numbers(output)
    parts = len(list(data.glob("*/*.tar")))
    assert 1 <= len(finished) < parts, "the run was not caught between its first and its last part"
    assert not (output / artifact.MANIFEST_FILE).exists()
    kept = {
        path: path.stat().st_mtime_ns
        for number in finished
        for path in artifact.part_paths(output, number).values()
        if path.exists()
    }

    report = report_of(subprocess.run(command, capture_output=True, text=True, timeout=120))
    assert report["rows"] == report["input_rows"] == builtin_rows(small_params)
    assert {path: path.stat().st_mtime_ns for path in kept} == kept
    assert not [path for path in output.rglob(".*") if path.name != ".index-run.json"]

    reference = tmp_path / "uninterrupted"
    embed_catalogue(str(data), str(checkpoint), str(reference), small_params)
    resumed, reference_read = clip_retrieval_read(output), clip_retrieval_read(reference)
    np.testing.assert_allclose(resumed[0].astype(np.float32), reference_read[0], atol=FLOAT16_TOLERANCE)
    np.testing.assert_allclose(resumed[1].astype(np.float32), reference_read[1], atol=FLOAT16_TOLERANCE)
    assert list(resumed[2]["key"]) == list(reference_read[2]["key"])


def test_bad_input_is_one_clear_line(tmp_path, indexed, ingested, checkpoint):
    from clipflow import model as clip_model

    output, _ = indexed
    other = clip_model.save_checkpoint(
        tmp_path / "other", clip_model.create("CLIP-Tiny").model, "CLIP-Tiny", extra={"seed": 1}
    )
    all_bad = tmp_path / "all-bad.csv"
    all_bad.write_text("image,caption\nmissing.png,a picture that is not there\n")
    cases = {
        "another model": (["--source", str(ingested[0]), "--model", str(other), "--output", str(output)],
                          "holds embeddings of another run (its model_version differ)"),
        "missing source": (["--source", str(tmp_path / "nowhere"), "--model", str(checkpoint)], "source not found"),
        "unknown model": (["--source", str(ingested[0]), "--model", str(tmp_path / "no.pt")], "checkpoint not found"),
        "no source": (["--model", str(checkpoint)], "index needs --source"),
        "no images": (["--source", str(all_bad), "--model", str(checkpoint)], "no image of"),
    }  # fmt: skip
    for case, (args, message) in cases.items():
        if "--output" not in args:
            args = [*args, "--output", str(tmp_path / case.replace(" ", "-"))]
        result = clipflow_index(*args)
        assert result.returncode == 1, (case, result.stderr)
        # The progress bar may have drawn before the error; the error is one line, and no traceback.
        errors = [line for line in result.stderr.splitlines() if line.strip() and "index images" not in line]
        assert len(errors) == 1 and message in errors[0], (case, result.stderr)
    assert (output / "index.json").is_file()  # the refused run left the artifact as it was
