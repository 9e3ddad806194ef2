"""Whether a trained model sees left from right at all: why the spatial probe sits at chance.

    python benchmarks/bench_position_signal.py [--checkpoint PATH] [--images 600]

The spatial probe (`clipflow.evaluate.probes`) asks an image to prefer "a red star to the left of a blue
cross" over the same text with "right"; it can only answer if both towers separate the two. Three
measurements on the probe split's spatial scenes and on lone objects, for the checkpoint and for a
random model of the same config (the floor any trained tower should clear):

- text: the mean cosine between each spatial probe's true and false candidate (1.0: the text tower
  cannot tell them apart);
- image: the mean cosine between each spatial probe image and its mirror image, which swaps the answer;
- position: top-1 of a linear probe (`clipflow.evaluate.linear_probe`, on 4/5 of the images) that tells
  from frozen image features whether a lone object sits in the left or the right column, on the
  other fifth (0.5 is chance).

The checkpoint defaults to seed 0's of bench_default_run (the default `make run` model).
Writes benchmarks/results/bench_position_signal.json.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from common import case, write_results
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COMMAND = "python benchmarks/bench_position_signal.py"
DEFAULT_RUN = Path("/tmp/clipflow-default-run/seed-0")
PROBE_SCENES = 300  # every third probe scene is a spatial one
L2 = (1e-4, 1e-3, 1e-2)


def default_checkpoint() -> Path:
    found = sorted(DEFAULT_RUN.glob("outputs/kfp/*/train-component/model/checkpoint.pt"))
    if not found:
        raise SystemExit(f"no checkpoint under {DEFAULT_RUN}: run benchmarks/bench_default_run.py or pass --checkpoint")
    return found[-1]


def scenes(params, images: int) -> dict[str, list]:
    """The spatial probe scenes with their true and false captions, and `images` lone objects with their columns."""
    from clipflow.data import builtin

    pairs = builtin.compositions(params, "test")
    spatial = [builtin.render_probe(params, "probe", index, pairs) for index in range(PROBE_SCENES)]
    spatial = [sample for sample in spatial if sample.facts["probe"] == "spatial"]
    rng = random.Random(0)
    lone, columns = [], []
    for index in range(images):
        color, shape = rng.choice(pairs)
        column = rng.choice(("left", "right"))
        scene = builtin.Scene(
            color, shape, rng.choice(tuple(builtin.SIZE_WORDS)), rng.choice(builtin.ROWS), column, 130
        )
        lone.append(builtin.render(scene, params.image_size, random.Random(index)))
        columns.append(column)
    return {
        "spatial": [sample.image for sample in spatial],
        "true": [sample.facts["candidates"][sample.facts["answer"]] for sample in spatial],
        "false": [sample.facts["candidates"][1 - sample.facts["answer"]] for sample in spatial],
        "lone": lone,
        "columns": columns,
    }


def measure(clip, seen: dict[str, list]) -> dict[str, float]:
    from clipflow.evaluate.linear_probe import fit_linear_probe

    def encode(pictures: list[Image.Image]) -> torch.Tensor:
        return clip.encode_images(torch.stack([clip.preprocess(picture) for picture in pictures]))

    with torch.no_grad():
        spatial = encode(seen["spatial"])
        mirrored = encode([picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for picture in seen["spatial"]])
        features = encode(seen["lone"])
        text_cosine = (clip.encode_text(seen["true"]) * clip.encode_text(seen["false"])).sum(1).mean().item()
    columns = seen["columns"]
    fitted = len(columns) * 4 // 5
    probe = fit_linear_probe(features[:fitted], columns[:fitted], L2, max_iter=200)
    return {
        "text_true_false_cosine": text_cosine,
        "image_mirror_cosine": (spatial * mirrored).sum(1).mean().item(),
        "column_probe_top1": probe.top1_hits(features[fitted:], columns[fitted:]).float().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--images", type=int, default=600)
    args = parser.parse_args()
    from clipflow import model as clip_model
    from clipflow.params import load_params

    torch.manual_seed(0)
    checkpoint = args.checkpoint or default_checkpoint()
    params = load_params(ROOT / "params.yaml").data
    trained = clip_model.load(checkpoint)
    random_model = clip_model.create(trained.name)
    random_model.model.eval()
    seen = scenes(params, args.images)
    ours, floor = measure(trained, seen), measure(random_model, seen)
    units = {"text_true_false_cosine": "cosine", "image_mirror_cosine": "cosine", "column_probe_top1": "fraction"}
    cases = [
        case(
            f"{trained.name} trained: {metric}",
            metric,
            units[metric],
            round(value, 5),
            "random init",
            round(floor[metric], 5),
        )
        for metric, value in ours.items()
    ]
    path = write_results("bench_position_signal", COMMAND, cases, checkpoint=str(checkpoint), images=args.images)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
