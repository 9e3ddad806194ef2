"""The built-in dataset: rendered scenes of coloured shapes with varied captions.

Every sample is a pure function of (seed, split, index), so the dataset is reproducible and
any sample can be rendered alone. Compositions listed in `data.heldout` ("red star") are
never rendered into `train` or `test`; the `heldout` split holds only them, so zero-shot
accuracy there measures whether the model composes a colour and a shape it saw apart.

Captions of single-object scenes name where the object is ("a red star in the top left") at the share
`data.position_captions`. Without that signal the towers learn to drop position, which the spatial
probe needs (benchmarks/bench_position_signal.py): at 4 in 10 it stays at chance.

Train scenes can also be harder, each kind drawn from its own random stream so that single-object
scenes stay the same: background textures (`data.backgrounds`), two objects in a spatial relation
(`data.relation_fraction`, relation words with synonyms) and two to four copies of one object
(`data.count_fraction`). The two-object and counting scenes come in twins, samples 2k and 2k + 1:
the second is the first with the relation turned round, the colours of its two objects swapped, or
another count, each caption true of its own image only. The trainer keeps twins in one batch
(`train.batch_group`), so each is the other's hard negative: with random batches two scenes of the
same two objects almost never meet, and a contrastive model then learns the words of a caption but
not their order (Yuksekgonul et al., 2023, "When and why vision-language models behave like bags of
words").

The `shift` split is the test split's distribution shifted, as ImageNet-Sketch shifts ImageNet: seen
compositions drawn as outlines only (`sketch`), on textured backgrounds (`texture`), or far smaller or
larger than any training scene (`size`), a third each. The evaluate step scores zero-shot and a linear
probe on it against the test split (`clipflow.evaluate.shift`).

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

# The probe scenes' split; the evaluate step runs the probes on any data that has it.
PROBE_SPLIT = "probe"
# The test split's scenes under distribution shift; the evaluate step reports on any data that has it.
SHIFT_SPLIT = "shift"
SPLITS = ("train", "test", "heldout", SHIFT_SPLIT, PROBE_SPLIT)
SHIFTS = ("sketch", "texture", "size")
# Object radii of the `size` shift, as fractions of the side: training draws 0.12 (small) and 0.22 (large).
SHIFT_RADII = {"small": 0.06, "large": 0.36}
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
# A single-object scene's caption names where the object is (`data.position_captions` of them) or not.
PLACED_TEMPLATES = (
    "an image of a {size} {color} {shape} in the {position}",
    "a {color} {shape} in the {position}",
    "there is a {size} {color} {shape} at the {position}",
    "{color} {shape}, {size}, {position}",
)
UNPLACED_TEMPLATES = (
    "a {size} {color} {shape}",
    "a {color} {shape}",
    "a photo of a {color} {shape}",
    "a {shape} that is {color}",
    "the {shape} is {color} and {size}",
    "a picture showing one {color} {shape}",
)
TEXTURES = ("plain", "stripes", "checker", "noise")
RELATION_WORDS = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
OPPOSITE_RELATIONS = {"left": "right", "right": "left", "above": "below", "below": "above"}
# Where the first object sits, then the second, as fractions of the side.
RELATION_PLACES = {
    "left": ((0.25, 0.5), (0.75, 0.5)),
    "right": ((0.75, 0.5), (0.25, 0.5)),
    "above": ((0.5, 0.25), (0.5, 0.75)),
    "below": ((0.5, 0.75), (0.5, 0.25)),
}
# No training caption is ever a probe's candidate ("a red star to the left of a blue cross", "three red
# stars", "a red star and a blue cross"): the probes ask for what training taught, in words it never used.
RELATION_TEMPLATES = (
    "a {a} is {rel} a {b}",
    "{a} {rel} {b}",
    "there is a {a} {rel} a {b}",
    "a picture of a {a} {rel} a {b}",
)
COUNT_TEMPLATES = ("a picture of {n} {color} {shapes}", "there are {n} {color} {shapes}")
COUNT_TEMPLATES += ("{n} {shapes}, all {color}", "{color} {shapes}, {n} of them", "exactly {n} {color} {shapes}")


@dataclass(frozen=True)
class Scene:
    """What a sample shows, and so what its caption and labels say."""

    color: str
    shape: str
    size: str
    row: str
    column: str
    background: int
    texture: str = "plain"

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
    return (sizes | {SHIFT_SPLIT: params.num_shift})[split] if split != PROBE_SPLIT else params.num_probe


def generate(params: DataParams, split: str) -> Iterator[Sample]:
    """Yield the samples of one split in key order."""
    pairs = compositions(params, "test" if split in (PROBE_SPLIT, SHIFT_SPLIT) else split)
    render_one = {PROBE_SPLIT: render_probe, SHIFT_SPLIT: render_shifted}.get(split, render_sample)
    for index in range(split_size(params, split)):
        yield render_one(params, split, index, pairs)


def render_sample(params: DataParams, split: str, index: int, pairs: list[tuple[str, str]]) -> Sample:
    # The textures and the two-object and counting scenes draw from streams of their own: single-object
    # scenes stay byte-identical whatever their fractions.
    extra = random.Random(f"{params.seed}/{split}/{index}/extra")
    texture = _texture(params, extra)
    if split == "train":
        twins = random.Random(f"{params.seed}/{split}/{index // 2}/twins")
        kind = twins.random()
        if kind < params.relation_fraction + params.count_fraction:
            texture = _texture(params, twins)
            make = _relation_sample if kind < params.relation_fraction else _count_sample
            return make(params, split, index, pairs, texture, twins)
    rng = random.Random(f"{params.seed}/{split}/{index}")
    color, shape = rng.choice(pairs)
    scene = Scene(
        color=color,
        shape=shape,
        size=rng.choice(tuple(SIZE_WORDS)),
        row=rng.choice(ROWS),
        column=rng.choice(COLUMNS),
        background=rng.randrange(90, 170),
        texture=texture,
    )
    caption = _single_caption(params, scene, rng)
    image = render(scene, params.image_size, rng, extra)
    facts = _scene_facts(scene) | ({"background": texture} if params.backgrounds != ["plain"] else {})
    return Sample(f"{split}-{index:07d}", split, image, caption, facts)


def _single_caption(params: DataParams, scene: Scene, rng: random.Random) -> str:
    templates = PLACED_TEMPLATES if rng.random() < params.position_captions else UNPLACED_TEMPLATES
    size = rng.choice(SIZE_WORDS[scene.size])
    return rng.choice(templates).format(size=size, color=scene.color, shape=scene.shape, position=scene.position)


def _texture(params: DataParams, rng: random.Random) -> str:
    """A background texture of `data.backgrounds`; plain-only data draws nothing from `rng`."""
    return rng.choice(params.backgrounds) if params.backgrounds != ["plain"] else "plain"


def render_shifted(params: DataParams, split: str, index: int, pairs: list[tuple[str, str]]) -> Sample:
    """A scene drawn as a test scene is, under one of `SHIFTS` in turn; its facts name the shift."""
    rng = random.Random(f"{params.seed}/{split}/{index}")
    kind = SHIFTS[index % len(SHIFTS)]
    color, shape = rng.choice(pairs)
    size = rng.choice(tuple(SIZE_WORDS))
    texture = rng.choice(TEXTURES[1:]) if kind == "texture" else "plain"
    scene = Scene(color, shape, size, rng.choice(ROWS), rng.choice(COLUMNS), rng.randrange(90, 170), texture)
    radius = params.image_size * SHIFT_RADII[size] if kind == "size" else None
    image = render(scene, params.image_size, rng, radius=radius, outline=kind == "sketch")
    caption = _single_caption(params, scene, rng)
    facts = _scene_facts(scene) | {"shift": kind, "background": texture}
    return Sample(f"{split}-{index:07d}", split, image, caption, facts)


def _relation_sample(
    params: DataParams, split: str, index: int, pairs: list[tuple[str, str]], texture: str, twins: random.Random
) -> Sample:
    """Two seen compositions, the first left of, right of, above or below the second; samples 2k and 2k + 1 are
    twins drawn from one stream, the second with the relation turned round or the two colours swapped."""
    side = params.image_size
    first, second = _distinct_pair(pairs, twins)  # the colour-swapped compositions are seen too
    relation = twins.choice(tuple(RELATION_WORDS))
    twist = twins.choice(("relation", "colours"))
    template, word = twins.choice(RELATION_TEMPLATES), twins.randrange(len(RELATION_WORDS[relation]))
    if index % 2 and twist == "relation":
        relation = OPPOSITE_RELATIONS[relation]
    elif index % 2:
        first, second = (second[0], first[1]), (first[0], second[1])
    image = background(side, twins.randrange(90, 170), texture, twins)
    draw = ImageDraw.Draw(image)
    for (color, shape), (x, y) in zip((first, second), RELATION_PLACES[relation], strict=True):
        jitter = side * 0.05
        cx, cy = x * side + twins.uniform(-jitter, jitter), y * side + twins.uniform(-jitter, jitter)
        _draw_shape(draw, shape, cx, cy, side * 0.15, RGB[color])
    a, b = f"{first[0]} {first[1]}", f"{second[0]} {second[1]}"
    caption = template.format(a=a, rel=RELATION_WORDS[relation][word], b=b)
    facts = {"label": a, "color": first[0], "shape": first[1], "relation": relation, "second_label": b}
    return Sample(f"{split}-{index:07d}", split, image, caption, facts | {"background": texture, "twist": twist})


def _count_sample(
    params: DataParams, split: str, index: int, pairs: list[tuple[str, str]], texture: str, twins: random.Random
) -> Sample:
    """Two to four copies of one seen composition in distinct cells of a 3x3 grid; samples 2k and 2k + 1 are
    twins drawn from one stream that show different counts of the same object on the same background."""
    side = params.image_size
    color, shape = twins.choice(pairs)
    counts = twins.sample(range(2, len(NUMBER_WORDS) + 1), 2)
    count = counts[index % 2]
    template = twins.choice(COUNT_TEMPLATES)
    cells = twins.sample([(row, col) for row in range(3) for col in range(3)], len(NUMBER_WORDS))
    # Jitter keeps two scenes of the same count, cells and shade from being one image (a duplicate validate refuses).
    places = [
        ((col + 0.5 + twins.uniform(-0.1, 0.1)) * side / 3, (row + 0.5 + twins.uniform(-0.1, 0.1)) * side / 3)
        for row, col in cells
    ]
    image = background(side, twins.randrange(90, 170), texture, twins)
    draw = ImageDraw.Draw(image)
    for x, y in places[:count]:
        _draw_shape(draw, shape, x, y, side * 0.1, RGB[color])
    caption = template.format(n=NUMBER_WORDS[count - 1], color=color, shapes=plural(shape))
    facts = {"label": f"{color} {shape}", "color": color, "shape": shape, "count": count}
    return Sample(f"{split}-{index:07d}", split, image, caption, facts | {"background": texture})


def plural(shape: str) -> str:
    """The shape's name for two or more: "crosses", "stars"."""
    return f"{shape}es" if shape.endswith(("s", "x")) else f"{shape}s"


