"""examples/render_demo_grid.py, the script behind the README picture: one overlay cell per prompt, in a grid, and
the README's text about it written from the same run, so that the two cannot disagree."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from modeling_selfie.cli import load_model, read_image, render_overlay, segment_with_scores

from .helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "render_demo_grid.py"
PICTURE = ROOT / "docs" / "images" / "selfie-refshapes-examples.png"


@pytest.fixture(scope="module")
def module():
    return load_script(SCRIPT)


def cells_of(grid: np.ndarray, count: int, columns: int, cell_width: int) -> list[np.ndarray]:
    rows = -(-count // columns)
    height = grid.shape[0] // rows
    return [grid[(i // columns) * height : (i // columns + 1) * height,
                 (i % columns) * cell_width : (i % columns + 1) * cell_width] for i in range(count)]  # fmt: skip


def test_grid_holds_one_overlay_per_prompt(module, tmp_path):
    prompts = ["red circle", "blue star", "green cross"]
    output = tmp_path / "grid.png"
    readme = ROOT / "README.md"
    before = readme.read_text()
    module.main(["--prompts", *prompts, "--columns", "2", "--output", str(output)])
    assert readme.read_text() == before  # a picture of its own leaves the README alone

    grid = np.asarray(Image.open(output).convert("RGB"))
    model, processor = load_model()
    image = read_image(ROOT / "examples" / "assets" / "shapes.png")
    masks = [model.segment(processor, image, p)[0].numpy() for p in prompts]
    cells = [render_overlay(image, mask, module.caption(p, mask)) for p, mask in zip(prompts, masks)]
    width, height = cells[0].size
    assert grid.shape == (2 * height, 2 * width, 3)  # 3 cells in 2 columns: 2 rows, the last cell blank
    for i, cell in enumerate(cells):
        top, left = (i // 2) * height, (i % 2) * width
        assert np.array_equal(grid[top : top + height, left : left + width], np.asarray(cell))
    assert (grid[height:, width:] == 255).all()
    record = json.loads((tmp_path / "grid.json").read_text())
    assert [r["prompt"] for r in record["results"]] == prompts
    for result, mask in zip(record["results"], masks):
        assert np.array_equal(mask_utils.decode(result["segmentation"]).astype(bool), mask)
        assert ("covers" in result) == (result["prompt"] in module.PROMPTS)  # judged where what it names is known
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.json", "grid.png"]  # atomic: no staging file left


def test_the_judgement_of_each_mask_follows_the_shapes_it_covers(module):
    shapes = module.example_scene().masks
    blue_star, blue_circle = shapes[3], shapes[1]
    right = module.judge(blue_star, shapes, (3,))
    assert right == {"covers": ["blue star"], "elsewhere_px": 0, "iou": 1.0, "right": True}
    both = module.judge(blue_star | blue_circle, shapes, (3,))  # the colour, not the form
    assert both["covers"] == ["blue circle", "blue star"] and not both["right"] and 0 < both["iou"] < 1
    nothing = np.zeros_like(blue_star)
    assert module.judge(nothing, shapes, ())["right"] and not module.judge(shapes[0], shapes, ())["right"]
    assert not module.judge(nothing, shapes, (3,))["right"]
    half_star = blue_star & (np.cumsum(blue_star, axis=1) <= blue_star.sum(axis=1, keepdims=True) // 3)
    spill = module.judge(half_star | np.eye(*blue_star.shape, dtype=bool), shapes, (3,))
    assert spill["covers"] == [] and spill["elsewhere_px"] > 0 and not spill["right"]


def test_the_readme_says_what_the_picture_shows(module):
    """The README block is the text of the picture's JSON, and the picture's cells are the overlays of the JSON's
    masks: one run wrote all three."""
    record = json.loads(PICTURE.with_suffix(".json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert module.readme_block(record) in readme, "stale README block: run python examples/render_demo_grid.py"
    assert record["picture"] == PICTURE.relative_to(ROOT).as_posix() and module.README_BEGIN in readme

    image = read_image(ROOT / record["image"])
    grid = np.asarray(Image.open(PICTURE).convert("RGB"))
    cells = cells_of(grid, len(record["results"]), record["columns"], image.width)
    for cell, result in zip(cells, record["results"]):
        mask = mask_utils.decode(result["segmentation"]).astype(bool)
        assert result["area"] == int(mask.sum())
        picture_part = np.asarray(render_overlay(image, mask, result["prompt"]))[: image.height]
        assert np.array_equal(cell[: image.height], picture_part), result["prompt"]  # the caption band aside (fonts)
        judged = module.judge(mask, module.example_scene().masks, module.PROMPTS[result["prompt"]])
        assert result == {**result, **judged}


def test_the_picture_is_what_the_shipped_model_answers_today(module):
    """Fails when the shipped model, its processor or the prompts' handling change the masks: rerun
    `python examples/render_demo_grid.py` (it redraws the picture and rewrites the README block)."""
    record = json.loads(PICTURE.with_suffix(".json").read_text())
    image = read_image(ROOT / record["image"])
    prompts = [result["prompt"] for result in record["results"]]
    answers = segment_with_scores(*load_model(), image, prompts)
    for result, (mask, score, iou) in zip(record["results"], answers):
        shown = mask_utils.decode(result["segmentation"]).astype(bool)
        union = (shown | mask).sum()
        assert (shown & mask).sum() >= 0.99 * union, f"{result['prompt']}: rerun examples/render_demo_grid.py"
        assert abs(score - result["presence_score"]) < 0.01
        assert iou is None if "iou_score" not in result else abs(iou - result["iou_score"]) < 0.01


def test_the_example_image_is_the_scene_the_script_draws(module, tmp_path):
    drawn = module.draw_example_image(tmp_path / "shapes.png")
    shipped = np.asarray(Image.open(ROOT / "examples" / "assets" / "shapes.png").convert("RGB"))
    assert np.array_equal(np.asarray(drawn), shipped) and drawn.size == module.EXAMPLE_SIZE
    assert [p.name for p in tmp_path.iterdir()] == ["shapes.png"]
