"""Ingest from manifests and shards: every kind of bad row ends in quarantine, and counts reconcile."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from clipflow.artifacts import IngestReport, data_version
from clipflow.data import ingest as ingest_module
from clipflow.data import sources
from clipflow.data.ingest import ingest
from clipflow.errors import ClipflowError
from clipflow.params import Params
from clipflow.storage import Store
from clipflow.validate.suite import check_passed, validate
from tests.support import REPO, bad_inputs
from tests.support.processes import process_group

HTTP_TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def params(small_params: Params) -> Params:
    data = dataclasses.replace(
        small_params.data, shard_size=8, workers=0, http_timeout_s=HTTP_TIMEOUT_S, http_retries=1
    )
    return dataclasses.replace(small_params, data=data)


@pytest.fixture(scope="module")
def web():
    files = {"/red.png": bad_inputs.rgb_png((220, 20, 20)), "/slow.png": bad_inputs.rgb_png((1, 2, 3))}
    files["/flaky.png"] = bad_inputs.rgb_png((20, 200, 20))
    files["/slow/stalled.png"] = bad_inputs.rgb_png((9, 90, 9))  # bucket `slow` of an S3 endpoint that stalls
    with bad_inputs.http_server(files, slow_delay_s=HTTP_TIMEOUT_S * 6) as url:
        yield url


def _files(folder: Path, images: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, payload in images.items():
        (folder / name).write_bytes(payload)


def _good_rows(folder: Path, count: int) -> list[dict]:
    _files(folder, {f"good-{i}.png": bad_inputs.rgb_png((i % 256, 100, 50), size=(64 + i, 64)) for i in range(count)})
    return [{"image": f"good-{i}.png", "caption": f"good image number {i}", "label": f"g{i}"} for i in range(count)]


# name -> (files to write, manifest row, the quarantine reason it must get; None: kept, converted)
def _cases(web: str) -> dict[str, tuple[dict[str, bytes], dict, str | None]]:
    return {
        "truncated_jpeg": ({"t.jpg": bad_inputs.truncated_jpeg()}, {"image": "t.jpg"}, "image data does not decode"),
        "random_bytes": ({"r.jpg": bad_inputs.random_bytes()}, {"image": "r.jpg"}, "not an image"),
        "empty_file": ({"e.jpg": b""}, {"image": "e.jpg"}, r"empty file \(0 bytes\)"),
        "huge_png": ({"h.png": bad_inputs.huge_png()}, {"image": "h.png"}, "decompression bomb"),
        "missing_caption": (
            {"m.png": bad_inputs.rgb_png((1, 1, 200))},
            {"image": "m.png", "caption": None},
            "caption is missing",
        ),
        "long_caption": (
            {"l.png": bad_inputs.rgb_png((1, 200, 1))},
            {"image": "l.png", "caption": "x" * 10_000},
            "caption is 10000 characters, more than validate.caption_max_chars=300",
        ),
        "control_chars": (
            {"c.png": bad_inputs.rgb_png((9, 9, 9))},
            {"image": "c.png", "caption": "bell \x07 here"},
            r"control characters \['U\+0007'\]",
        ),
        "duplicate": (
            {},
            {"image": "good-0.png", "caption": "the same bytes again"},
            "duplicate image: same bytes as input row 0",
        ),
        "missing_file": ({}, {"image": "nowhere.png"}, "file not found"),
        "http_404": ({}, {"image": f"{web}/absent.png"}, "HTTP 404"),
        "http_timeout": ({}, {"image": f"{web}/slow.png"}, r"timed out after 0.5 s \(2 attempts\)"),
        "http_503_then_ok": ({}, {"image": f"{web}/flaky.png"}, None),
        "http_503_always": ({}, {"image": f"{web}/down.png"}, r"HTTP 503 \(2 attempts\)"),
        "ftp_url": ({}, {"image": "ftp://127.0.0.1/x.png"}, "unsupported URI scheme 'ftp'"),
        "cmyk": ({"k.jpg": bad_inputs.cmyk_jpeg()}, {"image": "k.jpg"}, None),
        "palette": ({"p.png": bad_inputs.palette_png()}, {"image": "p.png"}, None),
        "gray16": ({"g.png": bad_inputs.gray16_png()}, {"image": "g.png"}, None),
        "rgba": ({"a.png": bad_inputs.rgba_png()}, {"image": "a.png"}, None),
        "http_ok": ({}, {"image": f"{web}/red.png"}, None),
    }


# What a converted image must look like at its centre: CMYK ink, palette, 16-bit scaled, alpha on white.
CONVERTED = {"cmyk": (0, 255, 0), "palette": (200, 30, 30), "gray16": (192, 192, 192), "rgba": (255, 255, 255)}
CONVERTED |= {"http_ok": (220, 20, 20), "http_503_then_ok": (20, 200, 20)}
CASES = list(_cases("http://x"))


def _row(case_row: dict, name: str) -> dict:
    return {"caption": f"the {name} case", "label": name, **case_row}


def _stored_image(out: Path, key: str) -> Image.Image:
    samples = wds.WebDataset([str(p) for p in sorted(out.glob("*/*.tar"))], shardshuffle=False)
    for sample in samples:
        if sample["__key__"] == key:
            return Image.open(io.BytesIO(sample["jpg"]))
    raise AssertionError(f"{key} not in the shards")


def _reconciles(summary: IngestReport, out: Path) -> pd.DataFrame:
    metadata = pd.read_parquet(out / "metadata.parquet")
    quarantine = pd.read_parquet(out / "quarantine.parquet")
    assert summary.input_rows == summary.kept + summary.quarantined
    assert summary.kept == len(metadata) == sum(summary.counts.values())
    assert summary.quarantined == len(quarantine)
    kept_rows = metadata["source_row"].tolist() if len(metadata) else []
    assert sorted(kept_rows + quarantine["row"].tolist()) == list(range(summary.input_rows))
    for split, count in summary.counts.items():
        assert sum(json.loads((out / split / "sizes.json").read_text()).values()) == count
    assert not list(out.rglob("*.tmp")) and not (out / ".ingest").exists()
    assert summary.data_version == data_version(out)
    return quarantine


@pytest.mark.parametrize("case", CASES)
def test_each_bad_input_alone(case: str, web: str, params: Params, tmp_path: Path) -> None:
    files, case_row, reason = _cases(web)[case]
    rows = _good_rows(tmp_path, 2)
    _files(tmp_path, files)
    pd.DataFrame([*rows, _row(case_row, case)]).to_csv(tmp_path / "manifest.csv", index=False)

    summary = ingest(str(tmp_path / "manifest.csv"), tmp_path / "out", params.data, params.validate)

    quarantine = _reconciles(summary, tmp_path / "out")
    assert summary.input_rows == 3
    if reason is None:
        assert summary.quarantined == 0
        metadata = pd.read_parquet(tmp_path / "out" / "metadata.parquet").set_index("label")
        image = _stored_image(tmp_path / "out", metadata.loc[case, "key"])
        assert image.mode == "RGB"
        centre = image.getpixel((image.width // 2, image.height // 2))
        assert all(abs(a - b) <= 3 for a, b in zip(centre, CONVERTED[case], strict=True)), centre
    else:
        assert quarantine["row"].tolist() == [2]
        assert quarantine["reason"].str.contains(reason).all(), quarantine["reason"][0]


def test_all_bad_inputs_mixed_in_one_manifest(web: str, params: Params, tmp_path: Path) -> None:
    cases = _cases(web)
    rows = _good_rows(tmp_path, 3)
    for name, (files, case_row, _) in cases.items():
        _files(tmp_path, files)
        rows.append(_row(case_row, name))
    pd.DataFrame(rows).to_json(tmp_path / "manifest.jsonl", orient="records", lines=True)
    with (tmp_path / "manifest.jsonl").open("a") as manifest:
        manifest.write("{not json\n")
    parallel = dataclasses.replace(params.data, workers=2)

    summary = ingest(str(tmp_path / "manifest.jsonl"), tmp_path / "out", parallel, params.validate)

    quarantine = _reconciles(summary, tmp_path / "out").set_index("row")
    expected = {3 + i: reason for i, (_, _, reason) in enumerate(cases.values()) if reason is not None}
    expected[len(rows)] = "line is not valid JSON"
    assert sorted(quarantine.index) == sorted(expected)
    for row, reason in expected.items():
        assert pd.Series([quarantine.loc[row, "reason"]]).str.contains(reason).all(), (row, reason)
    assert summary.input_rows == len(rows) + 1

    # The validate step reports the same split of input rows, and fails on them with one line.
    result = validate(tmp_path / "out", tmp_path / "report", params.validate)
    assert result.input_rows == summary.input_rows and result.kept == summary.kept
    assert result.quarantined == result.quarantined_at_ingest == summary.quarantined
    report = pd.read_parquet(tmp_path / "report" / "quarantine.parquet")
    assert len(report) == summary.quarantined and set(report["stage"]) == {"ingest"}
    with pytest.raises(ClipflowError, match=f"{summary.quarantined} of {summary.input_rows} input rows"):
        check_passed(result, params.validate)


def test_large_images_are_stored_at_the_training_size_and_small_ones_as_they_are(params: Params, tmp_path: Path):
    side = params.data.image_size
    sizes = {"large": (3 * side + 7, 2 * side + 5), "small": (side // 2, side // 3)}
    _files(tmp_path, {f"{name}.png": bad_inputs.rgb_png((200, 40, 40), size=size) for name, size in sizes.items()})
    rows = [{"image": f"{name}.png", "caption": f"a {name} red picture"} for name in sizes]
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    out = tmp_path / "out"
    _reconciles(ingest(str(tmp_path / "manifest.csv"), out, params.data, params.validate), out)
    metadata = pd.read_parquet(out / "metadata.parquet").set_index("caption")
    large = _stored_image(out, metadata.loc["a large red picture", "key"]).size
    assert min(large) == side and large[0] / large[1] == pytest.approx(sizes["large"][0] / sizes["large"][1], rel=0.01)
    assert _stored_image(out, metadata.loc["a small red picture", "key"]).size == sizes["small"]  # never upscaled


def test_manifest_without_caption_column_is_one_clear_error(params: Params, tmp_path: Path) -> None:
    rows = _good_rows(tmp_path, 2)
    pd.DataFrame(rows).rename(columns={"caption": "text"}).to_parquet(tmp_path / "manifest.parquet")
    with pytest.raises(ClipflowError, match=r"no caption column 'caption' \(data.caption_column\)") as error:
        ingest(str(tmp_path / "manifest.parquet"), tmp_path / "out", params.data, params.validate)
    assert "\n" not in str(error.value) and "text" in str(error.value)
    renamed = dataclasses.replace(params.data, caption_column="text")
    summary = ingest(str(tmp_path / "manifest.parquet"), tmp_path / "out", renamed, params.validate)
    assert summary.kept == 2


def test_split_is_a_function_of_the_key_alone(params: Params, tmp_path: Path) -> None:
    rows = _good_rows(tmp_path, 40)
    pd.DataFrame(rows).to_csv(tmp_path / "all.csv", index=False)
    pd.DataFrame(rows[::-3]).to_csv(tmp_path / "some.csv", index=False)
    halves = dataclasses.replace(params.data, split_fractions={"train": 0.5, "test": 0.5})
    ingest(str(tmp_path / "all.csv"), tmp_path / "a", halves, params.validate)
    ingest(str(tmp_path / "some.csv"), tmp_path / "b", halves, params.validate)
    every = pd.read_parquet(tmp_path / "a" / "metadata.parquet").set_index("label")["split"]
    some = pd.read_parquet(tmp_path / "b" / "metadata.parquet").set_index("label")["split"]
    assert set(every) == {"train", "test"}
    assert (every[some.index] == some).all()


def test_crash_leaves_only_whole_shards_and_a_rerun_resumes(params: Params, tmp_path: Path, monkeypatch) -> None:
    rows = _good_rows(tmp_path, 30)
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    manifest, out = str(tmp_path / "manifest.csv"), tmp_path / "out"
    clean = ingest(manifest, tmp_path / "clean", params.data, params.validate)

    publish = Store.put_file
    published = []

    def crash_in_the_second_chunk(self, local, name):
        if name.endswith(".tar") and "000001" in name:
            raise KeyboardInterrupt("killed")
        published.append(name)
        publish(self, local, name)

    monkeypatch.setattr(Store, "put_file", crash_in_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        ingest(manifest, out, params.data, params.validate)
    monkeypatch.undo()
    # Only published shards are visible, each a whole tar; nothing half-written lies next to them.
    visible = sorted(p.relative_to(out).as_posix() for p in out.glob("*/*.tar"))
    assert visible == sorted(n for n in published if n.endswith(".tar")) and visible
    for shard in visible:
        with tarfile.open(out / shard) as tar:
            assert len(tar.getnames()) % 3 == 0
    hidden = {p for p in out.rglob("*") if any(part.startswith(".") for part in p.relative_to(out).parts)}
    assert {p for p in out.rglob("*") if p.is_file()} - hidden == {out / shard for shard in visible}

    fetched = []
    real_fetch = ingest_module.fetch
    monkeypatch.setattr(ingest_module, "fetch", lambda uri, limits: fetched.append(uri) or real_fetch(uri, limits))
    resumed = ingest(manifest, out, params.data, params.validate)
    assert len(fetched) == len(rows) - params.data.shard_size  # the first chunk was not redone
    assert resumed.data_version == clean.data_version
    _reconciles(resumed, out)


def _tar(path: Path, members: list[tuple[str, bytes | None]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_shards_are_revalidated_and_resplit_and_unsafe_members_quarantined(params: Params, tmp_path: Path) -> None:
    rows = _good_rows(tmp_path, 10)
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    first = ingest(str(tmp_path / "manifest.csv"), tmp_path / "first", params.data, params.validate)
    _tar(
        tmp_path / "first" / "train" / "extra.tar",
        [
            ("../evil.txt", b"escape"),
            ("s1.jpg", bad_inputs.random_bytes()),
            ("s1.txt", b"random bytes"),
            ("s2.png", bad_inputs.rgb_png((5, 5, 250))),
            ("s2.txt", b"a blue square from another shard"),
            ("link.jpg", None),
            ("s3.txt", b"a caption without an image"),
        ],
    )
    summary = ingest(str(tmp_path / "first"), tmp_path / "second", params.data, params.validate)

    quarantine = _reconciles(summary, tmp_path / "second")
    assert summary.kept == first.kept + 1
    reasons = sorted(quarantine["reason"])
    assert any(r.startswith("unsafe member name '../evil.txt'") for r in reasons), reasons
    assert any(r.startswith("member 'link.jpg' is a link") for r in reasons), reasons
    assert any(r.startswith("not an image") for r in reasons), reasons
    assert any(r.startswith("sample has no image member") for r in reasons), reasons
    assert len(quarantine) == 4
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "first" / "evil.txt").exists()
    metadata = pd.read_parquet(tmp_path / "second" / "metadata.parquet")
    assert set(metadata["orig_source"].dropna()) <= {str(tmp_path / r["image"]) for r in rows}


def test_a_bad_source_leaves_the_output_folder_alone(params: Params, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    pd.DataFrame({"image": ["a.png"]}).to_csv(tmp_path / "no-caption.csv", index=False)
    for source in (tmp_path / "absent.csv", tmp_path / "no-caption.csv", tmp_path / "no-shards"):
        with pytest.raises(ClipflowError):
            ingest(str(source), out, params.data, params.validate)
    assert (out / "precious.txt").read_text() == "keep me"


def test_size_cap_applies_to_files_and_downloads_before_decoding(web: str, params: Params, tmp_path: Path) -> None:
    rows = _good_rows(tmp_path, 1)
    big = bad_inputs.rgb_png((220, 20, 20))  # /red.png on the server holds the same bytes
    (tmp_path / "big.png").write_bytes(big)
    rows += [{"image": "big.png", "caption": "a local file"}, {"image": f"{web}/red.png", "caption": "a download"}]
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    capped = dataclasses.replace(params.data, max_image_bytes=len(big) - 1)

    summary = ingest(str(tmp_path / "manifest.csv"), tmp_path / "out", capped, params.validate)

    reasons = _reconciles(summary, tmp_path / "out").set_index("row")["reason"]
    assert reasons[1] == f"file is {len(big)} bytes, more than data.max_image_bytes={len(big) - 1}"
    assert reasons[2] == f"HTTP body is {len(big)} bytes, more than data.max_image_bytes={len(big) - 1}"


def test_all_rows_quarantined_fails_validation_with_one_line(params: Params, tmp_path: Path) -> None:
    pd.DataFrame({"image": ["a.png", "b.png"], "caption": ["no such file", "nor this"]}).to_csv(
        tmp_path / "manifest.csv", index=False
    )
    summary = ingest(str(tmp_path / "manifest.csv"), tmp_path / "out", params.data, params.validate)
    assert summary.kept == 0 and summary.quarantined == summary.input_rows == 2
    _reconciles(summary, tmp_path / "out")
    with pytest.raises(ClipflowError, match=r"^validation failed: all 2 input rows were quarantined at ingest; see "):
        validate(tmp_path / "out", tmp_path / "report", params.validate)


def test_a_killed_ingest_resumes_to_the_same_data(params: Params, tmp_path: Path) -> None:
    """SIGKILL the real CLI mid-run: only whole shards are visible, and a re-run finishes the job."""
    rows = _good_rows(tmp_path, 600)
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    manifest, out = str(tmp_path / "manifest.csv"), tmp_path / "out"
    clean = ingest(manifest, tmp_path / "clean", params.data, params.validate)
    command = [sys.executable, "-m", "clipflow.cli", "ingest", "--source", manifest, "--output", str(out)]
    command += ["--params", str(REPO / "params.yaml"), "--profile", "test"]
    command += ["--set", f"data.shard_size={params.data.shard_size}", "--set", "data.workers=0"]
    command += ["--set", f"data.http_timeout_s={HTTP_TIMEOUT_S}", "--set", "data.http_retries=1"]
    with process_group(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as process:
        deadline = time.monotonic() + 120
        while not (out / ".ingest" / "chunk-000004.json").exists() and process.poll() is None:
            assert time.monotonic() < deadline, "ingest made no progress"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
    assert not (out / "metadata.parquet").exists()  # killed before the end
    for shard in out.glob("*/*.tar"):
        with tarfile.open(shard) as tar:
            assert len(tar.getnames()) % 3 == 0
    assert not list(out.glob("*/.*.tmp"))
    resumed = ingest(manifest, out, params.data, params.validate)
    assert resumed.data_version == clean.data_version
    _reconciles(resumed, out)


def test_manifest_over_http_with_images_next_to_it(params: Params, tmp_path: Path) -> None:
    rows = [{"image": "red.png", "caption": "a red picture"}, {"image": "gone.png", "caption": "a missing picture"}]
    files = {"/data/red.png": bad_inputs.rgb_png((220, 20, 20))}
    files["/data/manifest.jsonl"] = pd.DataFrame(rows).to_json(orient="records", lines=True).encode()
    with bad_inputs.http_server(files, slow_delay_s=0) as url:
        summary = ingest(f"{url}/data/manifest.jsonl", tmp_path / "out", params.data, params.validate)
    quarantine = _reconciles(summary, tmp_path / "out")
    assert summary.kept == 1
    assert quarantine["reason"].tolist() == [f"HTTP 404 from {url}/data/gone.png"]


def test_a_jsonl_manifest_with_a_byte_order_mark_and_an_overlong_line(
    params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "MAX_RECORD_CHARS", 200)
    rows = _good_rows(tmp_path, 2)
    lines = [json.dumps(rows[0]), json.dumps({**rows[1], "caption": "y" * 300}), json.dumps(rows[1]), "{not json"]
    (tmp_path / "manifest.jsonl").write_bytes("\n".join(lines).encode("utf-8-sig"))

    summary = ingest(str(tmp_path / "manifest.jsonl"), tmp_path / "out", params.data, params.validate)

    reasons = _reconciles(summary, tmp_path / "out").set_index("row")["reason"]
    assert summary.kept == 2 and sorted(reasons.index) == [1, 3]
    assert reasons[1] == "row is longer than 200 characters"
    assert reasons[3].startswith("line is not valid JSON")


def test_an_s3_source_that_stalls_is_cut_off_at_the_fetch_timeout(
    web: str, params: Params, tmp_path: Path, monkeypatch
) -> None:
    """An S3 endpoint that answers after 6x data.http_timeout_s: botocore alone would wait 60 s a read."""
    for key, value in {"AWS_ENDPOINT_URL": web, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    rows = [*_good_rows(tmp_path, 2), {"image": "s3://slow/stalled.png", "caption": "an image that never comes"}]
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    summary = ingest(str(tmp_path / "manifest.csv"), tmp_path / "out", params.data, params.validate)
    quarantine = _reconciles(summary, tmp_path / "out")
    assert quarantine["row"].tolist() == [2]
    assert quarantine["reason"][0].startswith("S3 unreachable reading s3://slow/stalled.png: Read timeout")
