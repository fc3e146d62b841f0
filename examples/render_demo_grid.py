"""Draw the README's picture of the shipped demo model: its masks for several prompts on one image, in a grid.

    python examples/render_demo_grid.py                       # writes docs/images/selfie-refshapes-examples.png
    python examples/render_demo_grid.py --image my.png --prompts "red circle" "blue star" --output grid.png
"""

import argparse
from pathlib import Path

from PIL import Image

from modeling_selfie.cli import load_model, read_image, render_overlay
from modeling_selfie.io_utils import atomic_output_file

ROOT = Path(__file__).resolve().parents[1]
# Prompts where the colour word alone does not decide: form ("blue star" vs "blue circles"), position, size, a pair
# member, and a phrase naming nothing in the image ("red star": red and star are both there, not together).
PROMPTS = (
    "blue star", "blue circles", "red diamond", "red circle",
    "leftmost shape", "smallest blue shape", "blue circle at the top", "red star",
)  # fmt: skip


def caption(prompt: str, mask) -> str:
    """The prompt, marked when the model answers with an empty mask (nothing there)."""
    return prompt if mask.any() else f"{prompt} (empty mask)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=ROOT / "examples" / "assets" / "shapes.png")
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: the shipped demo model)")
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "images" / "selfie-refshapes-examples.png")
    args = parser.parse_args(argv)

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
