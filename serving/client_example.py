"""Call a running clipflow endpoint: classify images of a data split against the dataset's labels.

    python serving/client_example.py --data outputs/kfp/.../ingest-component/data --split test --limit 200

It prints one line per mistake and, at the end, the fraction of images whose top label is
right; `make run` prints the data folder to pass as `--data`. Sends `$CLIPFLOW_API_KEY` as a
Bearer token when it is set. `serving/client.py` shows every endpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
from pathlib import Path

import bentoml
import pandas as pd


def images_of_split(data_dir: Path, split: str, limit: int):
    """Yield (key, PNG bytes) of the first `limit` samples of a split, straight from its shards."""
    sizes = json.loads((data_dir / split / "sizes.json").read_text())
    seen = 0
    for shard in sorted(sizes):
        with tarfile.open(data_dir / split / shard) as tar:
            for member in tar:
                if member.name.endswith((".png", ".jpg", ".jpeg", ".webp")):
                    yield member.name.rsplit(".", 1)[0], tar.extractfile(member).read()
                    seen += 1
                    if seen == limit:
                        return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--data", type=Path, required=True, help="an ingested data folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=200)
    args = parser.parse_args(argv)

    metadata = pd.read_parquet(args.data / "metadata.parquet")
    labels = sorted(metadata["label"].dropna().unique())
    truth = dict(zip(metadata["key"], metadata["label"], strict=True))
    right = total = 0
    token = os.environ.get("CLIPFLOW_API_KEY") or None
    with bentoml.SyncHTTPClient(args.url, token=token, timeout=60) as client, tempfile.TemporaryDirectory() as tmp:
        for key, png in images_of_split(args.data, args.split, args.limit):
            path = Path(tmp) / f"{key}.png"
            path.write_bytes(png)
            ranked = client.classify(image=path, labels=labels)
            top = ranked[0]["label"]
            total += 1
            right += top == truth[key]
            if top != truth[key]:
                print(f"{key}: {top} (p={ranked[0]['probability']:.2f}), truly {truth[key]}", file=sys.stderr)
    result = {"split": args.split, "images": total, "labels": len(labels), "top1": right / max(total, 1)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
