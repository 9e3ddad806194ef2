"""Curation with a CLIP model at ingest: DataComp's CLIP-score filter, and near-duplicate images.

Ingest hands every chunk's rows that passed the per-row checks to a `Curator` before writing them,
so a curated row never reaches a shard and lands in the same `quarantine.parquet` as every other
rejected row (validate's report counts it; input rows = kept + quarantined still holds):

    validate.clip_score_min         a pair whose image-caption cosine under validate.clip_score_model is lower
                                    is quarantined with its score ("clip score too low: 0.113 < ...")
    validate.near_duplicate_cosine  an image at least this close to one already kept is quarantined as a
                                    duplicate of that key ("near-duplicate image: repeats KEY (cosine ...)")

Rows are judged in input order, so the first occurrence of an image is the one kept, whatever the
chunk size. Near-duplicates are found through the index code (`clipflow.vectors`): the kept
images go into a collection of a Milvus Lite folder private to the ingest run, searched with k=1 for
each new block of images; within a block, earlier rows are compared in memory. The index is FLAT:
exact, so the verdicts do not depend on an approximate graph's insertion order, and a duplicate is
never missed for lack of recall.

A resumed ingest skips committed chunks without embedding them again: each chunk's kept embeddings
are staged beside its record (`.ingest/curated-N.npz`, written before the chunk commits) and put back
into the collection, so a duplicate of an image kept before the crash is still found.

The built-in dataset is not curated: its captions are generated from the scene they describe, so a
score filter could only reject rows by the model's mistakes, and its renders are distinct by design.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipflow.artifacts import sha256_file
from clipflow.data.chunks import STAGING
from clipflow.params import IndexParams, TrackingParams, ValidateParams
from clipflow.storage import Store

if TYPE_CHECKING:
    from clipflow.model import ClipModel

SCORE_REASON = "clip score too low"
DUPLICATE_REASON = "near-duplicate image"
# Images per model call, and per search of the collection: bounds the memory of a chunk's embedding
# (a chunk is data.shard_size rows, thousands of images at the model's side).
BATCH_SIZE = 128
COLLECTION = "kept_images"
DUPLICATES_FOLDER = "near-duplicates.db"  # Milvus Lite's folder must end in .db


@dataclass(frozen=True)
class Pair:
    """A row that passed the per-row checks, as the curator judges it."""

    key: str
    image: bytes  # the checked image as ingest stores it (JPEG)
    caption: str


@dataclass(frozen=True)
class CurationModel:
    """The model named by `validate.clip_score_model`, loaded once per ingest, and what identifies it."""

    reference: str
    checkpoint_sha256: str  # the weights themselves: models:/NAME@ALIAS may name another version tomorrow
    clip: ClipModel
    device: str

    def settings(self, checks: ValidateParams) -> dict[str, Any]:
        """What the ingest report and a resumed run's fingerprint record of the curation."""
        return {
            "model": self.reference,
            "checkpoint_sha256": self.checkpoint_sha256,
            "clip_score_min": checks.clip_score_min,
            "near_duplicate_cosine": checks.near_duplicate_cosine,
        }


def load_curation_model(checks: ValidateParams, tracking: TrackingParams | None) -> CurationModel | None:
    """The curation model of `checks`, or None when ingest does not curate (`ValidateParams.curates`).

    Args:
        checks: the validate section; `clip_score_model` is a checkpoint path or an MLflow model URI.
        tracking: where a `models:/` reference is looked up (None: MLflow's current tracking URI).

    Raises:
        ClipflowError: the reference names no loadable model (one line, before any row is read).
    """
    if not checks.curates:
        return None
    import torch

    from clipflow.registry.models import is_model_uri, load_model, local_checkpoint

    reference = str(checks.clip_score_model)
    if is_model_uri(reference) and tracking is not None:
        from clipflow import tracking as clip_tracking

        clip_tracking.setup(tracking)
    checkpoint = local_checkpoint(reference)
    clip = load_model(checkpoint)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clip.model.to(device)
    return CurationModel(reference, sha256_file(checkpoint), clip, device)


