"""examples/render_demo_grid.py, the script behind the README picture: one overlay cell per prompt, in a grid."""

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from modeling_selfie.cli import load_model, read_image, render_overlay

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "render_demo_grid.py"


def test_grid_holds_one_overlay_per_prompt(tmp_path):
    spec = importlib.util.spec_from_file_location("render_demo_grid", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    prompts = ["red circle", "blue star", "green cross"]
    output = tmp_path / "grid.png"
    module.main(["--prompts", *prompts, "--columns", "2", "--output", str(output)])

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
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # written atomically, no staging file left


def test_the_example_image_is_the_scene_the_script_draws(tmp_path):
    spec = importlib.util.spec_from_file_location("render_demo_grid", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    drawn = module.draw_example_image(tmp_path / "shapes.png")
    shipped = np.asarray(Image.open(ROOT / "examples" / "assets" / "shapes.png").convert("RGB"))
    assert np.array_equal(np.asarray(drawn), shipped) and drawn.size == module.EXAMPLE_SIZE
    assert [p.name for p in tmp_path.iterdir()] == ["shapes.png"]