def background(side: int, shade: int, texture: str, rng: random.Random) -> Image.Image:
    """A gray background, plain or textured; textures stay gray so colour words keep their meaning."""
    image = Image.new("RGB", (side, side), (shade,) * 3)
    if texture == "plain":
        return image
    if texture not in TEXTURES:
        raise ValueError(f"unknown background texture {texture!r}")
    draw = ImageDraw.Draw(image)
    other = (min(255, shade + rng.randint(25, 45)),) * 3
    step = max(4, side // rng.choice((6, 8, 10)))
    if texture == "stripes":
        vertical = rng.random() < 0.5
        for start in range(0, side, step):
            box = (start, 0, start + step // 2 - 1, side) if vertical else (0, start, side, start + step // 2 - 1)
            draw.rectangle(box, fill=other)
    elif texture == "checker":
        for y in range(0, side, step):
            for x in range(0, side, step):
                if (x // step + y // step) % 2:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), fill=other)
    else:
        noise = random.Random(rng.random())
        pixels = [min(255, max(0, shade + noise.randint(-25, 25))) for _ in range(side * side)]
        image = Image.frombytes("L", (side, side), bytes(pixels)).convert("RGB")
    return image


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
        candidates = [f"{NUMBER_WORDS[n - 1]} {color} {plural(shape) if n > 1 else shape}" for n in range(1, 5)]
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
        swapped_seen = (second[0], first[1]) in seen and (first[0], second[1]) in seen
        if first[0] != second[0] and first[1] != second[1] and swapped_seen:
            return first, second


def render(
    scene: Scene,
    side: int,
    rng: random.Random,
    texture_rng: random.Random | None = None,
    radius: float | None = None,
    outline: bool = False,
) -> Image.Image:
    """Draw the scene; small jitter in colour, size and position keeps renders distinct.

    `radius` (pixels) replaces the scene's size; `outline` draws the shape's outline only, as a sketch would.
    """
    image = background(side, scene.background, scene.texture, texture_rng or rng)
    draw = ImageDraw.Draw(image)
    radius = (radius or side * (0.12 if scene.size == "small" else 0.22)) * rng.uniform(0.9, 1.1)
    cell = side / 3
    cx = (COLUMNS.index(scene.column) + 0.5) * cell + rng.uniform(-0.15, 0.15) * cell
    cy = (ROWS.index(scene.row) + 0.5) * cell + rng.uniform(-0.15, 0.15) * cell
    cx = min(max(cx, radius), side - radius)
    cy = min(max(cy, radius), side - radius)
    fill = tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in RGB[scene.color])
    if outline:
        _outline_shape(draw, scene.shape, cx, cy, radius, fill, width=max(1, side // 32))
    else:
        _draw_shape(draw, scene.shape, cx, cy, radius, fill)
    return image


def _outline_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color, width: int) -> None:
    """The outline of the shape `_draw_shape` fills, `width` pixels wide."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=color, width=width)
        return
    if shape == "square":
        h = r * 0.85
        points = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    elif shape == "cross":
        w = r * 0.35
        # The plus sign's twelve corners, clockwise from the top arm's left edge.
        corners = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w)]
        corners += [(w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        points = [(cx + x, cy + y) for x, y in corners]
    else:
        points = _polygon(shape, cx, cy, r)
    draw.polygon(points, outline=color, width=width)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape in ("triangle", "hexagon", "star"):
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The corners of a triangle, hexagon or star of circumradius `r` about (cx, cy)."""
    if shape == "triangle":
        return _regular(cx, cy, r, 3, -math.pi / 2)
    if shape == "hexagon":
        return _regular(cx, cy, r, 6, 0)
    if shape == "star":
        outer = _regular(cx, cy, r, 5, -math.pi / 2)
        inner = _regular(cx, cy, r * 0.42, 5, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    raise ValueError(f"unknown shape {shape!r}")


def _regular(cx: float, cy: float, r: float, sides: int, phase: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(phase + 2 * math.pi * k / sides), cy + r * math.sin(phase + 2 * math.pi * k / sides))
        for k in range(sides)
    ]
