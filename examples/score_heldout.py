"""Score a shapes model on held-out scenes drawn by this script's own renderer (not RefShapes' code).

    python examples/score_heldout.py                      # the shipped model, 384 expressions, seed 0
    python examples/score_heldout.py --model outputs/models/demo --json heldout.json --markdown heldout.md

The scenes are drawn here, independently of `modeling_selfie.data.refshapes`: shapes are rendered 4x larger and
reduced (anti-aliased edges; a pixel belongs to a shape when it covers half of it), their colours are the named
colours jittered by up to 14 per channel, and the backgrounds come in seven families - pale, dark, mid-grey,
saturated, gradient, noise, texture (checks, stripes, dots, grid lines) - every background colour at least 100
(RGB distance) from every shape colour. Half of the expressions are on pale backgrounds, half spread over the
other six families. The expressions use only the model's words:

    colour_shape   "red circle"                the only red circle
    position       "leftmost blue shape"       the member of a group furthest that way, by 15% of the side
    size           "largest star"              the member of a group at least 1.6x the area of every other
    relation       "circle left of the red square"   the only member beyond the anchor that way, others behind it

It reports cIoU / gIoU overall, per kind, per background family (and colour_shape per family), the colour-match
baseline (every shape of the colour the expression names, or every shape when it names none, as the model card
defines it), the AUROC of each score the model returns for (IoU >= 0.5) against (IoU < 0.5), and, for the
colour_shape expressions, where the answers lose: per answer one of

    right           IoU >= 0.5
    empty           nothing segmented
    both            the target and a same-colour shape, each at least half covered
    wrong shape     most of the answer on another shape of the named colour
    other colour    most of the answer on a shape of another colour
    poor outline    most of the answer on the target, IoU < 0.5 (too little of it, or spilling over)
    background      most of the answer on the background

per target size in ViT patches (the shape's diameter once the image is resized to its tiles, over the patch side)
and per background family; and for the position and relation expressions, per answer one of

    right           IoU >= 0.5
    empty           nothing segmented
    group           the target and another member of the named group, each at least half covered
    opposite        most of the answer on the shape the opposite direction word names
    other member    most of the answer on another member of the group
    anchor          most of the answer on the relation's anchor ("the red square" of "circle left of the red square")
    outside group   most of the answer on a shape outside the group
    poor outline    most of the answer on the target, IoU < 0.5
    background      most of the answer on the background

`--json` writes every figure and the per-expression records; `--markdown` the tables.
"""

import argparse
import colorsys
import json
import math
import random
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from modeling_selfie import SelfieForSegmentation, SelfieProcessor
from modeling_selfie.evaluation import ReferringMetrics
from modeling_selfie.processing_selfie import select_tile_grid

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "modeling_selfie" / "pretrained" / "selfie-refshapes"
KINDS = ("colour_shape", "position", "size", "relation")
FAMILIES = ("pale", "dark", "mid", "saturated", "gradient", "noise", "texture")
NAMED = {
    "red": (220, 40, 35), "green": (40, 155, 65), "blue": (40, 85, 210),
    "yellow": (235, 200, 40), "purple": (130, 60, 170), "orange": (240, 125, 30),
}  # fmt: skip
FORMS = ("circle", "square", "triangle", "star", "ring", "diamond", "cross")
SUPERSAMPLE = 4
MIN_DISTANCE = 100.0  # RGB distance of every background colour from every shape colour
POSITION_MARGIN = 0.15
SIZE_RATIO = 1.6
OUTCOMES = ("right", "empty", "both", "wrong shape", "other colour", "poor outline", "background")
DIRECTION_OUTCOMES = ("right", "empty", "group", "opposite", "other member", "anchor", "outside group",
                      "poor outline", "background")  # fmt: skip
SIZE_BINS = ((0, 1.5), (1.5, 2.5), (2.5, 4), (4, 99))  # target diameter in ViT patches


