"""RefShapes: a synthetic referring-segmentation dataset of coloured shapes, generated on the fly.

Every item is one scene (an image of 2-6 coloured shapes on a background - by default plain, gradient or noisy
pale; `backgrounds` adds dark, mid-grey, saturated, gradient, noise and texture families - of varied
size and aspect ratio) and one expression that refers to some of its shapes, with the exact mask of the referent:

    kind            example                                     referent
    colour_shape    "red circle"                                the only red circle
    position        "leftmost shape", "triangle at the top"     the extreme member of a group, by a clear margin
    size            "largest square", "small blue star"         the clearly largest / smallest member of a group
    relation        "circle left of the blue square"            the only group member on that side of the anchor
    multi_target    "all red shapes", "both stars", "circles"   the union of a group of two or more shapes
    no_target       "green star" (there is none)                nothing: an empty mask
    reasoning       "Which shape has three corners?"            the only shape with that property (an instruction)

Phrases carry no leading article ("red circle", not "the red circle"), as RefCOCO expressions, because the
paper's templates already supply one ("Can you segment the {text} in this image?"). Reasoning questions are full
sentences and use the instruction templates.

Correctness by construction: every shape's mask is rasterised on its own (no anti-aliasing) and painted in one
exact colour; the parts hidden by later shapes are removed from earlier masks. For each scene the generator
enumerates every expression of the requested kind, keeps only those whose meaning resolves unambiguously in the
scene (margins on positions and sizes, uniqueness of the referent, emptiness for `no_target`) and draws one of them;
a scene with none is redrawn.

Determinism: item `i` of a split is generated from its own `random.Random` seeded with the string
`"refshapes/{split}/{seed}/{i}"` (string seeds are hashed with SHA-512, independently of `PYTHONHASHSEED`), so it
is the same in every run and whatever the access order, and the train, validation and test splits draw from
unrelated streams.
"""

import colorsys
import math
import operator
import random
import re
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..processing_selfie import segmentation_answer, segmentation_question

SOURCE = "refshapes"
SPLITS = ("train", "validation", "test")

COLOURS = {
    "red": (215, 38, 38),
    "green": (34, 160, 60),
    "blue": (35, 80, 215),
    "yellow": (240, 205, 30),
    "purple": (135, 55, 175),
    "orange": (245, 130, 20),
}
FORMS = ("circle", "square", "triangle", "star", "ring", "diamond", "cross")
PLURALS = {**{form: form + "s" for form in FORMS}, "cross": "crosses", "shape": "shapes"}

EXPRESSION_KINDS = ("colour_shape", "position", "size", "relation", "multi_target", "no_target", "reasoning")
DEFAULT_KIND_WEIGHTS = {
    "colour_shape": 2.0,
    "position": 2.0,
    "size": 1.5,
    "relation": 1.5,
    "multi_target": 1.0,
    "no_target": 0.5,
    "reasoning": 1.0,
}

# Scene layout.
MIN_SIDE, MAX_SIDE = 96, 320
MIN_SHAPES, MAX_SHAPES = 2, 6
SMALL_RADIUS, LARGE_RADIUS = (0.11, 0.14), (0.18, 0.24)  # fractions of the short image side
TINY_RADIUS = (0.05, 0.09)  # with `tiny_shapes`: a shape about one 14 px ViT patch across once tiled
MIN_RADIUS = 7.0
SEPARATION = 0.9  # centres at least SEPARATION * (r1 + r2) apart: bounding discs overlap a little at most
MIN_VISIBLE = 0.8  # every shape keeps this fraction of its pixels after occlusion
PLACEMENT_ATTEMPTS = 40  # positions tried per shape
LAYOUT_ATTEMPTS = 100  # layouts tried per scene
MAX_SCENES = 200  # scenes tried per item for an expression of its kind

# Backgrounds: "pale" (plain, gradient or noisy light grey; the only family before v2), flat "dark", "mid" (grey)
# and "saturated" colours, and "gradient", "noise" and "texture" (stripes, checks) over colours of any of those.
BACKGROUND_FAMILIES = ("pale", "dark", "mid", "saturated", "gradient", "noise", "texture")
BACKGROUND_DISTANCE = 90.0  # RGB distance of every background colour from every shape colour

# Shape geometry, in units of the shape's radius.
SQUARE_HALF_SIDE = 0.82
DIAMOND_HALF_WIDTH = 0.7
TRIANGLE_HALF_BASE, TRIANGLE_BASE_Y = 0.95, 0.8
STAR_INNER = 0.45
RING_INNER = 0.55
CROSS_HALF_WIDTH = 0.32

# Unambiguity margins.
POSITION_MARGIN = 0.08  # fraction of the image side along the axis
SUPERLATIVE_AREA_RATIO, SUPERLATIVE_RADIUS_RATIO = 1.3, 1.15  # "largest", "smallest"
ADJECTIVE_AREA_RATIO, ADJECTIVE_RADIUS_RATIO = 1.8, 1.3  # "big", "small"

# Expression wording. `{group}` is a singular noun phrase ("red circle", "shape"); `{anchor}` names one shape.
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "top": (1, -1), "bottom": (1, 1)}  # (axis, sign): larger = more
ALL_DIRECTIONS = tuple(DIRECTIONS)
OPPOSITE_DIRECTIONS = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
SUPERLATIVE_POSITIONS = {
    "left": ("leftmost {group}",),
    "right": ("rightmost {group}",),
    "top": ("topmost {group}", "highest {group}"),
    "bottom": ("bottommost {group}", "lowest {group}"),
}
PAIR_POSITIONS = {  # only for a group of two shapes
    "left": ("{group} on the left",),
    "right": ("{group} on the right",),
    "top": ("{group} at the top",),
    "bottom": ("{group} at the bottom",),
}
SIZE_PHRASES = {  # (largest?, superlative?) -> templates
    (True, True): ("largest {group}", "biggest {group}"),
    (False, True): ("smallest {group}",),
    (True, False): ("big {group}", "large {group}"),
    (False, False): ("small {group}",),
}
RELATIONS = {
    "left": ("{group} left of the {anchor}", "{group} to the left of the {anchor}"),
    "right": ("{group} right of the {anchor}", "{group} to the right of the {anchor}"),
    "top": ("{group} above the {anchor}",),
    "bottom": ("{group} below the {anchor}",),
}
MULTI_PHRASES = ("all {groups}", "{groups}")
PAIR_MULTI_PHRASES = ("both {groups}",)
FORM_RIDDLES = {
    "circle": ("Which solid {subject} is perfectly round?",),
    "square": ("Which {subject} has four equal sides and four right angles?",),
    "triangle": ("Which {subject} has three corners?", "Which {subject} has exactly three sides?"),
    "star": ("Which {subject} has five points?",),
    "ring": ("Which {subject} has a hole in the middle?",),
    "diamond": ("Which {subject} looks like the diamond on a playing card?",),
    "cross": ("Which {subject} looks like a plus sign?",),
}
COLOUR_RIDDLES = {
    "red": "a ripe tomato",
    "green": "fresh grass",
    "blue": "a clear summer sky",
    "yellow": "a banana",
    "purple": "a plum",
    "orange": "a carrot",
}
COLOUR_RIDDLE_TEMPLATE = "Which {subject} is the colour of {thing}?"
SIZE_RIDDLES = {
    True: ("Which shape covers the largest area?", "Which shape is the biggest in the picture?"),
    False: ("Which shape covers the smallest area?", "Which shape is the smallest in the picture?"),
}

