"""Ingest through a real S3 API (SeaweedFS on 127.0.0.1), and DVC push/pull to a local and an S3 remote."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import webdataset as wds
import yaml

from clipflow.artifacts import IngestReport, data_version, dvc_md5, lineage
from clipflow.data.ingest import ingest
from clipflow.data.sources import read_rows
from clipflow.errors import ClipflowError
from clipflow.params import Params
from clipflow.storage import FetchLimits
from tests.support import bad_inputs
from tests.support.servers import BIN, S3Server, seaweedfs

IMAGES = 6


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        client = server.client()
        for bucket in ("images", "shards", "dvc"):
            client.create_bucket(Bucket=bucket)
        yield server


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return s3


@pytest.fixture
def manifest(s3_env: S3Server) -> str:
    """A CSV manifest in the `images` bucket whose images live there too, one key missing."""
    client = s3_env.client()
    rows = []
    for i in range(IMAGES):
        client.put_object(
            Bucket="images", Key=f"pics/{i}.png", Body=bad_inputs.rgb_png((40 * i, 90, 200), (70 + i, 64))
        )
        rows.append({"url": f"s3://images/pics/{i}.png", "text": f"a picture with number {i}", "sku": f"sku-{i}"})
    rows[-1]["url"] = f"pics/{IMAGES - 1}.png"  # relative to the manifest: the same bucket
    rows.append({"url": "s3://images/pics/missing.png", "text": "this key does not exist", "sku": "sku-x"})
    client.put_object(Bucket="images", Key="manifest.csv", Body=pd.DataFrame(rows).to_csv(index=False).encode())
    return "s3://images/manifest.csv"


@pytest.fixture
def params(small_params: Params) -> Params:
    data = dataclasses.replace(small_params.data, image_column="url", caption_column="text", shard_size=4, workers=2)
    return dataclasses.replace(small_params, data=data)


def test_manifest_in_a_bucket_to_shards_in_another(
    manifest: str, s3_env: S3Server, params: Params, tmp_path: Path
) -> None:
    summary = ingest(manifest, "s3://shards/v1", params.data, params.validate)

    assert summary.input_rows == IMAGES + 1 and summary.kept == IMAGES and summary.quarantined == 1
    client = s3_env.client()
    keys = sorted(item["Key"] for item in client.list_objects_v2(Bucket="shards", Prefix="v1/")["Contents"])
    assert not [k for k in keys if "/.ingest" in k or k.endswith(".tmp")]
    assert {"v1/metadata.parquet", "v1/quarantine.parquet", "v1/ingest.json"} <= set(keys)

    def read(key: str) -> bytes:
        return client.get_object(Bucket="shards", Key=key)["Body"].read()

    quarantine = pd.read_parquet(io.BytesIO(read("v1/quarantine.parquet")))
    assert quarantine["reason"].tolist() == ["S3 object not found: s3://images/pics/missing.png"]
    metadata = pd.read_parquet(io.BytesIO(read("v1/metadata.parquet")))
    assert sorted(metadata["sku"]) == [f"sku-{i}" for i in range(IMAGES)]
    assert IngestReport.from_json(read("v1/ingest.json")) == summary
    stored = 0
    for split in summary.counts:
        sizes = json.loads(read(f"v1/{split}/sizes.json"))
        for shard, count in sizes.items():
            local = tmp_path / shard
            local.write_bytes(read(f"v1/{split}/{shard}"))
            samples = list(wds.WebDataset([str(local)], shardshuffle=False))
            assert len(samples) == count
            stored += count
    assert stored == IMAGES


def _dvc(repo: Path, *args: str, env: dict[str, str]) -> str:
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_dvc_push_and_pull_through_a_local_and_an_s3_remote(
    manifest: str, s3_env: S3Server, params: Params, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_CONFIG_GLOBAL": str(tmp_path / "gitconfig")}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    _dvc(repo, "init", "-q", env=env)
    data = repo / "data" / "catalogue"
    summary = ingest(manifest, data, params.data, params.validate)
    version = data_version(data)
    assert summary.data_version == version

    _dvc(repo, "add", "data/catalogue", env=env)
    recorded = yaml.safe_load((repo / "data" / "catalogue.dvc").read_text())["outs"][0]["md5"]
    # The hash a training run logs is the one DVC records, so a model names the data to pull.
    assert lineage(data)["data_dvc_md5"] == dvc_md5(data) == recorded

    _dvc(repo, "remote", "add", "local", str(tmp_path / "remote"), env=env)
    _dvc(repo, "remote", "add", "s3", "s3://dvc/store", env=env)
    _dvc(repo, "remote", "modify", "s3", "endpointurl", s3_env.endpoint, env=env)
    for remote in ("local", "s3"):
        _dvc(repo, "push", "-r", remote, env=env)
        shutil.rmtree(data)
        shutil.rmtree(repo / ".dvc" / "cache")
        _dvc(repo, "pull", "-r", remote, env=env)
        assert data_version(data) == version and dvc_md5(data) == recorded, remote
    stored = s3_env.client().list_objects_v2(Bucket="dvc", Prefix="store/")
    assert stored["KeyCount"] >= len(list(data.rglob("*.tar")))


def test_shards_under_an_s3_prefix_are_reingested(
    manifest: str, s3_env: S3Server, params: Params, tmp_path: Path
) -> None:
    first = ingest(manifest, "s3://shards/v2", params.data, params.validate)
    again = ingest("s3://shards/v2/", tmp_path / "again", params.data, params.validate)
    assert again.input_rows == again.kept == first.kept
    metadata = pd.read_parquet(tmp_path / "again" / "metadata.parquet")
    assert set(metadata["orig_source"]) == {f"s3://images/pics/{i}.png" for i in range(IMAGES)}
    assert set(metadata["orig_sku"]) == {f"sku-{i}" for i in range(IMAGES)}


def test_an_s3_manifest_past_its_cap_or_missing_is_one_clear_error(
    manifest: str, s3_env: S3Server, params: Params, tmp_path: Path
) -> None:
    size = s3_env.client().head_object(Bucket="images", Key="manifest.csv")["ContentLength"]
    limits = FetchLimits(params.data.max_image_bytes, params.data.http_timeout_s, params.data.http_retries)
    expected = (
        f"cannot read manifest {manifest}: S3 object is {size} bytes, more than data.max_manifest_bytes={size - 1}$"
    )
    with pytest.raises(ClipflowError, match=expected):
        next(read_rows(manifest, "url", "text", limits, max_manifest_bytes=size - 1))
    assert next(read_rows(manifest, "url", "text", limits, max_manifest_bytes=size)).row == 0

    absent = "s3://images/absent.csv"
    with pytest.raises(ClipflowError, match=f"^cannot read manifest {absent}: S3 object not found: {absent}$"):
        ingest(absent, tmp_path / "out", params.data, params.validate)


def test_an_s3_image_past_the_cap_is_quarantined_unread(
    manifest: str, s3_env: S3Server, params: Params, tmp_path: Path
) -> None:
    client = s3_env.client()
    sizes = [client.head_object(Bucket="images", Key=f"pics/{i}.png")["ContentLength"] for i in range(IMAGES)]
    cap = max(sizes) - 1
    summary = ingest(manifest, tmp_path / "out", dataclasses.replace(params.data, max_image_bytes=cap), params.validate)
    reasons = pd.read_parquet(tmp_path / "out" / "quarantine.parquet")["reason"].tolist()
    too_large = [f"S3 object is {size} bytes, more than data.max_image_bytes={cap}" for size in sizes if size > cap]
    assert sorted(reasons) == sorted([*too_large, "S3 object not found: s3://images/pics/missing.png"])
    assert summary.kept == sum(size <= cap for size in sizes)
