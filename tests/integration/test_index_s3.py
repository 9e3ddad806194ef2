"""`clipflow index --output s3://bucket/prefix`, as the pods of the reindex pipeline write it: a real SeaweedFS S3
server on 127.0.0.1, real subprocesses of the CLI, a real CLIP-Tiny checkpoint, and Milvus Lite to publish into.

The artifact under the prefix must be the one a local run writes (the same objects, the same embeddings), a re-run
must skip every finished part, and `publish` must read it from S3 into a collection of every row.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.support import REPO
from tests.support.servers import S3Server, seaweedfs

CLIPFLOW = Path(sys.executable).parent / "clipflow"
PARAMS = ["--params", str(REPO / "params.yaml"), "--profile", "test"]
BUCKET = "catalogue"
PREFIX = "embeddings/v1"
OUTPUT = f"s3://{BUCKET}/{PREFIX}"
# The test split only (200 rows) in shards of 100: two parts, one per embedding process.
SETTINGS = ["--set", "index.split=test", "--set", "index.workers=2"]
PART_DIRS = ("img_emb", "text_emb", "metadata", "quarantine")


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> S3Server:
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        server.client().create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from clipflow import model as clip_model

    return clip_model.save_checkpoint(
        tmp_path_factory.mktemp("model"), clip_model.create("CLIP-Tiny").model, "CLIP-Tiny", extra={}
    )


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, small_params) -> Path:
    from clipflow.data.ingest import ingest

    folder = tmp_path_factory.mktemp("data") / "builtin"
    ingest("builtin", folder, dataclasses.replace(small_params.data, shard_size=100))
    return folder


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return s3


def clipflow_index(s3: S3Server, *args: str) -> dict:
    result = subprocess.run(
        [str(CLIPFLOW), "index", *PARAMS, "--no-store", *SETTINGS, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **s3.env},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def objects(s3: S3Server) -> dict[str, object]:
    """Every object under the prefix, by name relative to it, with its LastModified."""
    listing = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/")
    return {item["Key"].removeprefix(f"{PREFIX}/"): item["LastModified"] for item in listing.get("Contents", [])}


def part_objects(names) -> dict:
    return {name: modified for name, modified in names.items() if name.split("/")[0] in PART_DIRS}


def test_an_s3_artifact_is_the_local_one_resumes_per_part_and_publishes(
    s3_env: S3Server, ingested: Path, checkpoint: Path, small_params, tmp_path: Path
) -> None:
    from clipflow.index import artifact, store
    from clipflow.index.embed import embed_catalogue
    from clipflow.vectors import Collection, open_client

    command = ["--source", str(ingested), "--model", str(checkpoint), "--output", OUTPUT]
    report = clipflow_index(s3_env, *command)
    assert report["rows"] == report["input_rows"] == 200 and report["quarantined"] == 0
    assert report["parts"] == 2 and report["artifact"] == OUTPUT

    first = objects(s3_env)
    parts = [artifact.part_name(number) for number in range(2)]
    expected = {name for number in range(2) for name in artifact.part_files(number).values()}
    assert set(first) == expected | {"index.json", ".index-run.json"}  # no temporary object anywhere

    # The same artifact as a local run of the same: clip-retrieval's readers get the same rows and vectors.
    local = tmp_path / "local"
    embed_catalogue(str(ingested), str(checkpoint), str(local), dataclasses.replace(
        small_params, index=dataclasses.replace(small_params.index, split="test", workers=1)
    ))  # fmt: skip
    client = s3_env.client()

    def read(name: str) -> bytes:
        return client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}")["Body"].read()

    for name in sorted(expected):
        if name.endswith(".npy"):
            from_s3 = np.load(io.BytesIO(read(name)), allow_pickle=False)
            assert from_s3.dtype == np.float16
            np.testing.assert_allclose(from_s3.astype(np.float32), np.load(local / name), atol=2e-3)
        elif name.startswith("metadata/"):
            pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(read(name))), pd.read_parquet(local / name))
    manifest = json.loads(read("index.json"))
    assert {key: manifest[key] for key in ("rows", "parts", "data_version", "model_version")} == {
        key: report[key] for key in ("rows", "parts", "data_version", "model_version")
    }

    # A re-run skips every part: a rewrite would land in a later second of LastModified.
    time.sleep(1.1)
    assert clipflow_index(s3_env, *command)["rows"] == 200
    assert part_objects(objects(s3_env)) == part_objects(first)

    # A part whose upload stopped before its metadata object is not finished: only it is embedded again.
    client.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/metadata/metadata_{parts[1]}.parquet")
    assert clipflow_index(s3_env, *command)["rows"] == 200
    resumed = part_objects(objects(s3_env))
    assert set(resumed) == set(part_objects(first))
    rewritten = {name for name in resumed if resumed[name] != first[name]}
    assert rewritten == {name for name in resumed if parts[1] in name}

    # publish reads the artifact from S3, one part at a time, into a collection of every row.
    params = dataclasses.replace(small_params.index, uri=str(tmp_path / "milvus.db"), index_type="FLAT")
    published = store.publish(OUTPUT, params)
    client_of_store = open_client(params.uri)
    try:
        collection = Collection(client_of_store, published["collection"], params)
        assert collection.count() == manifest["rows"] == 200
        query = np.load(io.BytesIO(read(f"img_emb/img_emb_{parts[1]}.npy")), allow_pickle=False)[:1]
        key = pd.read_parquet(io.BytesIO(read(f"metadata/metadata_{parts[1]}.parquet")))["key"][0]
        assert collection.search(query.astype(np.float32), 1)[0][0].key == key
    finally:
        client_of_store.close()


def test_an_unusable_output_is_one_clear_error(s3_env: S3Server, ingested: Path, checkpoint: Path, small_params):
    from clipflow.errors import ClipflowError
    from clipflow.index.embed import embed_catalogue
    from clipflow.index.store import publish

    with pytest.raises(ClipflowError, match="NoSuchBucket"):
        embed_catalogue(str(ingested), str(checkpoint), "s3://no-such-bucket/embeddings", small_params)
    with pytest.raises(ClipflowError, match="local folder or an s3:// prefix"):
        embed_catalogue(str(ingested), str(checkpoint), "gs://bucket/embeddings", small_params)
    with pytest.raises(ClipflowError, match="not a finished embedding artifact"):
        publish(f"s3://{BUCKET}/nothing-here", small_params.index)
