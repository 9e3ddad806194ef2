"""The built-in dataset: rendered scenes of coloured shapes with varied captions.

Every sample is a pure function of (seed, split, index), so the dataset is reproducible and
any sample can be rendered alone. Compositions listed in `data.heldout` ("red star") are
never rendered into `train` or `test`; the `heldout` split holds only them, so zero-shot
accuracy there measures whether the model composes a colour and a shape it saw apart.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageDraw

from clipflow.params import DataParams

SPLITS = ("train", "test", "heldout")

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
    key: str
    split: str
    image: Image.Image
    caption: str
    scene: Scene


def compositions(params: DataParams, split: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a split may render."""
    heldout = set(params.heldout)
    pairs = [(c, s) for c in params.colors for s in params.shapes]
    if split == "heldout":
        return [pair for pair in pairs if f"{pair[0]} {pair[1]}" in heldout]
    return [pair for pair in pairs if f"{pair[0]} {pair[1]}" not in heldout]


def split_size(params: DataParams, split: str) -> int:
    return {"train": params.num_train, "test": params.num_test, "heldout": params.num_heldout}[split]


def generate(params: DataParams, split: str) -> Iterator[Sample]:
    """Yield the samples of one split in key order."""
    pairs = compositions(params, split)
    for index in range(split_size(params, split)):
        yield render_sample(params, split, index, pairs)


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
    return Sample(f"{split}-{index:07d}", split, render(scene, params.image_size, rng), caption, scene)


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
