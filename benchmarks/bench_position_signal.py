"""Whether a trained model sees left from right at all, and what taught it to.

    python benchmarks/bench_position_signal.py [--checkpoint NAME=PATH ...] [--images 600]

The spatial probe (`clipflow.evaluate.probes`) asks an image to prefer "a red star to the left of a blue
cross" over the same text with "right"; it can only answer if both towers separate the two. Three
measurements on the probe split's spatial scenes and on lone objects, for each checkpoint and for a
random model of the same config (the floor any trained tower should clear):

- text: the mean cosine between each spatial probe's true and false candidate (1.0: the text tower
  cannot tell them apart);
- image: the mean cosine between each spatial probe image and its mirror image, which swaps the answer;
- position: top-1 of a linear probe (`clipflow.evaluate.linear_probe`, on 4/5 of the images) that tells
  from frozen image features whether a lone object sits in the left or the right column, on the
  other fifth (0.5 is chance).

The checkpoints default to seed 0's of bench_default_run (the default `make run` model) and seed 0's of
bench_training_mix's rung that trained as long on captions of which 4 in 10 name a lone object's place.
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
FEW_PLACES_RUNG = "relations and counts 0.25 each, 2000 steps"
PROBE_SCENES = 300  # every third probe scene is a spatial one
L2 = (1e-4, 1e-3, 1e-2)


def default_checkpoints() -> dict[str, Path]:
    from bench_training_mix import CONFIGS, DEFAULT_WORKDIR

    runs = {
        "9 in 10 captions name the place (the default run)": DEFAULT_RUN,
        "4 in 10 captions name the place": DEFAULT_WORKDIR / f"config-{list(CONFIGS).index(FEW_PLACES_RUNG)}-seed-0",
    }
    return {name: checkpoint_of(folder) for name, folder in runs.items()}


def checkpoint_of(run: Path) -> Path:
    found = sorted(run.glob("outputs/kfp/*/train-component/model/checkpoint.pt"))
    if not found:
        raise SystemExit(f"no checkpoint under {run}: run its benchmark or pass --checkpoint NAME=PATH")
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
    parser.add_argument("--checkpoint", nargs="+", default=None, metavar="NAME=PATH")
    parser.add_argument("--images", type=int, default=600)
    args = parser.parse_args()
    from clipflow import model as clip_model
    from clipflow.params import load_params

    torch.manual_seed(0)
    if args.checkpoint:
        checkpoints = {name: Path(path) for name, _, path in (text.partition("=") for text in args.checkpoint)}
    else:
        checkpoints = default_checkpoints()
    params = load_params(ROOT / "params.yaml").data
    seen = scenes(params, args.images)
    units = {"text_true_false_cosine": "cosine", "image_mirror_cosine": "cosine", "column_probe_top1": "fraction"}
    cases, floors = [], {}
    for name, checkpoint in checkpoints.items():
        trained = clip_model.load(checkpoint)
        if trained.name not in floors:
            random_model = clip_model.create(trained.name)
            random_model.model.eval()
            floors[trained.name] = measure(random_model, seen)
        floor = floors[trained.name]
        for metric, value in measure(trained, seen).items():
            label = f"{trained.name}, {name}: {metric}"
            cases.append(case(label, metric, units[metric], round(value, 5), "random init", round(floor[metric], 5)))
    checkpoints = {name: str(path) for name, path in checkpoints.items()}
    path = write_results("bench_position_signal", COMMAND, cases, checkpoints=checkpoints, images=args.images)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