_WORD = re.compile(r"[^\s.,?!:;]+")


def split_words(text: str) -> list[str]:
    """The words of `text` as the word-level tokenizer of `modeling_selfie.tokenization` splits them: on spaces,
    with punctuation (`.,?!:;`) set apart and dropped here; case is kept."""
    return _WORD.findall(text)


@dataclass(frozen=True)
class PlacedShape:
    """One shape of a scene: its form (one of `FORMS`), colour (a key of `COLOURS`), centre (x, y) in pixels and
    radius (the radius of its bounding disc) in pixels."""

    form: str
    colour: str
    center: tuple[float, float]
    radius: float


@dataclass(frozen=True, eq=False)
class Scene:
    """A rendered scene.

    Attributes:
        image: the RGB image.
        shapes: the shapes, in drawing order (later ones on top).
        masks: bool `[n_shapes, H, W]`, the visible pixels of each shape (occluded parts removed).
        areas: `[n_shapes]`, visible pixel counts.
        centroids: `[n_shapes, 2]`, (x, y) centroids of the visible pixels.
        full_areas: `[n_shapes]`, pixel counts before occlusion.
    """

    image: Image.Image
    shapes: tuple[PlacedShape, ...]
    masks: np.ndarray
    areas: np.ndarray
    centroids: np.ndarray
    full_areas: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image."""
        return self.image.size

    def form_map(self) -> np.ndarray:
        """uint8 `[H, W]`: 0 where no shape is visible, else 1 + the `FORMS` index of the visible shape's form."""
        forms = np.zeros(self.masks.shape[1:], dtype=np.uint8)
        for shape, mask in zip(self.shapes, self.masks):
            forms[mask] = 1 + FORMS.index(shape.form)
        return forms


@dataclass(frozen=True)
class Group:
    """A noun phrase selecting shapes by colour and/or form; neither given means every shape ("shape")."""

    colour: str | None = None
    form: str | None = None

    def contains(self, shape: PlacedShape) -> bool:
        """Whether the shape has the group's colour and form (where given)."""
        return self.colour in (None, shape.colour) and self.form in (None, shape.form)

    def members(self, scene: Scene) -> tuple[int, ...]:
        """Indices of the scene's shapes the group selects."""
        return tuple(i for i, shape in enumerate(scene.shapes) if self.contains(shape))

    @property
    def singular(self) -> str:
        return " ".join(word for word in (self.colour, self.form or "shape") if word)

    @property
    def plural(self) -> str:
        return " ".join(word for word in (self.colour, PLURALS[self.form or "shape"]) if word)


@dataclass(frozen=True)
class Expression:
    """A referring expression resolved in its scene.

    Attributes:
        text: the expression ("red circle", "Which shape has three corners?").
        kind: one of `EXPRESSION_KINDS`.
        targets: indices of the referred shapes (empty for `no_target`); the mask is their union.
        group: indices of the shapes the expression chooses among (the referent's group, e.g. every red shape for
            "leftmost red shape"; the targets themselves for `colour_shape` and `multi_target`).
        anchor: index of the reference shape of a `relation` expression, else `None`.
        direction: the direction word's meaning (a key of `DIRECTIONS`) of a `position` or `relation` expression,
            else `None`.
    """

    text: str
    kind: str
    targets: tuple[int, ...]
    group: tuple[int, ...]
    anchor: int | None = None
    direction: str | None = None

    @property
    def query_kind(self) -> str:
        """The prompt kind of `segmentation_question`: "instruction" for reasoning questions, else "phrase"."""
        return "instruction" if self.kind == "reasoning" else "phrase"


@dataclass(frozen=True)
class RefShapesExample:
    """A scene and the expression generated for it."""

    scene: Scene
    expression: Expression

    def target_mask(self) -> np.ndarray:
        """uint8 `[H, W]`: the union of the target shapes' visible masks."""
        width, height = self.scene.size
        mask = np.zeros((height, width), dtype=bool)
        for index in self.expression.targets:
            mask |= self.scene.masks[index]
        return mask.astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Scenes


def _image_size(rng: random.Random) -> tuple[int, int]:
    """(width, height) in [MIN_SIDE, MAX_SIDE]: a third near-square, a third wide, a third tall."""
    layout = rng.choice(("square", "wide", "tall"))
    long_side = rng.randint(160, MAX_SIDE)
    aspect = rng.uniform(1.0, 1.25) if layout == "square" else rng.uniform(1.4, 3.0)
    short_side = max(MIN_SIDE, round(long_side / aspect))
    wide = layout == "wide" or (layout == "square" and rng.random() < 0.5)
    return (long_side, short_side) if wide else (short_side, long_side)


def _pale_colour(rng: random.Random) -> np.ndarray:
    """A light, barely saturated colour, far from every shape colour."""
    grey = rng.randint(185, 245)
    return np.array([min(255, max(0, grey + rng.randint(-12, 12))) for _ in range(3)], dtype=np.float32)