@dataclass
class Shape:
    form: str
    colour: str
    x: float
    y: float
    r: float


@dataclass
class Item:
    """One held-out expression on its scene; a position or relation expression also keeps its `direction` (a key
    of `DIRECTIONS`), the members of the group it chooses among and, for a relation, its anchor."""

    image: Image.Image
    shapes: list[Shape]
    masks: np.ndarray  # bool [n, H, W]
    family: str
    kind: str
    text: str
    targets: tuple[int, ...]
    direction: str | None = None
    group: tuple[int, ...] = ()
    anchor: int | None = None


# ----------------------------------------------------------------------------------------------------------------
# Drawing


def _outline(form: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of the polygonal forms, centred on (x, y) inside a disc of radius r."""
    if form == "square":
        h = r * 0.75
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if form == "diamond":
        return [(x, y - r), (x + 0.65 * r, y), (x, y + r), (x - 0.65 * r, y)]
    if form == "triangle":
        return [(x + r * math.cos(a), y + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if form == "star":
        return [
            (x + (r if k % 2 == 0 else 0.42 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
             y + (r if k % 2 == 0 else 0.42 * r) * math.sin(-math.pi / 2 + k * math.pi / 5))
            for k in range(10)
        ]  # fmt: skip
    raise ValueError(form)


def _draw_coverage(shape: Shape, width: int, height: int) -> np.ndarray:
    """float `[H, W]` in [0, 1]: the part of each pixel the shape covers, drawn `SUPERSAMPLE` times larger."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(canvas)
    x, y, r = shape.x * s, shape.y * s, shape.r * s
    if shape.form == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif shape.form == "ring":
        draw.ellipse((x - r, y - r, x + r, y + r), outline=255, width=max(1, round(0.42 * r)))
    elif shape.form == "cross":
        w = 0.3 * r
        draw.rectangle((x - w, y - r, x + w, y + r), fill=255)
        draw.rectangle((x - r, y - w, x + r, y + w), fill=255)
    else:
        draw.polygon(_outline(shape.form, x, y, r), fill=255)
    return np.asarray(canvas.resize((width, height), Image.Resampling.BOX), dtype=np.float32) / 255


def _far(colour: np.ndarray, shape_colours: list[np.ndarray]) -> bool:
    return min(float(np.linalg.norm(colour - c)) for c in shape_colours) >= MIN_DISTANCE


def _background_colour(rng: random.Random, tone: str, shape_colours: list[np.ndarray]) -> np.ndarray:
    for _ in range(500):
        if tone == "saturated":
            rgb = colorsys.hls_to_rgb(rng.random(), rng.uniform(0.3, 0.65), rng.uniform(0.65, 1.0))
            colour = np.array(rgb, dtype=np.float32) * 255
        else:
            level = {"pale": (190, 250), "dark": (0, 70), "mid": (90, 165)}[tone]
            tint = np.array([rng.uniform(-10, 10) for _ in range(3)], dtype=np.float32)
            colour = np.clip(rng.uniform(*level) + tint, 0, 255)
        if _far(colour, shape_colours):
            return colour
    raise RuntimeError(f"no {tone} background colour far from the shapes")


def _background(rng: random.Random, family: str, width: int, height: int, shape_colours) -> np.ndarray:
    """float `[H, W, 3]` of one background family."""
    ys, xs = np.mgrid[:height, :width].astype(np.float32)
    if family in ("pale", "dark", "mid", "saturated"):
        return np.broadcast_to(_background_colour(rng, family, shape_colours), (height, width, 3)).copy()
    tones = ("pale", "dark", "mid", "saturated")
    a = _background_colour(rng, rng.choice(tones), shape_colours)
    b = _background_colour(rng, rng.choice(tones), shape_colours)
    if family == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
        return a + t[..., None] * (b - a)
    if family == "noise":
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(10, 30), (height, width, 3))
        return np.clip(a + noise, 0, 255)
    if family == "texture":
        period = rng.randint(5, 20)
        style = rng.choice(("checks", "stripes", "dots", "grid"))
        if style == "checks":
            second = ((xs // period + ys // period) % 2).astype(bool)
        elif style == "stripes":
            second = ((xs + ys) // period % 2).astype(bool)
        elif style == "dots":
            second = np.hypot(xs % period - period / 2, ys % period - period / 2) < period / 4
        else:
            second = (xs % period < 2) | (ys % period < 2)
        return np.where(second[..., None], b, a)
    raise ValueError(family)


def draw_scene(rng: random.Random, family: str) -> tuple[Image.Image, list[Shape], np.ndarray]:
    """A scene of 2-6 non-overlapping shapes on a background of `family`: image, shapes, bool masks `[n, H, W]`."""
    width, height = rng.randint(128, 320), rng.randint(112, 288)
    short = min(width, height)
    colours = rng.sample(list(NAMED), rng.randint(2, 4))
    forms = rng.sample(FORMS, rng.randint(2, 4))
    shapes: list[Shape] = []
    for _ in range(rng.randint(2, 6)):
        for _attempt in range(50):
            r = rng.uniform(max(6.0, 0.06 * short), 0.22 * short)
            x, y = rng.uniform(r + 2, width - r - 2), rng.uniform(r + 2, height - r - 2)
            if all(math.hypot(x - s.x, y - s.y) > r + s.r + 3 for s in shapes):
                shapes.append(Shape(rng.choice(forms), rng.choice(colours), x, y, r))
                break
    paints = {name: np.clip(np.array(NAMED[name], np.float32) + [rng.uniform(-14, 14) for _ in range(3)], 0, 255)
              for name in NAMED}  # fmt: skip
    pixels = _background(rng, family, width, height, list(paints.values()))
    masks = []
    for shape in shapes:
        cover = _draw_coverage(shape, width, height)
        pixels = pixels * (1 - cover[..., None]) + paints[shape.colour] * cover[..., None]
        masks.append(cover >= 0.5)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return image, shapes, np.stack(masks)


# ----------------------------------------------------------------------------------------------------------------
# Expressions


def _group_name(colour: str | None, form: str | None) -> str:
    return " ".join(word for word in (colour, form or "shape") if word)


def _groups(shapes: list[Shape]) -> list[tuple[str | None, str | None, tuple[int, ...]]]:
    names = [(None, None)]
    names += [(c, None) for c in sorted({s.colour for s in shapes})]
    names += [(None, f) for f in sorted({s.form for s in shapes})]
    names += sorted({(s.colour, s.form) for s in shapes})
    groups = []
    for colour, form in names:
        members = tuple(i for i, s in enumerate(shapes) if colour in (None, s.colour) and form in (None, s.form))
        groups.append((colour, form, members))
    return groups


DIRECTIONS = {"left": (0, -1), "right": (0, 1), "top": (1, -1), "bottom": (1, 1)}
POSITION_WORDS = {"left": ("leftmost",), "right": ("rightmost",), "top": ("topmost", "highest"),
                  "bottom": ("bottommost", "lowest")}  # fmt: skip
RELATION_WORDS = {"left": "left of the", "right": "right of the", "top": "above the", "bottom": "below the"}
OPPOSITE_WORDS = {"leftmost": "rightmost", "topmost": "bottommost", "highest": "lowest", "left of": "right of",
                  "above": "below"}  # fmt: skip
OPPOSITE_WORDS.update({b: a for a, b in list(OPPOSITE_WORDS.items())})


def opposite_direction(text: str) -> str | None:
    """A position or relation expression with its direction turned round ("leftmost red shape" -> "rightmost red
    shape", "circle above the red square" -> "circle below the red square"); `None` for other expressions."""
    for words, opposite in OPPOSITE_WORDS.items():
        if text.startswith(words + " ") or f" {words} " in text:
            return text.replace(words, opposite, 1)
    return None


def expressions(shapes: list[Shape], masks: np.ndarray, kind: str, size: tuple[int, int]) -> list[dict]:
    """Every unambiguous expression of `kind` in the scene: `text`, `targets` and, for position and relation,
    `direction`, `group` (the members chosen among) and `anchor` (the fields of `Item`)."""
    areas = masks.sum(axis=(1, 2))
    centres = np.array([[s.x, s.y] for s in shapes])
    out = []
    for colour, form, members in _groups(shapes):
        name = _group_name(colour, form)
        if kind == "colour_shape" and colour and form and len(members) == 1:
            out.append({"text": name, "targets": members})
        if kind == "position" and len(members) >= 2:
            for direction, (axis, sign) in DIRECTIONS.items():
                ranked = sorted(members, key=lambda i: sign * centres[i, axis], reverse=True)
                if sign * (centres[ranked[0], axis] - centres[ranked[1], axis]) >= POSITION_MARGIN * size[axis]:
                    out += [{"text": f"{word} {name}", "targets": (ranked[0],), "direction": direction,
                             "group": members} for word in POSITION_WORDS[direction]]
        if kind == "size" and len(members) >= 2:
            for largest, words in ((True, ("largest", "biggest")), (False, ("smallest",))):
                ranked = sorted(members, key=lambda i: areas[i], reverse=largest)
                big, small = (ranked[0], ranked[1]) if largest else (ranked[1], ranked[0])
                if areas[big] >= SIZE_RATIO * areas[small]:
                    out += [{"text": f"{word} {name}", "targets": (ranked[0],)} for word in words]
        if kind == "relation" and colour and form and len(members) == 1:
            anchor = members[0]
            for other_colour, other_form, group in _groups(shapes):
                group = tuple(i for i in group if i != anchor)
                if len(group) < 2:
                    continue
                for direction, (axis, sign) in DIRECTIONS.items():
                    along = {i: sign * (centres[i, axis] - centres[anchor, axis]) for i in group}
                    across = {i: abs(centres[i, 1 - axis] - centres[anchor, 1 - axis]) for i in group}
                    ahead = [i for i in group if along[i] > shapes[anchor].r and along[i] > across[i]]
                    if len(ahead) == 1 and all(along[i] < -0.5 * shapes[anchor].r for i in group if i != ahead[0]):
                        text = f"{_group_name(other_colour, other_form)} {RELATION_WORDS[direction]} {name}"
                        out.append({"text": text, "targets": (ahead[0],), "direction": direction, "group": group,
                                    "anchor": anchor})
    return out


def build_items(seed: int, pale: int, per_family: int) -> list[Item]:
    """`pale` expressions on pale backgrounds and `per_family` on each other family, kinds in rotation weighted
    towards colour_shape (3 : 2 : 2 : 2), one expression per scene."""
    rotation = ("colour_shape", "position", "colour_shape", "size", "relation", "colour_shape", "position", "size",
                "relation")  # fmt: skip
    items = []
    for family in FAMILIES:
        count = pale if family == "pale" else per_family
        for index in range(count):
            rng = random.Random(f"heldout/{seed}/{family}/{index}")
            kind = rotation[index % len(rotation)]
            while True:
                image, shapes, masks = draw_scene(rng, family)
                found = expressions(shapes, masks, kind, image.size)
                if len(shapes) >= 2 and found:
                    items.append(Item(image, shapes, masks, family, kind, **rng.choice(found)))
                    break
    return items


# ----------------------------------------------------------------------------------------------------------------
# Scoring


def colour_match(item: Item) -> np.ndarray:
    colour = next((word for word in item.text.split() if word in NAMED), None)
    chosen = [i for i, s in enumerate(item.shapes) if colour in (None, s.colour)]
    return item.masks[chosen].any(0)


def size_in_patches(item: Item, index: int, tile: int, patch: int, max_tiles: int) -> float:
    """Diameter of shape `index` in ViT patches, once the image is resized to its tile grid."""
    width, height = item.image.size
    rows, cols = select_tile_grid(width, height, tile, 1, max_tiles)
    scale = math.sqrt(cols * tile / width * rows * tile / height)
    return 2 * item.shapes[index].r * scale / patch


def outcome(item: Item, pred: np.ndarray, iou: float) -> str:
    """Where a colour_shape answer went (see `OUTCOMES`)."""
    if iou >= 0.5:
        return "right"
    if not pred.any():
        return "empty"
    target = item.targets[0]
    colour = item.shapes[target].colour
    same = [i for i, s in enumerate(item.shapes) if s.colour == colour and i != target]
    covered = [(pred & m).sum() / max(1, m.sum()) for m in item.masks]
    if covered[target] >= 0.5 and any(covered[i] >= 0.5 for i in same):
        return "both"
    on = [(pred & m).sum() for m in item.masks]
    on_background = pred.sum() - sum(on)
    best = int(np.argmax(on))
    if on_background > on[best]:
        return "background"
    if best == target:
        return "poor outline"
    return "wrong shape" if best in same else "other colour"


def direction_outcome(item: Item, pred: np.ndarray, iou: float) -> str:
    """Where a position or relation answer went (see `DIRECTION_OUTCOMES`): `group` covers the target and another
    member of the named group (each at least half); `opposite` is mostly on the member the opposite direction word
    names (for a relation, any other member: they all lie behind the anchor); `other member` on another member;
    `anchor` on the relation's anchor; `outside group` on a shape outside the group."""
    if iou >= 0.5:
        return "right"
    if not pred.any():
        return "empty"
    (target,) = item.targets
    others = [i for i in item.group if i != target]
    covered = [(pred & m).sum() / max(1, m.sum()) for m in item.masks]
    if covered[target] >= 0.5 and any(covered[i] >= 0.5 for i in others):
        return "group"
    on = [(pred & m).sum() for m in item.masks]
    best = int(np.argmax(on))
    if pred.sum() - sum(on) > on[best]:
        return "background"
    if best == target:
        return "poor outline"
    if best == item.anchor:
        return "anchor"
    if best not in others:
        return "outside group"
    axis, sign = DIRECTIONS[item.direction]
    centres = [(s.x, s.y)[axis] for s in item.shapes]
    opposite_end = min(item.group, key=lambda i: sign * centres[i])
    return "opposite" if item.anchor is not None or best == opposite_end else "other member"


def auroc(scores: list[float], positive: list[bool]) -> float | None:
    """Probability that a positive outranks a negative (ties count half); `None` without both."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@torch.inference_mode()
def score(model, processor, items: list[Item], batch_size: int = 16) -> list[dict]:
    """Per item: IoU, the scores `segment(return_scores=True)` gives, outcome and target size in patches; for position
    and relation expressions also `opposite_iou`, the IoU of the answer with the answer to the expression with the
    opposite direction (1.0: the model does not read the direction word)."""
    tile = processor.image_processor.size["height"]
    patch = model.config.vision_config.patch_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    records = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        masks, scores, ious = model.segment(
            processor, [i.image for i in batch], [i.text for i in batch], return_scores=True, return_iou_scores=True
        )
        max_tiles = processor.image_processor.max_patches
        turned = {n: text for n, item in enumerate(batch) if (text := opposite_direction(item.text))}
        opposite = {}
        if turned:
            answers = model.segment(processor, [batch[n].image for n in turned], list(turned.values()))
            opposite = dict(zip(turned, answers))
        for n, (item, mask, presence, predicted) in enumerate(zip(batch, masks, scores, ious)):
            pred = mask.cpu().numpy().astype(bool)
            target = item.masks[list(item.targets)].any(0)
            union = (pred | target).sum()
            iou = float((pred & target).sum() / union) if union else 1.0
            record = {
                "family": item.family, "kind": item.kind, "text": item.text, "iou": iou,
                "intersection": int((pred & target).sum()), "union": int(union),
                "size_patches": size_in_patches(item, item.targets[0], tile, patch, max_tiles),
                "outcome": outcome(item, pred, iou) if item.kind == "colour_shape" else None,
                "direction_outcome": direction_outcome(item, pred, iou) if n in turned else None,
            }  # fmt: skip
            if n in opposite:
                other = opposite[n].cpu().numpy().astype(bool)
                record["opposite_iou"] = float((pred & other).sum() / max(1, (pred | other).sum()))
            record["presence"] = presence
            if predicted is not None:
                record["predicted_iou"] = predicted
            records.append(record)
    return records


def summarise(items: list[Item], records: list[dict]) -> dict:
    metrics, baseline = defaultdict(ReferringMetrics), defaultdict(ReferringMetrics)
    for item, record in zip(items, records):
        target = torch.from_numpy(item.masks[list(item.targets)].any(0))
        guess = torch.from_numpy(colour_match(item))
        keys = ["overall", item.kind, f"family:{item.family}", "non-pale" if item.family != "pale" else "pale"]
        if item.kind == "colour_shape":
            keys.append(f"colour_shape:{item.family}")
        for key in keys:  # the model's masks were scored in `score`: add their sums
            m = metrics[key]
            m.intersection += record["intersection"]
            m.union += record["union"]
            m.iou_sum += record["iou"]
            m.count += 1
            baseline[key].update(guess, target)
    summary = {key: {**metrics[key].compute(), "baseline_cIoU": baseline[key].compute()["cIoU"]} for key in metrics}
    score_names = [k for k in records[0] if k not in ("family", "kind", "text", "iou", "intersection", "union",
                                                     "size_patches", "outcome", "direction_outcome",
                                                     "opposite_iou")]  # fmt: skip
    right = [r["iou"] >= 0.5 for r in records]
    summary["auroc_iou_0.5"] = {name: auroc([r[name] for r in records], right) for name in score_names}
    summary["opposite_direction_iou"] = {
        kind: float(np.mean(values))
        for kind in ("position", "relation")
        if (values := [r["opposite_iou"] for r in records if r["kind"] == kind and "opposite_iou" in r])
    }
    diagnosis = {"all": Counter(), **{f: Counter() for f in FAMILIES}}
    by_size = {f"{low}-{high}": Counter() for low, high in SIZE_BINS}
    for record in records:
        if record["outcome"] is None:
            continue
        diagnosis["all"][record["outcome"]] += 1
        diagnosis[record["family"]][record["outcome"]] += 1
        for low, high in SIZE_BINS:
            if low <= record["size_patches"] < high:
                by_size[f"{low}-{high}"][record["outcome"]] += 1
    summary["direction_outcomes"] = {
        kind: dict(Counter(r["direction_outcome"] for r in records if r["kind"] == kind))
        for kind in ("position", "relation")
        if any(r["kind"] == kind for r in records)
    }
    summary["colour_shape_outcomes"] = {k: dict(v) for k, v in diagnosis.items()}
    summary["colour_shape_outcomes_by_size"] = {k: dict(v) for k, v in by_size.items()}
    sized = {f"{low}-{high}": [] for low, high in SIZE_BINS}  # in size order
    for record in records:
        for low, high in SIZE_BINS:
            if low <= record["size_patches"] < high:
                sized[f"{low}-{high}"].append(record)
    summary["ciou_by_size"] = {
        k: {"count": len(v), "cIoU": sum(r["intersection"] for r in v) / max(1, sum(r["union"] for r in v))}
        for k, v in sized.items()
        if v
    }
    return summary


def markdown(summary: dict, model: str, count: int, seed: int) -> str:
    lines = [
        f"Held-out shapes (`examples/score_heldout.py`, {count} expressions, seed {seed}, model `{model}`):",
        "",
        "| expressions | count | cIoU | gIoU | colour-match baseline cIoU |",
        "|---|---|---|---|---|",
    ]
    order = ["overall", "pale", "non-pale", *KINDS, *(f"family:{f}" for f in FAMILIES),
             *(f"colour_shape:{f}" for f in FAMILIES)]  # fmt: skip
    for key in order:
        if key in summary:
            s = summary[key]
            label = key.replace("family:", "background: ").replace("colour_shape:", "colour_shape on ")
            lines.append(f"| {label} | {s['count']} | {s['cIoU']:.3f} | {s['gIoU']:.3f} | {s['baseline_cIoU']:.3f} |")
    lines += ["", "| score | AUROC of IoU >= 0.5 against IoU < 0.5 |", "|---|---|"]
    for name, value in summary["auroc_iou_0.5"].items():
        lines.append(f"| {name} | {'-' if value is None else f'{value:.3f}'} |")
    lines += ["", "Direction words: mean IoU of each answer with the answer to the same expression with the opposite "
              "direction (1.0: the direction word is not read):", "", "| kind | IoU |", "|---|---|"]
    lines += [f"| {kind} | {value:.3f} |" for kind, value in summary["opposite_direction_iou"].items()]
    lines += ["", "Position and relation answers by outcome (count; `opposite`: on the shape the opposite direction "
              "names):", "", "| kind | " + " | ".join(DIRECTION_OUTCOMES) + " |",
              "|---" * (len(DIRECTION_OUTCOMES) + 1) + "|"]  # fmt: skip
    for kind, counts in summary["direction_outcomes"].items():
        lines.append(f"| {kind} | " + " | ".join(str(counts.get(o, 0)) for o in DIRECTION_OUTCOMES) + " |")
    lines += ["", "colour_shape answers by outcome (count):", "",
              "| background / target size | " + " | ".join(OUTCOMES) + " |", "|---" * (len(OUTCOMES) + 1) + "|"]
    for key, counts in summary["colour_shape_outcomes"].items():
        lines.append(f"| {key} | " + " | ".join(str(counts.get(o, 0)) for o in OUTCOMES) + " |")
    for key, counts in summary["colour_shape_outcomes_by_size"].items():
        lines.append(f"| {key} patches | " + " | ".join(str(counts.get(o, 0)) for o in OUTCOMES) + " |")
    lines += ["", "| target diameter (ViT patches) | count | cIoU (all kinds) |", "|---|---|---|"]
    for key, value in summary["ciou_by_size"].items():
        lines.append(f"| {key} | {value['count']} | {value['cIoU']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="a model folder, or a training checkpoint")
    parser.add_argument("--processor", default=None, help="processor folder (default: --model; a checkpoint has none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pale", type=int, default=192, help="expressions on pale backgrounds")
    parser.add_argument("--per-family", type=int, default=32, help="expressions on each other background family")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--save-images", type=Path, default=None, help="write the first 28 scenes to this folder")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    items = build_items(args.seed, args.pale, args.per_family)
    if args.save_images:
        args.save_images.mkdir(parents=True, exist_ok=True)
        for n, item in enumerate(items[:: max(1, len(items) // 28)][:28]):
            item.image.save(args.save_images / f"{n:02d}_{item.family}_{item.text.replace(' ', '_')}.png")
    model = SelfieForSegmentation.from_pretrained(args.model).eval()
    processor = SelfieProcessor.from_pretrained(args.processor or args.model)
    unknown = {w for i in items for w in i.text.split() if processor.tokenizer.convert_tokens_to_ids(w) ==
               processor.tokenizer.unk_token_id}  # fmt: skip
    if unknown:
        sys.exit(f"error: words outside the model's vocabulary: {sorted(unknown)}")
    records = score(model, processor, items)
    summary = summarise(items, records)
    table = markdown(summary, args.model if args.model != str(DEFAULT_MODEL) else "selfie-refshapes", len(items),
                     args.seed)  # fmt: skip
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "records": records}, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