class Curator:
    """Judges one ingest's chunks in order: `curate` for a chunk to write, `resume` for a committed one.

    A context manager: the near-duplicate collection lives in a Milvus Lite folder under `scratch`
    while it is open.
    """

    def __init__(self, model: CurationModel, checks: ValidateParams, store: Store, scratch: Path):
        self.model, self.checks, self.store = model, checks, store
        self.folder = scratch / DUPLICATES_FOLDER
        self.chunks = 0
        self.client = None
        self.collection = None
        self.dim = 0

    def __enter__(self) -> Curator:
        if self.checks.near_duplicate_cosine is not None:
            from clipflow.vectors import Collection, open_client

            # A crashed run's folder holds images of chunks that were never committed.
            shutil.rmtree(self.folder, ignore_errors=True)
            self.client = open_client(str(self.folder))
            self.dim = int(self.model.clip.encode_text(["a"]).shape[1])
            self.collection = Collection.create(self.client, COLLECTION, self.dim, _exact_index())
        return self

    def __exit__(self, *exc) -> None:
        if self.client is not None:
            self.client.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def resume(self) -> None:
        """Take the next chunk as committed by an earlier run: its kept images become known duplicates' originals."""
        number = self._next()
        if self.collection is None:
            return
        with np.load(io.BytesIO(self.store.get_bytes(_staged_name(number))), allow_pickle=False) as staged:
            keys, vectors = staged["keys"].tolist(), staged["vectors"]
        self._insert(keys, vectors)

    def curate(self, pairs: list[Pair]) -> list[str | None]:
        """Judge the next chunk's checked pairs, in order: the quarantine reason of each, or None to keep it.

        The kept ones become originals that later pairs (of this chunk and the next) are duplicates of.
        """
        number = self._next()
        verdicts: list[str | None] = []
        kept_keys: list[str] = []
        kept_vectors: list[np.ndarray] = []
        for first in range(0, len(pairs), BATCH_SIZE):
            batch = pairs[first : first + BATCH_SIZE]
            images, scores = self._embed(batch)
            judged = [self._score_reason(score) for score in scores]
            if self.collection is not None:
                judged = self._near_duplicates(batch, images, judged)
                keep = [i for i, reason in enumerate(judged) if reason is None]
                self._insert([batch[i].key for i in keep], images[keep])
                kept_keys += [batch[i].key for i in keep]
                kept_vectors.append(images[keep])
            verdicts += judged
        if self.collection is not None:
            vectors = np.concatenate(kept_vectors) if kept_vectors else np.zeros((0, self.dim), np.float32)
            buffer = io.BytesIO()
            np.savez(buffer, keys=np.array(kept_keys, dtype=str), vectors=vectors)
            self.store.put_bytes(buffer.getvalue(), _staged_name(number))
        return verdicts

    def _next(self) -> int:
        self.chunks += 1
        return self.chunks - 1

    def _embed(self, batch: list[Pair]) -> tuple[np.ndarray, np.ndarray]:
        """The batch's image embeddings (B, D) and image-caption cosines (B,), through the model's eval preprocess."""
        import torch
        from PIL import Image

        clip = self.model.clip
        pixels = torch.stack([clip.preprocess(Image.open(io.BytesIO(pair.image)).convert("RGB")) for pair in batch])
        images = clip.encode_images(pixels.to(self.model.device))
        texts = clip.encode_text([pair.caption for pair in batch])
        return images.cpu().numpy(), (images * texts).sum(dim=1).cpu().numpy()

    def _score_reason(self, score: float) -> str | None:
        floor = self.checks.clip_score_min
        if floor is None or score >= floor:
            return None
        return f"{SCORE_REASON}: {score:.3f} < validate.clip_score_min {floor:g} under {self.model.reference}"

    def _near_duplicates(self, batch: list[Pair], images: np.ndarray, judged: list[str | None]) -> list[str | None]:
        """`judged` with each scored-and-kept image that repeats an earlier kept one quarantined as its duplicate.

        Earlier chunks and blocks are searched in the collection; earlier rows of this block in memory. The
        closest original is named; on a tie the earlier one (the collection's, then the lower row).
        """
        threshold = self.checks.near_duplicate_cosine
        candidates = [i for i, reason in enumerate(judged) if reason is None]
        found = self.collection.search(images[candidates], k=1) if candidates else []
        nearest = {
            i: (hits[0].key, hits[0].score) if hits else (None, -np.inf)
            for i, hits in zip(candidates, found, strict=True)
        }
        within = images @ images.T  # (B, B)
        result = list(judged)
        kept: list[int] = []
        for i in candidates:
            key, cosine = nearest[i]
            if kept:
                j = kept[int(np.argmax(within[i, kept]))]
                if within[i, j] > cosine:
                    key, cosine = batch[j].key, float(within[i, j])
            if cosine >= threshold:
                limit = f"validate.near_duplicate_cosine {threshold:g}"
                result[i] = f"{DUPLICATE_REASON}: repeats {key} (cosine {cosine:.4f} >= {limit})"
            else:
                kept.append(i)
        return result

    def _insert(self, keys: list[str], vectors: np.ndarray) -> None:
        if keys:
            self.collection.insert(keys, vectors, [{} for _ in keys])


def _exact_index() -> IndexParams:
    """The settings `Collection` reads for an exact (FLAT) index; the others describe a catalogue, unused here."""
    return IndexParams(
        uri="",
        alias=COLLECTION,
        keep_collections=0,
        batch_size=BATCH_SIZE,
        workers=1,
        threads_per_worker=1,
        part_size=BATCH_SIZE,
        split=None,
        artifact_root="",
        text=False,
        index_type="FLAT",
        build_params={},
        search_params={},
        exact_filter_rows=0,
        insert_batch=BATCH_SIZE,
        search_batch_max=1,
    )


def _staged_name(number: int) -> str:
    return f"{STAGING}/curated-{number:06d}.npz"
