"""examples/score_heldout.py: held-out scenes from a renderer of its own, in the shipped model's words, scored per
kind, background family and target size, with the colour-match baseline and the outcome of colour_shape answers."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modeling_selfie.cli import default_model_dir
from modeling_selfie.data.refshapes import vocabulary

from .helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "score_heldout.py"


@pytest.fixture(scope="module")
def heldout():
    return load_script(SCRIPT)


def test_half_of_the_scenes_are_pale_and_every_family_and_kind_occurs(heldout):
    items = heldout.build_items(0, 18, 3)
    families = [item.family for item in items]
    assert families.count("pale") == 18 == len(items) - 18
    assert set(families) == set(heldout.FAMILIES) and {item.kind for item in items} == set(heldout.KINDS)
    for item in items:
        assert set(item.text.split()) <= set(vocabulary())
        assert item.masks.shape[0] == len(item.shapes) and all(item.masks[k].any() for k in item.targets)
        if item.kind == "colour_shape":
            (target,) = item.targets
            shape = item.shapes[target]
            assert item.text == f"{shape.colour} {shape.form}"
            assert [(s.colour, s.form) for s in item.shapes].count((shape.colour, shape.form)) == 1
    again = heldout.build_items(0, 18, 3)
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(items, again))


def test_outcomes_name_where_a_colour_shape_answer_went(heldout):
    item = next(i for i in heldout.build_items(0, 40, 0) if i.kind == "colour_shape" and len(i.shapes) > 2)
    (target,) = item.targets
    other = next(k for k in range(len(item.shapes)) if k != target)
    assert heldout.outcome(item, item.masks[target], 1.0) == "right"
    assert heldout.outcome(item, np.zeros_like(item.masks[0]), 0.0) == "empty"
    expected = "wrong shape" if item.shapes[other].colour == item.shapes[target].colour else "other colour"
    assert heldout.outcome(item, item.masks[other], 0.0) == expected
    assert heldout.outcome(item, ~item.masks.any(0), 0.0) == "background"


def disk(x: float, y: float, r: float, size: int = 100) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size]
    return (cols - x) ** 2 + (rows - y) ** 2 <= r * r


def test_outcomes_name_where_a_position_or_relation_answer_went(heldout):
    """Three red circles in a row (left, middle, right) above a blue square, drawn by hand."""
    places = [("circle", "red", 20, 30), ("circle", "red", 50, 30), ("circle", "red", 80, 30),
              ("square", "blue", 50, 75)]
    shapes = [heldout.Shape(form, colour, x, y, 8.0) for form, colour, x, y in places]
    masks = np.stack([disk(s.x, s.y, s.r) for s in shapes])
    image = heldout.Image.new("RGB", (100, 100), "white")
    leftmost = heldout.Item(image, shapes, masks, "pale", "position", "leftmost red circle", (0,), "left", (0, 1, 2))
    outcome = heldout.direction_outcome
    assert outcome(leftmost, masks[0], 1.0) == "right"
    assert outcome(leftmost, np.zeros_like(masks[0]), 0.0) == "empty"
    assert outcome(leftmost, masks[:3].any(0), 1 / 3) == "group"
    assert outcome(leftmost, masks[2], 0.0) == "opposite"  # the rightmost red circle
    assert outcome(leftmost, masks[1], 0.0) == "other member"
    assert outcome(leftmost, masks[3], 0.0) == "outside group"
    assert outcome(leftmost, ~masks.any(0), 0.0) == "background"
    assert outcome(leftmost, disk(20, 30, 3), 0.14) == "poor outline"
    highest = heldout.Item(image, shapes, masks, "pale", "position", "highest shape", (1,), "top", (0, 1, 2, 3))
    assert outcome(highest, masks[3], 0.0) == "opposite"  # the lowest shape: the square
    above = heldout.Item(image, shapes, masks, "pale", "relation", "red circle above the blue square", (1,), "top",
                         (0, 1, 2), anchor=3)
    assert outcome(above, masks[3], 0.0) == "anchor"
    assert outcome(above, masks[0], 0.0) == "opposite"


def test_every_position_and_relation_expression_has_its_opposite(heldout):
    """The direction check turns each direction word round, once, and nothing else."""
    assert heldout.opposite_direction("leftmost red shape") == "rightmost red shape"
    assert heldout.opposite_direction("lowest circle") == "highest circle"
    assert heldout.opposite_direction("circle above the red square") == "circle below the red square"
    assert heldout.opposite_direction("blue star right of the green ring") == "blue star left of the green ring"
    assert heldout.opposite_direction("red circle") is None and heldout.opposite_direction("largest star") is None
    items = heldout.build_items(0, 36, 0)
    for item in items:
        turned = heldout.opposite_direction(item.text)
        assert (turned is not None) == (item.kind in ("position", "relation")), item.text
        if turned:
            assert heldout.opposite_direction(turned) == item.text and set(turned.split()) <= set(vocabulary())


def test_the_command_scores_the_shipped_model_and_writes_json_and_markdown(heldout, tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--pale", "3", "--per-family", "1", "--json", "h.json", "--markdown", "h.md",
         "--threads", "1"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "h.json").read_text())
    summary = report["summary"]
    assert summary["overall"]["count"] == 9 == len(report["records"])
    assert summary["pale"]["count"] == 3 and summary["non-pale"]["count"] == 6
    assert 0 <= summary["overall"]["cIoU"] <= 1 and 0 <= summary["overall"]["baseline_cIoU"] <= 1
    assert set(summary["auroc_iou_0.5"]) == {"presence", "predicted_iou"}  # the shipped model has an IoU head
    turned = [r for r in report["records"] if r["kind"] in ("position", "relation")]
    assert turned and all(0 <= r["opposite_iou"] <= 1 for r in turned)
    assert set(summary["opposite_direction_iou"]) == {r["kind"] for r in turned} == set(summary["direction_outcomes"])
    assert all(r["direction_outcome"] in heldout.DIRECTION_OUTCOMES for r in turned)
    assert "| position |" in (tmp_path / "h.md").read_text() or "| relation |" in (tmp_path / "h.md").read_text()
    table = (tmp_path / "h.md").read_text()
    assert table in result.stdout and "| overall | 9 |" in table and str(default_model_dir().name) in table
