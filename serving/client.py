"""Call every endpoint of a running clipflow Bento with `bentoml.SyncHTTPClient`.

    python serving/client.py --url http://127.0.0.1:3000 --image a.png --image b.png

Sends `Authorization: Bearer $CLIPFLOW_API_KEY` when that variable is set. Prints one JSON object:
what each endpoint answered, shortened (embeddings by their shape).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path

import bentoml
from bentoml.exceptions import NotFound

TEXTS = ["a red circle", "two blue squares", "a green star on the left"]
LABELS = ["red circle", "blue square", "green star"]


def call_every_endpoint(client: bentoml.SyncHTTPClient, images: list[Path]) -> dict:
    """One call to each endpoint; returns the answers, embeddings reduced to their shape."""

    def shape(rows: list[list[float]]) -> list[int]:
        return [len(rows), len(rows[0])]

    encoded = [base64.b64encode(path.read_bytes()).decode() for path in images]
    answers = {
        "encode_text": shape(client.encode_text(texts=TEXTS)),
        "encode_image": shape(client.encode_image(images=images)),
        "encode_image_base64": shape(client.encode_image_base64(images=encoded)),
        "classify": client.classify(image=images[0], labels=LABELS),
        "classify_templates": client.classify(image=images[0], labels=LABELS, templates=["a drawing of a {}."]),
        # For each text, every image by its index in `candidates`, most probable first.
        "rank": client.rank(queries=TEXTS[:2], candidates=images),
        # For each image, every text by its index in `candidates`.
        "rank_texts": client.rank_texts(queries=images, candidates=TEXTS),
    }
    try:
        answers["search"] = client.search(text=TEXTS[0], k=3)
        answers["search_image"] = client.search_image(image=images[0], k=3)
    except NotFound as exc:  # a Bento packaged without --gallery
        answers["search"] = answers["search_image"] = str(exc)
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--image", type=Path, action="append", required=True, help="an image file (repeatable)")
    args = parser.parse_args(argv)

    # SyncHTTPClient sends `token` as a Bearer token (it falls back to $BENTO_CLOUD_API_KEY).
    token = os.environ.get("CLIPFLOW_API_KEY") or None
    with bentoml.SyncHTTPClient(args.url, token=token, timeout=60) as client:
        print(json.dumps(call_every_endpoint(client, args.image), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
