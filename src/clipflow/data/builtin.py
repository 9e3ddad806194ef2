"""The built-in dataset: rendered scenes of coloured shapes with varied captions.

Every sample is a pure function of (seed, split, index), so the dataset is reproducible and
any sample can be rendered alone. Compositions listed in `data.heldout` ("red star") are
never rendered into `train` or `test`; the `heldout` split holds only them, so zero-shot
accuracy there measures whether the model composes a colour and a shape it saw apart.

The `probe` split tests CLIP's known weak spots. Each probe scene comes with candidate
captions, exactly one of them true: counting ("three red circles" among one to four),
spatial relations ("left of" against "right of") and attribute binding ("a red circle and a
blue square" against the colours swapped).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageDraw

from clipflow.params import DataParams

SPLITS = ("train", "test", "heldout", "probe")
PROBES = ("counting", "spatial", "binding")
NUMBER_WORDS = ("one", "two", "three", "four")

RGB = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "pink": (250, 130, 190),
    "brown": (120, 70, 30),
    "cyan": (40, 210, 220),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
TEMPLATES = (
    "a {size} {color} {shape}",
    "a {color} {shape}",
    "a photo of a {color} {shape}",
    "an image of a {size} {color} {shape} in the {position}",
    "a {color} {shape} in the {position}",
    "there is a {size} {color} {shape} at the {position}",
    "a {shape} that is {color}",
    "the {shape} is {color} and {size}",
    "{color} {shape}, {size}, {position}",
    "a picture showing one {color} {shape}",
)


@dataclass(frozen=True)
class Scene:
    """What a sample shows, and so what its caption and labels say."""

    color: str
    shape: str
    size: str
    row: str
    column: str
    background: int

    @property
    def label(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def position(self) -> str:
        return "center" if (self.row, self.column) == ("middle", "center") else f"{self.row} {self.column}"


@dataclass(frozen=True)
class Sample:
    """A rendered image, its caption, and the facts about it that go into the metadata table."""

    key: str
    split: str
    image: Image.Image
    caption: str
    facts: dict


def _scene_facts(scene: Scene) -> dict:
    return {
        "label": scene.label,
        "color": scene.color,
        "shape": scene.shape,
        "size": scene.size,
        "position": scene.position,
    }


def compositions(params: DataParams, split: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a split may render."""
    heldout = set(params.heldout)
    pairs = [(c, s) for c in params.colors for s in params.shapes]
    if split == "heldout":
        return [pair for pair in pairs if f"{pair[0]} {pair[1]}" in heldout]
    return [pair for pair in pairs if f"{pair[0]} {pair[1]}" not in heldout]


def split_size(params: DataParams, split: str) -> int:
    sizes = {"train": params.num_train, "test": params.num_test, "heldout": params.num_heldout}
    return sizes[split] if split in sizes else params.num_probe


def generate(params: DataParams, split: str) -> Iterator[Sample]:
    """Yield the samples of one split in key order."""
    pairs = compositions(params, "test" if split == "probe" else split)
    render_one = render_probe if split == "probe" else render_sample
    for index in range(split_size(params, split)):
        yield render_one(params, split, index, pairs)


def render_sample(params: DataParams, split: str, index: int, pairs: list[tuple[str, str]]) -> Sample:
    rng = random.Random(f"{params.seed}/{split}/{index}")
    color, shape = rng.choice(pairs)
    scene = Scene(
        color=color,
        shape=shape,
        size=rng.choice(tuple(SIZE_WORDS)),
        row=rng.choice(ROWS),
        column=rng.choice(COLUMNS),
        background=rng.randrange(90, 170),
    )
    caption = rng.choice(TEMPLATES).format(
        size=rng.choice(SIZE_WORDS[scene.size]), color=color, shape=shape, position=scene.position
    )
    image = render(scene, params.image_size, rng)
    return Sample(f"{split}-{index:07d}", split, image, caption, _scene_facts(scene))


