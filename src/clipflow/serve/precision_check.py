"""The package step's check of bf16 serving against fp32, before a Bento that may serve bf16 is built.

Two checks, both against the same model in fp32:

- a fixed batch (seeded noise images through the model's preprocess, and prompts from a few
  words to the whole context), and the images of the evaluation sets below: the worst row's
  cosine between the two precisions' embeddings must be at least `serve.precision_min_cosine`;
- each zero-shot set of `evaluate.zeroshot` (and of the built-in data's own, on it) whose split
  and label column the packaged data holds: top-1 must not fall more than
  `serve.precision_max_top1_drop` below fp32's, computed by the evaluate step's own code.

The numbers travel with the Bento (its model's metadata) and the package step's report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import torch

from clipflow.artifacts import METADATA_FILE
from clipflow.errors import ClipflowError
from clipflow.evaluate.embeddings import SplitEmbeddings
from clipflow.evaluate.plan import evaluation_sets
from clipflow.evaluate.zeroshot import zeroshot
from clipflow.model import ClipModel
from clipflow.params import Params

CHECK_IMAGES = 32
CHECK_IMAGE_PX = 256  # above every input size open_clip ships, so the preprocess only scales down
CHECK_SEED = 0
# Lengths from three tokens to past the context (77), where bf16's rounding builds up over more positions.
CHECK_TEXTS = (
    "a dog",
    "a red circle",
    "a photo of a cat.",
    "two blue squares above a green star",
    "a purple hexagon on the left of an orange cross, drawn on a striped background",
    "three yellow triangles",
    "a picture of a white square.",
    "an aerial photograph of a harbour at dawn with fishing boats and gulls over the water",
    " ".join(["a black star next to a green circle"] * 12),
)


def check_precision(fp32: ClipModel, cast: ClipModel, params: Params, data_dir: Path | None) -> dict[str, float]:
    """Compare `cast` (the model at a lower precision) with `fp32`; returns the numbers when they pass.

    Args:
        fp32: the model in fp32.
        cast: the same model at the precision to check (`ClipModel.at_precision`).
        params: `serve` holds the thresholds, `evaluate` the zero-shot sets, templates and batch size.
        data_dir: an ingested data directory holding the zero-shot sets' splits, or None (the fixed batch only).

    Returns:
        `worst_image_cosine` and `worst_text_cosine` on the fixed batch; per zero-shot set checked,
        `zeroshot_top1_<set>_fp32`, `zeroshot_top1_<set>_<precision>` and `zeroshot_top1_drop_<set>`;
        and per split of those sets, `worst_image_cosine_<split>`.

    Raises:
        ClipflowError: a number is past its threshold; the message names each with its threshold.
    """
    serve, low = params.serve, cast.precision
    images = _check_images(fp32)
    top1, split_cosines = _evaluation_sets(fp32, cast, params, data_dir)
    numbers = {
        "worst_image_cosine": _worst_cosine(fp32.encode_images(images), cast.encode_images(images)),
        "worst_text_cosine": _worst_cosine(fp32.encode_text(list(CHECK_TEXTS)), cast.encode_text(list(CHECK_TEXTS))),
        **{f"worst_image_cosine_{split}": cosine for split, cosine in split_cosines.items()},
    }
    failures = [
        f"{name} {cosine:.6f} < serve.precision_min_cosine {serve.precision_min_cosine}"
        for name, cosine in numbers.items()
        if cosine < serve.precision_min_cosine
    ]
    for name, (top1_fp32, top1_low) in top1.items():
        drop_numbers, drop_failure = top1_drop(name, top1_fp32, top1_low, low, serve.precision_max_top1_drop)
        numbers |= drop_numbers
        failures += drop_failure
    if failures:
        raise ClipflowError(
            f"{low} does not match fp32: {'; '.join(failures)}; "
            "package with serve.precision=fp32, or loosen the thresholds"
        )
    return numbers


def top1_drop(
    name: str, top1_fp32: float, top1_low: float, low: str, max_drop: float
) -> tuple[dict[str, float], list[str]]:
    """One zero-shot set's top-1 at fp32 and at `low`: its three numbers, and its failure past `max_drop`."""
    # Both top-1s are fractions of the same image count, so the drop is a whole number of images: rounding off
    # the float error keeps a drop of exactly the threshold (0.025 - 0.015 is 0.010000000000000002) a pass.
    drop = round(top1_fp32 - top1_low, 9)
    numbers = {
        f"zeroshot_top1_{name}_fp32": top1_fp32,
        f"zeroshot_top1_{name}_{low}": top1_low,
        f"zeroshot_top1_drop_{name}": drop,
    }
    if drop <= max_drop:
        return numbers, []
    return numbers, [
        f"zeroshot_top1_{name}_{low} {top1_low:.4f} against fp32's {top1_fp32:.4f}, a drop of {drop:.4f} "
        f"> serve.precision_max_top1_drop {max_drop}"
    ]


def _check_images(clip: ClipModel) -> torch.Tensor:
    """The fixed batch's images, preprocessed for `clip`: (CHECK_IMAGES, 3, H, W)."""
    rng = np.random.default_rng(CHECK_SEED)
    pixels = rng.integers(0, 256, size=(CHECK_IMAGES, CHECK_IMAGE_PX, CHECK_IMAGE_PX, 3), dtype=np.uint8)
    return torch.stack([clip.preprocess(PIL.Image.fromarray(image)) for image in pixels])


def _worst_cosine(reference: torch.Tensor, other: torch.Tensor) -> float:
    """The lowest cosine between matching rows of two (N, D) tensors of L2-normalised embeddings."""
    return (reference * other).sum(dim=-1).min().item()


def _evaluation_sets(
    fp32: ClipModel, cast: ClipModel, params: Params, data_dir: Path | None
) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    """On each zero-shot set whose split and label column `data_dir` holds: both models' top-1 by set,
    and the worst cosine between their image embeddings by split."""
    if data_dir is None or not (data_dir / METADATA_FILE).is_file():
        return {}, {}
    metadata = pd.read_parquet(data_dir / METADATA_FILE)
    splits = set(metadata["split"])
    settings = params.evaluate
    sets = {
        name: spec
        for name, spec in evaluation_sets(data_dir, settings).items()
        if spec.split in splits and spec.label_field in metadata.columns
    }
    embedded = [SplitEmbeddings(clip, data_dir, settings.batch_size) for clip in (fp32, cast)]
    top1 = {
        name: tuple(
            zeroshot(clip, images, metadata, name, spec, settings.templates).acc1
            for clip, images in zip((fp32, cast), embedded, strict=True)
        )
        for name, spec in sets.items()
    }
    cosines = {
        split: _worst_cosine(embedded[0](split)[1], embedded[1](split)[1])
        for split in sorted({spec.split for spec in sets.values()})
    }
    return top1, cosines