def _pale_background(rng: random.Random, width: int, height: int) -> np.ndarray:
    """float `[H, W, 3]`: a plain, gradient or noisy pale background (RefShapes' only family before v2)."""
    style = rng.choice(("plain", "gradient", "noise"))
    base = _pale_colour(rng)
    pixels = np.broadcast_to(base, (height, width, 3)).copy()
    if style == "gradient":
        pixels += _ramp(rng, width, height)[..., None] * (_pale_colour(rng) - base)
    elif style == "noise":
        noise = np.random.default_rng(rng.getrandbits(63)).integers(-8, 9, (height, width, 1))
        pixels += noise
    return pixels


def _ramp(rng: random.Random, width: int, height: int) -> np.ndarray:
    """`[H, W]` from 0 to 1: horizontal, vertical or diagonal."""
    xs, ys = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    return {"horizontal": xs, "vertical": ys, "diagonal": (xs + ys) / 2}[
        rng.choice(("horizontal", "vertical", "diagonal"))
    ]


def _far_colour(rng: random.Random, family: str) -> np.ndarray:
    """A background colour of `family` ("pale", "dark", "mid" or "saturated") at least `BACKGROUND_DISTANCE` (RGB)
    from every shape colour, so that every shape stays visible."""
    for _ in range(100):
        if family == "saturated":
            hue, value = rng.random(), rng.uniform(0.45, 1.0)
            colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), value), dtype=np.float32) * 255
        else:
            low, high = {"pale": (185, 245), "dark": (5, 75), "mid": (85, 175)}[family]
            grey = rng.randint(low, high)
            colour = np.array([min(255, max(0, grey + rng.randint(-15, 15))) for _ in range(3)], dtype=np.float32)
        if min(np.linalg.norm(colour - np.array(rgb)) for rgb in COLOURS.values()) >= BACKGROUND_DISTANCE:
            return colour
    raise RuntimeError(f"No {family} background colour far from the shape colours in 100 tries.")


def _any_colour(rng: random.Random) -> np.ndarray:
    return _far_colour(rng, rng.choice(("pale", "dark", "mid", "saturated")))