def render_probe(params: DataParams, split: str, index: int, pairs: list[tuple[str, str]]) -> Sample:
    """A probe scene of seen compositions; its facts hold the candidate captions and the answer."""
    rng = random.Random(f"{params.seed}/{split}/{index}")
    kind = PROBES[index % len(PROBES)]
    side = params.image_size
    image = Image.new("RGB", (side, side), (rng.randrange(90, 170),) * 3)
    draw = ImageDraw.Draw(image)
    if kind == "counting":
        color, shape = rng.choice(pairs)
        count = rng.randint(1, len(NUMBER_WORDS))
        cells = rng.sample([(row, col) for row in range(3) for col in range(3)], count)
        for row, col in cells:
            _draw_shape(draw, shape, (col + 0.5) * side / 3, (row + 0.5) * side / 3, side * 0.1, RGB[color])
        candidates = [f"{NUMBER_WORDS[n - 1]} {color} {shape}{'s' if n > 1 else ''}" for n in range(1, 5)]
        answer = count - 1
    else:
        first, second = _distinct_pair(pairs, rng)
        first_x, second_x = rng.choice([(0.25, 0.75), (0.75, 0.25)])
        for (color, shape), x in zip((first, second), (first_x, second_x), strict=True):
            _draw_shape(draw, shape, x * side, side * rng.uniform(0.4, 0.6), side * 0.17, RGB[color])
        if kind == "spatial":
            relations = ("left", "right") if first_x < second_x else ("right", "left")
            true, false = (f"a {first[0]} {first[1]} to the {r} of a {second[0]} {second[1]}" for r in relations)
        else:
            true = f"a {first[0]} {first[1]} and a {second[0]} {second[1]}"
            false = f"a {second[0]} {first[1]} and a {first[0]} {second[1]}"
        answer = rng.randrange(2)
        candidates = [false, true] if answer else [true, false]
    facts = {"probe": kind, "candidates": candidates, "answer": answer}
    return Sample(f"{split}-{index:07d}", split, image, candidates[answer], facts)


def _distinct_pair(pairs: list[tuple[str, str]], rng: random.Random) -> tuple[tuple[str, str], tuple[str, str]]:
    """Two compositions differing in both colour and shape, with the colour-swapped pair also seen.

    Binding is only a fair test when every composition its candidates name was seen in training.
    """
    seen = set(pairs)
    while True:
        first, second = rng.sample(pairs, 2)
        if first[0] != second[0] and first[1] != second[1]:
            if (second[0], first[1]) in seen and (first[0], second[1]) in seen:
                return first, second


def render(scene: Scene, side: int, rng: random.Random) -> Image.Image:
    """Draw the scene; small jitter in colour, size and position keeps renders distinct."""
    image = Image.new("RGB", (side, side), (scene.background,) * 3)
    draw = ImageDraw.Draw(image)
    radius = side * (0.12 if scene.size == "small" else 0.22) * rng.uniform(0.9, 1.1)
    cell = side / 3
    cx = (COLUMNS.index(scene.column) + 0.5) * cell + rng.uniform(-0.15, 0.15) * cell
    cy = (ROWS.index(scene.row) + 0.5) * cell + rng.uniform(-0.15, 0.15) * cell
    cx = min(max(cx, radius), side - radius)
    cy = min(max(cy, radius), side - radius)
    fill = tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in RGB[scene.color])
    _draw_shape(draw, scene.shape, cx, cy, radius, fill)
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon(_regular(cx, cy, r, 3, -math.pi / 2), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_regular(cx, cy, r, 6, 0), fill=fill)
    elif shape == "star":
        outer = _regular(cx, cy, r, 5, -math.pi / 2)
        inner = _regular(cx, cy, r * 0.42, 5, -math.pi / 2 + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=fill)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _regular(cx: float, cy: float, r: float, sides: int, phase: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(phase + 2 * math.pi * k / sides), cy + r * math.sin(phase + 2 * math.pi * k / sides))
        for k in range(sides)
    ]
