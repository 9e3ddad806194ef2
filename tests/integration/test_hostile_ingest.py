"""Hostile ingest through the real CLI: a source that never ends, never answers or lies about its size
ends in a quarantine row with its reason or in one clear line, while the step's memory stays bounded."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest

from clipflow.data.sources import MAX_RECORD_CHARS
from clipflow.storage import FetchLimits
from tests.support import REPO, bad_inputs

HANG_GUARD_S = 120  # far beyond any bounded run: reaching it means the step hangs
MAX_RSS = 1536 << 20  # the whole process tree; /dev/zero alone grew past 3 GB in seconds
MAX_IMAGE_BYTES = 1_000_000
MAX_MANIFEST_BYTES = 1_000_000
TRICKLE_GAP_S = 2.0
# Each read waits longer than the trickle's gap, so only the deadline of the whole fetch can end it.
TIMEOUT_S, RETRIES = 3.0, 1


@dataclass(frozen=True)
class Run:
    returncode: int
    stderr: str
    peak_rss: int


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker that has just ended
            total += member.memory_info().rss
    return total


def _ingest(
    source: str | Path, out: Path, timeout_s: float = TIMEOUT_S, retries: int = RETRIES, env: dict | None = None
) -> Run:
    """`clipflow ingest` in a subprocess, its process tree's RSS polled; killed on a hang or past MAX_RSS."""
    command = [sys.executable, "-m", "clipflow.cli", "ingest", "--source", str(source), "--output", str(out)]
    command += ["--params", str(REPO / "params.yaml"), "--profile", "test"]
    for setting in (
        f"data.http_timeout_s={timeout_s}",
        f"data.http_retries={retries}",
        f"data.max_image_bytes={MAX_IMAGE_BYTES}",
        f"data.max_manifest_bytes={MAX_MANIFEST_BYTES}",
    ):
        command += ["--set", setting]
    with tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, **(env or {})}, start_new_session=True
        )
        process = psutil.Process(child.pid)
        guard = time.monotonic() + HANG_GUARD_S
        peak, problem = 0, None
        try:
            while child.poll() is None and problem is None:
                try:
                    peak = max(peak, _tree_rss(process))
                except psutil.NoSuchProcess:
                    break
                if peak > MAX_RSS:
                    problem = f"RSS reached {peak >> 20} MB"
                elif time.monotonic() > guard:
                    problem = f"still running after {HANG_GUARD_S} s"
                time.sleep(0.05)
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        stderr.seek(0)
        text = stderr.read().decode(errors="replace")
    assert problem is None, f"ingest of {source}: {problem}\n{text[-2000:]}"
    return Run(child.returncode, text, peak)


def _manifest(folder: Path, hostile: str) -> Path:
    """A good row, then the hostile one."""
    (folder / "good.png").write_bytes(bad_inputs.rgb_png((220, 20, 20)))
    path = folder / "manifest.csv"
    pd.DataFrame({"image": ["good.png", hostile], "caption": ["a good red picture", "the hostile row"]}).to_csv(
        path, index=False
    )
    return path


def _quarantined(run: Run, out: Path) -> dict[int, str]:
    """The quarantine reasons by row, after checking that the step ended well and its counts reconcile."""
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    report = json.loads((out / "ingest.json").read_text())
    quarantine = pd.read_parquet(out / "quarantine.parquet")
    metadata = pd.read_parquet(out / "metadata.parquet")
    assert report["input_rows"] == report["kept"] + report["quarantined"]
    assert (report["kept"], report["quarantined"]) == (len(metadata), len(quarantine))
    assert sorted([*metadata["source_row"], *quarantine["row"]]) == list(range(report["input_rows"]))
    return dict(zip(quarantine["row"], quarantine["reason"], strict=True))