def _background(rng: random.Random, width: int, height: int, families: tuple[str, ...] = ("pale",)) -> np.ndarray:
    """uint8 `[H, W, 3]`: a background of one of `families` (see `BACKGROUND_FAMILIES`)."""
    family = rng.choice(families) if len(families) > 1 else families[0]
    if family == "pale":
        pixels = _pale_background(rng, width, height)
    elif family in ("dark", "mid", "saturated"):
        pixels = np.broadcast_to(_far_colour(rng, family), (height, width, 3)).copy()
    elif family == "gradient":
        first, second = _any_colour(rng), _any_colour(rng)
        pixels = first + _ramp(rng, width, height)[..., None] * (second - first)
    elif family == "noise":
        spread = rng.randint(15, 45)
        noise = np.random.default_rng(rng.getrandbits(63)).integers(-spread, spread + 1, (height, width, 3))
        pixels = _any_colour(rng) + noise
    elif family == "texture":
        first, second = _any_colour(rng), _any_colour(rng)
        period = rng.randint(4, 24)
        ys, xs = np.mgrid[:height, :width]
        pattern = rng.choice(("vertical", "horizontal", "diagonal", "checks"))
        phase = {"vertical": xs, "horizontal": ys, "diagonal": xs + ys, "checks": None}[pattern]
        stripes = (phase // period) % 2 if phase is not None else (xs // period + ys // period) % 2
        pixels = np.where(stripes[..., None] == 1, second, first)
    else:
        raise ValueError(f"Unknown background family {family!r}; choose from {BACKGROUND_FAMILIES}.")
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _place_shapes(rng: random.Random, width: int, height: int, tiny: bool = False) -> list[PlacedShape]:
    """Up to a random 2-6 shapes, inside the image, their bounding discs overlapping a little at most; radii drawn
    from the small and large ranges (and with `tiny` the tiny one too).

    Each scene draws from 2-4 colours and 2-4 forms so that groups (several red shapes, several circles) are common.
    """
    ranges = (SMALL_RADIUS, LARGE_RADIUS, TINY_RADIUS) if tiny else (SMALL_RADIUS, LARGE_RADIUS)
    colours = rng.sample(list(COLOURS), rng.randint(2, 4))
    forms = rng.sample(FORMS, rng.randint(2, 4))
    short_side = min(width, height)
    shapes: list[PlacedShape] = []
    for _ in range(rng.randint(MIN_SHAPES, MAX_SHAPES)):
        for _attempt in range(PLACEMENT_ATTEMPTS):
            radius = max(MIN_RADIUS, short_side * rng.uniform(*rng.choice(ranges)))
            center = (rng.uniform(radius + 1, width - radius - 2), rng.uniform(radius + 1, height - radius - 2))
            if all(math.dist(center, other.center) >= SEPARATION * (radius + other.radius) for other in shapes):
                shapes.append(PlacedShape(rng.choice(forms), rng.choice(colours), center, radius))
                break
    return shapes


def _star_vertices(x: float, y: float, r: float) -> list[tuple[float, float]]:
    """Five-pointed star, one point up."""
    points = []
    for k in range(10):
        angle = -math.pi / 2 + k * math.pi / 5
        reach = r if k % 2 == 0 else r * STAR_INNER
        points.append((x + reach * math.cos(angle), y + reach * math.sin(angle)))
    return points


def _cross_vertices(x: float, y: float, r: float) -> list[tuple[float, float]]:
    """Plus sign with arms reaching the bounding disc."""
    w = r * CROSS_HALF_WIDTH
    quarter = [(w, -r), (w, -w), (r, -w)]  # top arm's right edge to right arm's top edge
    points = []
    for turn in range(4):  # rotate the quarter by 90 degrees four times
        for dx, dy in quarter:
            for _ in range(turn):
                dx, dy = -dy, dx
            points.append((x + dx, y + dy))
    return points


def _polygon_vertices(form: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    if form == "square":
        h = r * SQUARE_HALF_SIDE
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if form == "diamond":
        w = r * DIAMOND_HALF_WIDTH
        return [(x, y - r), (x + w, y), (x, y + r), (x - w, y)]
    if form == "triangle":
        half_base, base_y = r * TRIANGLE_HALF_BASE, y + r * TRIANGLE_BASE_Y
        return [(x, y - r), (x + half_base, base_y), (x - half_base, base_y)]
    if form == "star":
        return _star_vertices(x, y, r)
    if form == "cross":
        return _cross_vertices(x, y, r)
    raise ValueError(f"Unknown shape form {form!r}; choose one of {FORMS}.")


def rasterise_shape(shape: PlacedShape, width: int, height: int) -> np.ndarray:
    """bool `[height, width]`: every pixel the shape covers, drawn alone and without anti-aliasing."""
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    x, y = shape.center
    r = shape.radius
    if shape.form in ("circle", "ring"):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=1)
        if shape.form == "ring":
            inner = r * RING_INNER
            draw.ellipse((x - inner, y - inner, x + inner, y + inner), fill=0)
    else:
        draw.polygon(_polygon_vertices(shape.form, x, y, r), fill=1)
    return np.array(canvas, dtype=bool)


def render_scene(shapes: list[PlacedShape], background: np.ndarray) -> Scene:
    """Paint `shapes` in order over `background` (uint8 `[H, W, 3]`) and compute their visible masks."""
    height, width = background.shape[:2]
    pixels = background.copy()
    full = np.stack([rasterise_shape(shape, width, height) for shape in shapes])
    for shape, mask in zip(shapes, full):
        pixels[mask] = COLOURS[shape.colour]
    visible = full.copy()
    covered = np.zeros((height, width), dtype=bool)
    for index in range(len(shapes) - 1, -1, -1):  # topmost first
        visible[index] &= ~covered
        covered |= full[index]
    areas = visible.sum(axis=(1, 2))
    ys, xs = np.mgrid[:height, :width]
    centroids = np.stack([(visible * xs).sum(axis=(1, 2)), (visible * ys).sum(axis=(1, 2))], axis=1)
    centroids = centroids / np.maximum(areas, 1)[:, None]
    return Scene(Image.fromarray(pixels, "RGB"), tuple(shapes), visible, areas, centroids, full.sum(axis=(1, 2)))


def make_scene(rng: random.Random, backgrounds: tuple[str, ...] = ("pale",), tiny_shapes: bool = False) -> Scene:
    """A random scene of 2-6 shapes, each keeping at least `MIN_VISIBLE` of its pixels after occlusion, on a
    background of one of the `backgrounds` families (with `tiny_shapes`, a third of the shapes tiny)."""
    for _ in range(LAYOUT_ATTEMPTS):
        width, height = _image_size(rng)
        background = _background(rng, width, height, backgrounds)
        shapes = _place_shapes(rng, width, height, tiny_shapes)
        if len(shapes) < MIN_SHAPES:
            continue
        scene = render_scene(shapes, background)
        if np.all(scene.areas >= MIN_VISIBLE * scene.full_areas):
            return scene
    raise RuntimeError(f"Could not lay out a scene in {LAYOUT_ATTEMPTS} tries.")


# ----------------------------------------------------------------------------------------------------------------
# Meaning: each helper returns the referent, or None when the scene does not make it unambiguous.


def _groups(scene: Scene) -> list[Group]:
    """Every group that selects at least one shape: "shape", each colour, each form, each colour and form."""
    colours = [c for c in COLOURS if any(s.colour == c for s in scene.shapes)]
    forms = [f for f in FORMS if any(s.form == f for s in scene.shapes)]
    groups = [Group(), *(Group(colour=c) for c in colours), *(Group(form=f) for f in forms)]
    groups += [Group(c, f) for c in colours for f in forms]
    return [group for group in groups if group.members(scene)]


def extreme_member(scene: Scene, members: tuple[int, ...], direction: str) -> int | None:
    """The member furthest towards `direction`, at least `POSITION_MARGIN` of the image side ahead of the next."""
    if len(members) < 2:
        return None
    axis, sign = DIRECTIONS[direction]
    ranked = sorted(members, key=lambda i: sign * scene.centroids[i, axis], reverse=True)
    lead = sign * (scene.centroids[ranked[0], axis] - scene.centroids[ranked[1], axis])
    return ranked[0] if lead >= POSITION_MARGIN * scene.size[axis] else None


def size_extreme_member(
    scene: Scene, members: tuple[int, ...], largest: bool, area_ratio: float, radius_ratio: float
) -> int | None:
    """The largest (or smallest) member, ahead of every other by `area_ratio` in visible area and by
    `radius_ratio` in extent, so that both pixel count and apparent size agree."""
    if len(members) < 2:
        return None
    radii = {i: scene.shapes[i].radius for i in members}

    def ratio(big: float, small: float) -> float:
        return big / small if largest else small / big

    best = max(members, key=lambda i: scene.areas[i] if largest else -scene.areas[i])
    others = [i for i in members if i != best]
    if all(
        ratio(scene.areas[best], scene.areas[i]) >= area_ratio and ratio(radii[best], radii[i]) >= radius_ratio
        for i in others
    ):
        return best
    return None


def related_member(scene: Scene, members: tuple[int, ...], anchor: int, direction: str) -> int | None:
    """The only member beyond the anchor's edge towards `direction` and more in that direction than across it
    (within 45 degrees), every other member lying on the far side of the anchor's centre."""
    if len(members) < 2 or anchor in members:
        return None
    axis, sign = DIRECTIONS[direction]
    offsets = scene.centroids - scene.centroids[anchor]
    along = {i: sign * offsets[i, axis] for i in members}
    beyond = [i for i in members if along[i] > scene.shapes[anchor].radius and along[i] >= abs(offsets[i, 1 - axis])]
    if len(beyond) == 1 and all(along[i] < 0 for i in members if i != beyond[0]):
        return beyond[0]
    return None


# ----------------------------------------------------------------------------------------------------------------
# Expressions: every unambiguous expression of a kind for a scene.


def _colour_shape_expressions(scene: Scene) -> list[Expression]:
    expressions = []
    for group in _groups(scene):
        members = group.members(scene)
        if group.colour and group.form and len(members) == 1:
            expressions.append(Expression(group.singular, "colour_shape", members, members))
    return expressions


def _no_target_expressions(scene: Scene) -> list[Expression]:
    """Absent colour-and-form pairs sharing the colour or the form of a shape in the scene (hard negatives)."""
    present = {(s.colour, s.form) for s in scene.shapes}
    colours = {s.colour for s in scene.shapes}
    forms = {s.form for s in scene.shapes}
    return [
        Expression(Group(colour, form).singular, "no_target", (), ())
        for colour in COLOURS
        for form in FORMS
        if (colour, form) not in present and (colour in colours or form in forms)
    ]


def _position_expressions(scene: Scene) -> list[Expression]:
    expressions = []
    for group in _groups(scene):
        members = group.members(scene)
        for direction in DIRECTIONS:
            target = extreme_member(scene, members, direction)
            if target is None:
                continue
            templates = SUPERLATIVE_POSITIONS[direction] + (PAIR_POSITIONS[direction] if len(members) == 2 else ())
            expressions += [
                Expression(t.format(group=group.singular), "position", (target,), members, direction=direction)
                for t in templates
            ]
    return expressions


def _size_expressions(scene: Scene) -> list[Expression]:
    expressions = []
    for group in _groups(scene):
        members = group.members(scene)
        for (largest, superlative), templates in SIZE_PHRASES.items():
            if superlative:
                ratios = (SUPERLATIVE_AREA_RATIO, SUPERLATIVE_RADIUS_RATIO)
            else:
                ratios = (ADJECTIVE_AREA_RATIO, ADJECTIVE_RADIUS_RATIO)
            target = size_extreme_member(scene, members, largest, *ratios)
            if target is not None:
                expressions += [
                    Expression(t.format(group=group.singular), "size", (target,), members) for t in templates
                ]
    return expressions


def _relation_expressions(scene: Scene) -> list[Expression]:
    groups = _groups(scene)
    anchors = [(g, g.members(scene)[0]) for g in groups if g.form and len(g.members(scene)) == 1]
    expressions = []
    for group in groups:
        for anchor_group, anchor in anchors:
            members = tuple(i for i in group.members(scene) if i != anchor)
            for direction, templates in RELATIONS.items():
                target = related_member(scene, members, anchor, direction)
                if target is None:
                    continue
                expressions += [
                    Expression(
                        t.format(group=group.singular, anchor=anchor_group.singular), "relation", (target,), members,
                        anchor, direction,
                    )
                    for t in templates
                ]
    return expressions


def _multi_target_expressions(scene: Scene) -> list[Expression]:
    expressions = []
    for group in _groups(scene):
        members = group.members(scene)
        if len(members) < 2:
            continue
        templates = MULTI_PHRASES + (PAIR_MULTI_PHRASES if len(members) == 2 else ())
        expressions += [Expression(t.format(groups=group.plural), "multi_target", members, members) for t in templates]
    return expressions


def _reasoning_expressions(scene: Scene) -> list[Expression]:
    expressions = []
    for group in _groups(scene):
        members = group.members(scene)
        if len(members) != 1:
            continue
        if group.form and not (group.colour and len(Group(form=group.form).members(scene)) == 1):
            subject = Group(colour=group.colour).singular  # "shape" or "red shape"; the form is the riddle
            templates = FORM_RIDDLES[group.form]
            expressions += [Expression(t.format(subject=subject), "reasoning", members, members) for t in templates]
        if group.colour and not (group.form and len(Group(colour=group.colour).members(scene)) == 1):
            subject = Group(form=group.form).singular  # "shape" or "circle"; the colour is the riddle
            text = COLOUR_RIDDLE_TEMPLATE.format(subject=subject, thing=COLOUR_RIDDLES[group.colour])
            expressions.append(Expression(text, "reasoning", members, members))
    everything = tuple(range(len(scene.shapes)))
    for largest, templates in SIZE_RIDDLES.items():
        target = size_extreme_member(scene, everything, largest, SUPERLATIVE_AREA_RATIO, SUPERLATIVE_RADIUS_RATIO)
        if target is not None:
            expressions += [Expression(t, "reasoning", (target,), everything) for t in templates]
    return expressions


EXPRESSION_BUILDERS = {
    "colour_shape": _colour_shape_expressions,
    "position": _position_expressions,
    "size": _size_expressions,
    "relation": _relation_expressions,
    "multi_target": _multi_target_expressions,
    "no_target": _no_target_expressions,
    "reasoning": _reasoning_expressions,
}


def scene_expressions(scene: Scene, kind: str, directions: tuple[str, ...] = ALL_DIRECTIONS) -> list[Expression]:
    """Every unambiguous expression of `kind` (one of `EXPRESSION_KINDS`) for `scene`, in a fixed order; position
    and relation expressions only towards `directions` (keys of `DIRECTIONS`)."""
    if kind not in EXPRESSION_BUILDERS:
        raise ValueError(f"Unknown expression kind {kind!r}; choose one of {EXPRESSION_KINDS}.")
    return [e for e in EXPRESSION_BUILDERS[kind](scene) if e.direction is None or e.direction in directions]


def opposite_expression(
    scene: Scene, expression: Expression, directions: tuple[str, ...] = ALL_DIRECTIONS
) -> Expression | None:
    """The expression of `scene` that asks the same as `expression` (same kind, group and anchor) towards the
    opposite direction and refers to another shape ("rightmost red circle" for "leftmost red circle": of those, the
    one with the fewest words changed), or `None` (no direction, the opposite not among `directions`, or no such
    unambiguous expression in the scene)."""
    if expression.direction is None:
        return None
    opposite = OPPOSITE_DIRECTIONS[expression.direction]
    candidates = [
        e for e in scene_expressions(scene, expression.kind, directions)
        if e.direction == opposite and e.group == expression.group and e.anchor == expression.anchor
        and e.targets != expression.targets
    ]  # fmt: skip
    words = set(split_words(expression.text))
    return min(candidates, key=lambda e: len(words ^ set(split_words(e.text))), default=None)


def _check_kind_weights(kind_weights: Mapping[str, float] | None) -> dict[str, float]:
    """`DEFAULT_KIND_WEIGHTS` updated with `kind_weights`, validated."""
    weights = dict(DEFAULT_KIND_WEIGHTS)
    if kind_weights is not None:
        unknown = sorted(set(kind_weights) - set(EXPRESSION_KINDS))
        if unknown:
            raise ValueError(f"Unknown expression kinds {unknown} in kind_weights; choose from {EXPRESSION_KINDS}.")
        weights.update(kind_weights)
    if any(weight < 0 for weight in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"kind_weights must be non-negative with a positive sum, got {weights}.")
    return weights


def generate_example(
    rng: random.Random,
    kind_weights: Mapping[str, float] | None = None,
    backgrounds: tuple[str, ...] = ("pale",),
    tiny_shapes: bool = False,
    directions: tuple[str, ...] = ALL_DIRECTIONS,
) -> RefShapesExample:
    """Draw an expression kind by `kind_weights` (missing kinds keep `DEFAULT_KIND_WEIGHTS`; 0 disables a kind),
    then scenes (on `backgrounds`) until one admits an unambiguous expression of that kind (towards `directions`
    for position and relation), and one of its expressions."""
    weights = _check_kind_weights(kind_weights)
    kind = rng.choices(list(weights), weights=list(weights.values()))[0]
    for _ in range(MAX_SCENES):
        scene = make_scene(rng, backgrounds, tiny_shapes)
        expressions = scene_expressions(scene, kind, directions)
        if expressions:
            return RefShapesExample(scene, rng.choice(expressions))
    raise RuntimeError(f"No scene out of {MAX_SCENES} admitted a {kind!r} expression.")


def more_expressions(
    scene: Scene,
    first: Expression,
    count: int,
    rng: random.Random,
    kind_weights: Mapping[str, float] | None = None,
    directions: tuple[str, ...] = ALL_DIRECTIONS,
) -> list[Expression]:
    """Up to `count` further expressions for `scene`, each with a kind drawn by `kind_weights` among the kinds the
    scene still has unused expressions of (towards `directions` for position and relation), and no two with the
    same text or the same text as `first`."""
    weights = _check_kind_weights(kind_weights)
    used = {first.text}
    candidates = {kind: scene_expressions(scene, kind, directions) for kind, weight in weights.items() if weight > 0}
    chosen = []
    for _ in range(count):
        for kind in candidates:
            candidates[kind] = [e for e in candidates[kind] if e.text not in used]
        kinds = [kind for kind in candidates if candidates[kind]]
        if not kinds:
            break
        kind = rng.choices(kinds, weights=[weights[kind] for kind in kinds])[0]
        expression = rng.choice(candidates[kind])
        used.add(expression.text)
        chosen.append(expression)
    return chosen


def vocabulary() -> list[str]:
    """Every word that can appear in an expression (split as `split_words` does, case kept), sorted."""
    nouns = [*COLOURS, *FORMS, *PLURALS.values()]
    templates = [
        *(t for ts in SUPERLATIVE_POSITIONS.values() for t in ts),
        *(t for ts in PAIR_POSITIONS.values() for t in ts),
        *(t for ts in SIZE_PHRASES.values() for t in ts),
        *(t for ts in RELATIONS.values() for t in ts),
        *MULTI_PHRASES,
        *PAIR_MULTI_PHRASES,
        *(t for ts in FORM_RIDDLES.values() for t in ts),
        COLOUR_RIDDLE_TEMPLATE,
        *COLOUR_RIDDLES.values(),
        *(t for ts in SIZE_RIDDLES.values() for t in ts),
    ]
    fixed = " ".join(re.sub(r"\{\w+\}", " ", template) for template in templates)
    return sorted({*nouns, *split_words(fixed)})


# ----------------------------------------------------------------------------------------------------------------
# Dataset


class RefShapesDataset(torch.utils.data.Dataset):
    r"""
    Synthetic referring segmentation: lazily generated, deterministic sample dicts (see `modeling_selfie.data.sample`).

    Item `i` of a split comes from `random.Random(f"refshapes/{split}/{seed}/{i}")`: it does not depend on the
    access order, and the splits use unrelated seed streams.

    Args:
        split: "train", "validation" or "test".
        size: number of items.
        seed: seed of the split's stream.
        train: sample training prompt templates and answers (random, per item) rather than the validation ones;
            defaults to `split == "train"`.
        kind_weights: relative frequency of each expression kind (see `DEFAULT_KIND_WEIGHTS`, whose values fill in
            missing kinds; a weight of 0 disables a kind).
        max_turns: expressions (user turns, each answered with one `[SEG]`) per item, as the RefCOCO training
            samples of SELF1E hold up to 3 sentences of one image: the first as a single-turn item, the others
            (`more_expressions`) as many as the scene has, up to `max_turns - 1`. Several expressions of one image
            tell the model that the phrase, not the image, decides the mask.
        backgrounds: the background families drawn from (`BACKGROUND_FAMILIES`), each as likely; the default
            "pale" only keeps the splits as they were before the other families existed.
        tiny_shapes: also draw shapes of `TINY_RADIUS` (about one ViT patch across), a third of them.
        directions: the directions (keys of `DIRECTIONS`, or "left,top" text) that position and relation
            expressions may name. One direction per axis ("left,top") is a curriculum's first stage: a model can
            then lower the loss by where a shape lies without reading the direction word, and so learns where
            things are; a model trained on both directions from the start settles on answers that ignore the word
            (`docs/demo-model.md`).
        opposite_pairs: each odd item asks, where its even neighbour's first expression names a direction and the
            scene has one, the opposite expression of the same scene (`opposite_expression`), so that a batch read
            in order holds both answers ("leftmost" and "rightmost" of one group): their difference is what the
            direction word decides. Other odd items are drawn as usual.

    Each item holds `image` (PIL RGB), `conversation` (one user question and one assistant answer with one [SEG]
    per turn), `masks` (uint8 `[n_turns, H, W]`, empty for `no_target`), `task` "referring", `source` "refshapes",
    of the first turn, `query` (the expression), `query_kind` ("phrase" or "instruction") and `expression_kind` (one
    of `EXPRESSION_KINDS`), and `form_map` (`Scene.form_map`: each pixel's visible form, for training-only losses).
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 1000,
        seed: int = 0,
        train: bool | None = None,
        kind_weights: Mapping[str, float] | None = None,
        max_turns: int = 1,
        backgrounds: tuple[str, ...] | str = ("pale",),
        tiny_shapes: bool = False,
        directions: tuple[str, ...] | str = ALL_DIRECTIONS,
        opposite_pairs: bool = False,
    ):
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
        if size < 0:
            raise ValueError(f"size must be non-negative, got {size}.")
        self.split = split
        self.size = size
        self.seed = seed
        self.train = split == "train" if train is None else train
        self.kind_weights = _check_kind_weights(kind_weights)
        if not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"max_turns must be a positive int, got {max_turns!r}.")
        self.max_turns = max_turns
        self.backgrounds = check_backgrounds(backgrounds)
        self.tiny_shapes = tiny_shapes
        self.directions = check_directions(directions)
        self.opposite_pairs = opposite_pairs

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        index = operator.index(index)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"Index {index} out of range for a RefShapes {self.split} split of {self.size} items.")
        return random.Random(f"{SOURCE}/{self.split}/{self.seed}/{index}")

    def example(self, index: int) -> RefShapesExample:
        """The scene and (first) expression behind item `index`."""
        return self._example(self._rng(index), index)

    def _example(self, rng: random.Random, index: int) -> RefShapesExample:
        """With `opposite_pairs`, an odd item's opposite of its even neighbour's expression where there is one;
        else item `index`'s own draw from `rng` (its `_rng`)."""
        if self.opposite_pairs and index % 2 == 1:
            pair = self.example(index - 1)
            opposite = opposite_expression(pair.scene, pair.expression, self.directions)
            if opposite is not None:
                return RefShapesExample(pair.scene, opposite)
        return generate_example(rng, self.kind_weights, self.backgrounds, self.tiny_shapes, self.directions)

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        example = self._example(rng, index)
        expression = example.expression
        expressions = [expression]
        if self.max_turns > 1:
            expressions += more_expressions(
                example.scene, expression, self.max_turns - 1, rng, self.kind_weights, self.directions
            )
        prompt_rng = rng if self.train else None
        conversation = []
        for turn in expressions:
            conversation += [
                {"role": "user", "content": segmentation_question(turn.text, turn.query_kind, prompt_rng)},
                {"role": "assistant", "content": segmentation_answer(prompt_rng)},
            ]
        return {
            "image": example.scene.image,
            "conversation": conversation,
            "masks": np.stack([RefShapesExample(example.scene, turn).target_mask() for turn in expressions]),
            "task": "referring",
            "source": SOURCE,
            "query": expression.text,
            "query_kind": expression.query_kind,
            "expression_kind": expression.kind,
            "form_map": example.scene.form_map(),
        }

    def __repr__(self) -> str:
        return (
            f"RefShapesDataset(split={self.split!r}, size={self.size}, seed={self.seed}, train={self.train}, "
            f"max_turns={self.max_turns}, backgrounds={self.backgrounds}, tiny_shapes={self.tiny_shapes}, "
            f"directions={self.directions}, opposite_pairs={self.opposite_pairs})"
        )


# Words outside `vocabulary()` and the prompt templates: a word-level model reads each as <unk>.
UNKNOWN_WORDS = ("pink", "cat", "oval", "hexagon", "smaller", "dog", "car", "blob", "кот", "円")
PRESENCE_PROBE_KINDS = ("right", "absent", "unknown")


@dataclass(frozen=True)
class PresenceProbe:
    """A query whose referent is in the image (`present`) or not, to score presence scores.

    Attributes:
        image: the scene's image.
        text: the query.
        query_kind: "phrase" or "instruction".
        kind: one of `PRESENCE_PROBE_KINDS`: "right" (an expression with a target), "absent" (its target is not
            in the scene) or "unknown" (a right expression with one word swapped for one of `UNKNOWN_WORDS`).
    """

    image: Image.Image
    text: str
    query_kind: str
    kind: str

    @property
    def present(self) -> bool:
        return self.kind == "right"


def _swap_word(words: list[str], choices: dict[str, list[str]], rng: random.Random) -> list[str] | None:
    """`words` with its first word that is a key of `choices` replaced by one of that key's choices, or `None`."""
    at = next((i for i, word in enumerate(words) if choices.get(word)), None)
    return None if at is None else [*words[:at], rng.choice(choices[words[at]]), *words[at + 1 :]]


def presence_probes(
    split: str = "test", size: int = 500, seed: int = 0, backgrounds="pale", tiny_shapes: bool = False
) -> list[PresenceProbe]:
    """Right, absent and unknown-word queries on `size` scenes of a RefShapes split, deterministic in
    (`split`, `size`, `seed`, `backgrounds`, `tiny_shapes`).

    Scene `i` is item `i` of `RefShapesDataset(split, size, seed, backgrounds=..., tiny_shapes=...)` drawn without
    `no_target` expressions. Every
    absent query comes with a right query of the same wording, so the wording alone tells nothing:

    * one of the scene's `colour_shape` expressions ("right") and one of its `no_target` expressions ("absent", a
      colour and form pair sharing the colour or the form of a shape), when it has both;
    * the item's expression ("right") and the same expression with its first colour word swapped for a colour the
      scene lacks, or else its first form word for a form the scene lacks ("absent"), when it has such a word;
    * and that expression with one word swapped for one of `UNKNOWN_WORDS` ("unknown").
    """
    dataset = RefShapesDataset(split, size, seed, kind_weights={"no_target": 0.0}, backgrounds=backgrounds,
                               tiny_shapes=tiny_shapes)
    probes = []
    for index in range(size):
        example = dataset.example(index)
        scene, expression = example.scene, example.expression
        rng = random.Random(f"{SOURCE}-presence/{split}/{seed}/{index}")
        queries = []
        named, absent = scene_expressions(scene, "colour_shape"), scene_expressions(scene, "no_target")
        if named and absent:
            queries += [(rng.choice(named).text, "phrase", "right"), (rng.choice(absent).text, "phrase", "absent")]
        words = expression.text.split(" ")
        colours, forms = {shape.colour for shape in scene.shapes}, {shape.form for shape in scene.shapes}
        lacking = {colour: [c for c in COLOURS if c not in colours] for colour in COLOURS}
        lacking.update({form: [f for f in FORMS if f not in forms] for form in FORMS})
        lacking.update({PLURALS[form]: [PLURALS[f] for f in FORMS if f not in forms] for form in FORMS})
        swapped = _swap_word(words, {w: c for w, c in lacking.items() if w in COLOURS}, rng) or _swap_word(
            words, {w: c for w, c in lacking.items() if w not in COLOURS}, rng
        )
        if swapped:
            queries += [(expression.text, expression.query_kind, "right"),
                        (" ".join(swapped), expression.query_kind, "absent")]
        at = rng.randrange(len(words))
        unknown = [*words[:at], rng.choice(UNKNOWN_WORDS), *words[at + 1 :]]
        queries.append((" ".join(unknown), expression.query_kind, "unknown"))
        probes += [PresenceProbe(scene.image, text, query_kind, kind) for text, query_kind, kind in queries]
    return probes


def _check_names(names: tuple[str, ...] | str, choices: tuple[str, ...], what: str) -> tuple[str, ...]:
    """`names` ("all", "a,b" or a sequence) as a non-empty tuple of `choices`, or a ValueError naming `what`."""
    if isinstance(names, str):
        names = choices if names == "all" else tuple(names.split(","))
    names = tuple(name.strip() for name in names)
    unknown = [name for name in names if name not in choices]
    if unknown or not names:
        raise ValueError(f"Unknown {what} {unknown}; choose from {choices} or 'all'.")
    return names


def check_backgrounds(backgrounds: tuple[str, ...] | str) -> tuple[str, ...]:
    """Background families as a tuple: "all", "pale,dark" or a sequence of names, each in `BACKGROUND_FAMILIES`."""
    return _check_names(backgrounds, BACKGROUND_FAMILIES, "background families")


def check_directions(directions: tuple[str, ...] | str) -> tuple[str, ...]:
    """Directions as a tuple: "all", "left,top" or a sequence of names, each in `ALL_DIRECTIONS`."""
    return _check_names(directions, ALL_DIRECTIONS, "directions")


def parse_kind_weights(text: str) -> dict[str, float]:
    """`"colour_shape=2,multi_target"` -> `{"colour_shape": 2.0, "multi_target": 1.0}` and 0 for every other kind."""
    weights = dict.fromkeys(EXPRESSION_KINDS, 0.0)
    for item in text.split(","):
        kind, _, weight = item.strip().partition("=")
        if kind not in EXPRESSION_KINDS:
            raise ValueError(f"Unknown expression kind {kind!r}; choose from {EXPRESSION_KINDS}.")
        weights[kind] = float(weight or 1)
    return weights


def curriculum_dataset(
    size: int,
    warmup_fraction: float,
    warmup_kinds: Mapping[str, float],
    seed: int = 0,
    max_turns: int = 1,
    kind_weights: Mapping[str, float] | None = None,
    backgrounds: tuple[str, ...] | str = ("pale",),
    tiny_shapes: bool = False,
    directions: tuple[str, ...] | str = ALL_DIRECTIONS,
    opposite_pairs: bool = False,
) -> torch.utils.data.ConcatDataset:
    """`size` training items of up to `max_turns` expressions: the first `warmup_fraction` of them of the
    `warmup_kinds` only (their own seed stream), the rest of the full mix (`kind_weights`, by default
    `DEFAULT_KIND_WEIGHTS`), position and relation expressions towards `directions` only (and the full mix with
    `opposite_pairs`, see `RefShapesDataset`; the warmup part then has an even length, so that with an even batch
    size each pair lies in one batch). Read it in order (e.g.
    `TrainingArguments(train_sampling_strategy="sequential")`).

    From scratch on the full mix a small model sits on a plateau where it segments every shape and ignores the
    phrase; expressions that name colours and forms first get it to read the phrase."""
    if not 0 <= warmup_fraction <= 1:
        raise ValueError(f"warmup_fraction must be in [0, 1], got {warmup_fraction}.")
    first = int(size * warmup_fraction)
    first -= first % 2 * opposite_pairs
    return torch.utils.data.ConcatDataset(
        [
            RefShapesDataset(
                "train", size=first, seed=seed + 1000, kind_weights=warmup_kinds, max_turns=max_turns,
                backgrounds=backgrounds, tiny_shapes=tiny_shapes, directions=directions,
            ),
            RefShapesDataset(
                "train", size=size - first, seed=seed, kind_weights=kind_weights, max_turns=max_turns,
                backgrounds=backgrounds, tiny_shapes=tiny_shapes, directions=directions,
                opposite_pairs=opposite_pairs,
            ),
        ]
    )


# ----------------------------------------------------------------------------------------------------------------
# Documentation helper


def _overlay(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The image with everything outside `mask` faded towards white."""
    pixels = np.asarray(image, dtype=np.float32)
    faded = pixels * 0.3 + 255 * 0.7
    return Image.fromarray(np.where(mask[..., None].astype(bool), pixels, faded).astype(np.uint8), "RGB")


def render_example_grid(dataset, n: int, path: str | Path, columns: int = 4, cell_size: int = 200) -> Image.Image:
    """Write a PNG contact sheet of the first `n` samples of `dataset` and return it.

    Each cell shows the image fitted into `cell_size` pixels with everything outside the target mask faded, and
    under it the expression kind and the query. Works with any dataset of sample dicts that carry `query`.
    """
    if not 0 < n <= len(dataset):
        raise ValueError(f"n must be in [1, {len(dataset)}], got {n}.")
    font = ImageFont.load_default()
    caption_lines, line_height = 3, 14
    cell_w, cell_h = cell_size, cell_size + caption_lines * line_height + 6
    rows = math.ceil(n / columns)
    sheet = Image.new("RGB", (min(n, columns) * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        sample = dataset[i]
        image = _overlay(sample["image"], sample["masks"].max(axis=0))
        image.thumbnail((cell_size - 8, cell_size - 8), Image.Resampling.NEAREST)
        left, top = (i % columns) * cell_w, (i // columns) * cell_h
        sheet.paste(image, (left + (cell_w - image.width) // 2, top + (cell_size - image.height) // 2))
        kind = sample.get("expression_kind", sample.get("query_kind", ""))
        caption = textwrap.wrap(f"[{kind}] {sample['query']}", width=cell_w // 6)[:caption_lines]
        for line_index, line in enumerate(caption):
            draw.text((left + 4, top + cell_size + line_index * line_height), line, fill="black", font=font)
    sheet.save(path, format="PNG")
    return sheet


__all__ = [
    "ALL_DIRECTIONS",
    "COLOURS",
    "DEFAULT_KIND_WEIGHTS",
    "EXPRESSION_KINDS",
    "FORMS",
    "Expression",
    "Group",
    "PlacedShape",
    "PresenceProbe",
    "RefShapesDataset",
    "RefShapesExample",
    "SPLITS",
    "Scene",
    "check_directions",
    "curriculum_dataset",
    "extreme_member",
    "generate_example",
    "make_scene",
    "more_expressions",
    "opposite_expression",
    "parse_kind_weights",
    "presence_probes",
    "rasterise_shape",
    "related_member",
    "render_example_grid",
    "render_scene",
    "scene_expressions",
    "size_extreme_member",
    "split_words",
    "vocabulary",
]
