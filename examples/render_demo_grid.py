"""Draw the README's picture of the shipped demo model: its masks for several prompts on one image, in a grid.

    python examples/render_demo_grid.py                       # writes docs/images/selfie-refshapes-examples.png
    python examples/render_demo_grid.py --image my.png --prompts "red circle" "blue star" --output grid.png
    python examples/render_demo_grid.py --redraw-image        # first redraws examples/assets/shapes.png

The example image is one RefShapes scene laid out by hand (`EXAMPLE_SHAPES`), so that colour alone does not decide
the prompts: two blue shapes of different forms, two squares of different sizes, a red shape and a star but no red
star.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from modeling_selfie.cli import load_model, read_image, render_overlay
from modeling_selfie.data.refshapes import PlacedShape, render_scene
from modeling_selfie.io_utils import atomic_output_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGE = ROOT / "examples" / "assets" / "shapes.png"
EXAMPLE_SIZE, EXAMPLE_BACKGROUND = (320, 224), (240, 236, 246)  # (width, height), RGB
EXAMPLE_SHAPES = (  # form, colour, centre (x, y), radius of the bounding disc, in pixels
    PlacedShape("circle", "red", (45, 60), 26),
    PlacedShape("circle", "blue", (135, 48), 26),
    PlacedShape("square", "green", (120, 162), 46),
    PlacedShape("star", "blue", (262, 165), 42),
    PlacedShape("square", "orange", (262, 55), 24),
    PlacedShape("diamond", "purple", (200, 105), 24),
)
# Prompts where the colour word alone does not decide: form ("blue star" vs "blue circle"), position, size, a
# relation, several targets, and a phrase naming nothing in the image ("red star": red and star are both there).
PROMPTS = (
    "blue star", "blue circle", "leftmost shape", "largest square",
    "smallest square", "square right of the blue circle", "circles", "red star",
)  # fmt: skip


def draw_example_image(path: Path = EXAMPLE_IMAGE) -> Image.Image:
    """Render `EXAMPLE_SHAPES` with RefShapes' painter on a plain background and write it to `path` (PNG)."""
    width, height = EXAMPLE_SIZE
    background = np.broadcast_to(np.array(EXAMPLE_BACKGROUND, np.uint8), (height, width, 3)).copy()
    image = render_scene(list(EXAMPLE_SHAPES), background).image
    with atomic_output_file(path) as staging:
        image.save(staging, format="PNG")
    return image


def caption(prompt: str, mask) -> str:
    """The prompt, marked when the model answers with an empty mask (nothing there)."""
    return prompt if mask.any() else f"{prompt} (empty mask)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=EXAMPLE_IMAGE)
    parser.add_argument("--redraw-image", action="store_true", help="first draw the example image to --image")
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: the shipped demo model)")
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "images" / "selfie-refshapes-examples.png")
    args = parser.parse_args(argv)

    if args.redraw_image:
        draw_example_image(args.image)
    model, processor = load_model(args.model)
    image = read_image(args.image)
    masks = model.segment(processor, [image] * len(args.prompts), args.prompts)
    cells = [
        render_overlay(image, mask.cpu().numpy(), caption(prompt, mask)) for prompt, mask in zip(args.prompts, masks)
    ]
    columns = min(args.columns, len(cells))
    rows = -(-len(cells) // columns)
    width, height = cells[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, cell in enumerate(cells):
        grid.paste(cell, ((i % columns) * width, (i // columns) * height))
    with atomic_output_file(args.output) as staging:
        grid.save(staging, format="PNG")
    print(f"wrote {args.output} ({len(cells)} prompts)")


if __name__ == "__main__":
    main()