def _one_clear_line(run: Run) -> str:
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("clipflow: error:")]
    assert len(errors) == 1, run.stderr[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def hostile():
    image = bad_inputs.rgb_png((20, 20, 220))
    with bad_inputs.hostile_http_server(image, gap_s=TRICKLE_GAP_S, shard=_shard(SHARD_SAMPLES)) as url:
        yield url


SHARD_SAMPLES = 8


def _shard(samples: int) -> bytes:
    """A WebDataset tar of `samples` distinct pictures with captions."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(samples):
            for ext, payload in (("png", bad_inputs.rgb_png((i * 30, 90, 40))), ("txt", f"picture {i}".encode())):
                info = tarfile.TarInfo(f"sample-{i:03d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def test_a_device_row_is_quarantined_unread(tmp_path: Path) -> None:
    run = _ingest(_manifest(tmp_path, "/dev/zero"), tmp_path / "out")
    assert _quarantined(run, tmp_path / "out") == {1: "not a regular file (a character device): /dev/zero"}


def test_a_named_pipe_row_is_quarantined_without_waiting_for_a_writer(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    run = _ingest(_manifest(tmp_path, "pipe.png"), tmp_path / "out")
    assert _quarantined(run, tmp_path / "out") == {1: f"not a regular file (a named pipe): {tmp_path / 'pipe.png'}"}


def test_a_trickling_download_is_cut_off_at_the_deadline_of_the_fetch(hostile: str, tmp_path: Path) -> None:
    run = _ingest(_manifest(tmp_path, f"{hostile}/trickle.png"), tmp_path / "out")
    deadline = FetchLimits(MAX_IMAGE_BYTES, TIMEOUT_S, RETRIES).deadline_s
    reasons = _quarantined(run, tmp_path / "out")
    assert reasons == {1: f"HTTP body not complete after {deadline:g} s (the deadline of one fetch)"}


def test_an_endless_download_stops_one_chunk_past_the_cap(hostile: str, tmp_path: Path) -> None:
    run = _ingest(_manifest(tmp_path, f"{hostile}/endless.png"), tmp_path / "out")
    assert _quarantined(run, tmp_path / "out") == {1: f"HTTP body exceeds data.max_image_bytes={MAX_IMAGE_BYTES}"}


def test_an_endless_remote_manifest_stops_at_its_own_cap_in_one_line(hostile: str, tmp_path: Path) -> None:
    run = _ingest(f"{hostile}/endless.csv", tmp_path / "out")
    line = _one_clear_line(run)
    cap = f"data.max_manifest_bytes={MAX_MANIFEST_BYTES}"
    assert line == f"clipflow: error: cannot read manifest {hostile}/endless.csv: HTTP body exceeds {cap}", line
    assert not (tmp_path / "out" / "ingest.json").exists()


def test_a_manifest_that_is_a_named_pipe_is_one_clear_line(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "manifest.csv")
    line = _one_clear_line(_ingest(tmp_path / "manifest.csv", tmp_path / "out"))
    assert line == f"clipflow: error: manifest is not a regular file: {tmp_path / 'manifest.csv'}"


def test_a_named_pipe_among_shards_is_quarantined(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "a.tar", "w") as tar:
        for name, payload in (("s.png", bad_inputs.rgb_png((5, 5, 250))), ("s.txt", b"a blue square")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    os.mkfifo(tmp_path / "shards" / "b.tar")
    run = _ingest(tmp_path / "shards", tmp_path / "out")
    pipe = tmp_path / "shards" / "b.tar"
    assert _quarantined(run, tmp_path / "out") == {1: f"unreadable tar: not a regular file (a named pipe): {pipe}"}


def test_a_csv_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    (tmp_path / "good.png").write_bytes(bad_inputs.rgb_png((220, 20, 20)))
    (tmp_path / "excel.csv").write_bytes("image,caption\r\ngood.png,a good red picture\r\n".encode("utf-8-sig"))
    run = _ingest(tmp_path / "excel.csv", tmp_path / "out")
    assert _quarantined(run, tmp_path / "out") == {}
    metadata = pd.read_parquet(tmp_path / "out" / "metadata.parquet")
    assert metadata["caption"].tolist() == ["a good red picture"]


def test_a_200_mb_field_is_a_quarantine_row_and_the_rows_after_it_are_read(tmp_path: Path) -> None:
    (tmp_path / "good.png").write_bytes(bad_inputs.rgb_png((220, 20, 20)))
    (tmp_path / "other.png").write_bytes(bad_inputs.rgb_png((20, 220, 20)))
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w") as handle:
        handle.write('image,caption\ngood.png,a good red picture\nother.png,"')
        for _ in range(200):
            handle.write("x" * (1 << 20))
        handle.write('"\nother.png,a good green picture\n')
    run = _ingest(manifest, tmp_path / "out")
    assert _quarantined(run, tmp_path / "out") == {1: f"row is longer than {MAX_RECORD_CHARS} characters"}
    metadata = pd.read_parquet(tmp_path / "out" / "metadata.parquet")
    assert sorted(metadata["caption"]) == ["a good green picture", "a good red picture"]


def test_a_manifest_cap_that_is_not_positive_is_one_clear_line(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "clipflow.cli", "ingest", "--source", "x.csv", "--output", str(tmp_path / "out")]
    command += ["--params", str(REPO / "params.yaml"), "--set", "data.max_manifest_bytes=0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "clipflow: error: data.max_manifest_bytes must be positive, got 0"


def test_an_s3_shard_whose_connection_drops_keeps_what_arrived_and_quarantines_the_rest(hostile, tmp_path):
    """The endpoint promises the whole tar and sends half: the samples before the cut are kept, the shard's
    remainder is one quarantine row with the reason, and the step ends well."""
    s3 = {"AWS_ENDPOINT_URL": hostile, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    s3["AWS_DEFAULT_REGION"] = "us-east-1"
    run = _ingest(f"s3:/{bad_inputs.DROPPED_SHARD}", tmp_path / "out", env=s3)
    reasons = _quarantined(run, tmp_path / "out")
    kept = len(pd.read_parquet(tmp_path / "out" / "metadata.parquet"))
    assert 0 < kept < SHARD_SAMPLES
    [reason] = reasons.values()
    assert reason.startswith(f"unreadable tar: S3 unreachable reading s3:/{bad_inputs.DROPPED_SHARD}: "), reason
