"""The training input path against open_clip_train's own webdataset pipeline, samples/s per CPU core.

    python benchmarks/bench_data.py [--images 4000] [--batches 8] [--work /tmp/clipflow-bench-data]

Both sides read the same WebDataset shards, written by `clipflow ingest` from a manifest of
photo-like JPEGs at 640 x 512 (stored at 512 px on the short side, JPEG q95, as img2dataset
writes them), and turn them into ViT-B-32 batches of 256: decode, random resized crop to 224 px,
to float and normalise, tokenise the captions, collate. Each case runs in its own process pinned
to one core with one torch thread and no data-loader workers, so its rate is per core.

- clipflow: `RankBatches` (`train.decode: cpu`) then `TrainAugment.normalize`, as the loop runs them.
- open_clip: `open_clip_train.data.get_wds_dataset` with the model's own `preprocess_train` and
  tokenizer, as `open_clip_train.main --dataset-type webdataset` builds it.

The first batch of each is a warm-up (open_clip fills its shuffle buffer of encoded samples).
Writes `results/bench_data.json`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from common import case, run_child, write_results

REPO = Path(__file__).resolve().parents[1]
MODEL = "ViT-B-32"
BATCH = 256
SOURCE_SIZE = (640, 512)


def _render(job: tuple[str, int, int]) -> None:
    import numpy as np
    from PIL import Image, ImageFilter

    folder, start, stop = job
    for index in range(start, stop):
        path = Path(folder) / f"{index:06d}.jpg"
        if path.exists():
            continue
        rng = np.random.default_rng(index)
        width, height = SOURCE_SIZE
        colours = Image.fromarray((rng.random((8, 10, 3)) * 255).astype(np.uint8)).resize(
            (width, height), Image.BICUBIC
        )
        texture = np.asarray(colours).astype(np.int16) + rng.normal(0, 12, (height, width, 3)).astype(np.int16)
        photo = Image.fromarray(texture.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))
        photo.save(path, format="JPEG", quality=90)


def prepare(work: Path, count: int) -> Path:
    """The ingested data folder of `count` rendered photos (reused when it is there)."""
    import pandas as pd

    from clipflow.data.ingest import ingest
    from clipflow.params import load_params

    data = work / f"data-{count}"
    if (data / "train").is_dir():
        return data
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    step = 500
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        pool.map(_render, [(str(images), s, min(s + step, count)) for s in range(0, count, step)])
    manifest = work / f"manifest-{count}.csv"
    rows = [
        {"image": str(images / f"{i:06d}.jpg"), "caption": f"a photo of scene {i} on a table"} for i in range(count)
    ]
    pd.DataFrame(rows).to_csv(manifest, index=False)
    overrides = ["data.image_size=512", "data.shard_size=1000", "data.split_fractions={train: 1.0}"]
    params = load_params(REPO / "params.yaml", overrides)
    ingest(str(manifest), data, params.data, params.validate)
    return data


def _pin_to_one_core() -> None:
    import torch

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)


def _time_batches(batches, count: int) -> dict:
    iterator = iter(batches)
    next(iterator)  # warm-up
    start, cpu_start, samples = time.perf_counter(), time.process_time(), 0
    for _ in range(count):
        images, tokens = next(iterator)
        samples += len(images)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "samples": samples,
        "wall_s": round(wall, 2),
        "samples_per_s": round(samples / wall, 1),
        "samples_per_cpu_s": round(samples / cpu, 1),
        "image_shape": list(images.shape),
        "dtype": str(images.dtype),
    }


def run_clipflow(data: Path, batches: int) -> dict:
    from clipflow import model as clip_model
    from clipflow.data.pairs import ShardPairs
    from clipflow.train.data import RankBatches, TrainAugment

    _pin_to_one_core()
    clip = clip_model.create(MODEL)
    augment = TrainAugment(clip.preprocess_train)
    pairs = ShardPairs(data, "train", clip.preprocess_train, clip.tokenizer)
    dataset = RankBatches(pairs, augment, BATCH, 0, 0, 1, 0, batches + 1)
    normalised = ((augment.normalize(images), tokens) for images, tokens in dataset)
    return _time_batches(normalised, batches)


def run_open_clip(data: Path, batches: int) -> dict:
    import open_clip
    from open_clip_train.data import get_wds_dataset

    from clipflow.data.shards import split_sizes

    _pin_to_one_core()
    _, preprocess_train, _ = open_clip.create_model_and_transforms(MODEL)
    shards = [str(path) for path in split_sizes(data, "train")]
    args = SimpleNamespace(
        train_data="::".join(shards),
        train_num_samples=None,
        train_data_upsampling_factors=None,
        dataset_resampled=False,
        seed=0,
        batch_size=BATCH,
        workers=0,
        world_size=1,
    )
    info = get_wds_dataset(args, preprocess_train, is_train=True, tokenizer=open_clip.get_tokenizer(MODEL))
    return _time_batches(info.dataloader, batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--batches", type=int, default=8, help="timed batches of 256 after one warm-up batch")
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipflow-bench-data"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, data, batches = args.child
        runner = run_clipflow if side == "clipflow" else run_open_clip
        print(json.dumps(runner(Path(data), int(batches))))
        return
    if (args.batches + 1) * BATCH > args.images:
        sys.exit(f"--images {args.images} holds fewer than the {(args.batches + 1) * BATCH} samples timed")
    data = prepare(args.work, args.images)
    results = {side: run_child(__file__, side, str(data), str(args.batches)) for side in ("clipflow", "open_clip")}
    for side, result in results.items():
        print(f"{side}: {result}")
    ours, peer = results["clipflow"], results["open_clip"]
    cases = [
        case(
            f"{MODEL} 224 px from 512 px JPEG shards",
            metric,
            unit,
            ours and ours[metric],
            "open_clip_train get_wds_dataset, 1 core, no workers",
            peer and peer[metric],
        )
        for metric, unit in (("samples_per_s", "samples/s on one core"), ("samples_per_cpu_s", "samples/CPU-s"))
    ]
    setup = {
        "images": args.images,
        "source_size": SOURCE_SIZE,
        "stored_short_side": 512,
        "batch": BATCH,
        "timed_batches": args.batches,
        "model": MODEL,
        "runs": results,
    }
    print(write_results("bench_data", "python benchmarks/bench_data.py", cases, setup=setup))


if __name__ == "__main__":
    main()
