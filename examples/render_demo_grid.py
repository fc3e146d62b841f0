"""Draw the README's picture of the shipped demo model: its masks for several prompts on one image, in a grid, and
write what each mask covers beside it (JSON) and into the README, from the same run.

    python examples/render_demo_grid.py                       # the picture, its JSON and the README's block
    python examples/render_demo_grid.py --image my.png --prompts "red circle" "blue star" --output grid.png
    python examples/render_demo_grid.py --redraw-image        # first redraws examples/assets/shapes.png

The example image is one RefShapes scene laid out by hand (`EXAMPLE_SHAPES`), so that colour alone does not decide
the prompts: two blue shapes of different forms, two squares of different sizes, a red shape and a star but no red
star. On that scene each prompt of `PROMPTS` names known shapes, so the JSON and the README say, per prompt, which
shapes the mask covers and whether it is right. The README's text between `README_BEGIN` and `README_END` is
rewritten by each default run (and checked against the JSON by `tests/test_render_demo_grid.py`), so the picture
and its text cannot disagree: rerun this command whenever the shipped model, its processor or the overlay change.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from transformers.utils import logging

from modeling_selfie.cli import coco_rle, load_model, read_image, render_overlay, segment_with_scores
from modeling_selfie.data.refshapes import PlacedShape, render_scene
from modeling_selfie.io_utils import atomic_output_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGE = ROOT / "examples" / "assets" / "shapes.png"
DEFAULT_OUTPUT = ROOT / "docs" / "images" / "selfie-refshapes-examples.png"
README = ROOT / "README.md"
README_BEGIN = "<!-- render_demo_grid: begin. Written by `python examples/render_demo_grid.py`; do not edit. -->"
README_END = "<!-- render_demo_grid: end -->"
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
# Each maps to the shapes of `EXAMPLE_SHAPES` it names (indices).
PROMPTS = {
    "blue star": (3,), "blue circle": (1,), "leftmost shape": (0,), "largest square": (2,),
    "smallest square": (4,), "square right of the blue circle": (4,), "circles": (0, 1), "red star": (),
}  # fmt: skip
COVERED = 0.5  # a shape counts as covered when the mask holds this share of its visible pixels
RIGHT_IOU = 0.5  # a right mask covers just the named shapes, with at least this IoU (empty where none is named)


def example_scene():
    """`EXAMPLE_SHAPES` painted by RefShapes on a plain background: a `Scene` (image and each shape's mask)."""
    width, height = EXAMPLE_SIZE
    background = np.broadcast_to(np.array(EXAMPLE_BACKGROUND, np.uint8), (height, width, 3)).copy()
    return render_scene(list(EXAMPLE_SHAPES), background)


def draw_example_image(path: Path = EXAMPLE_IMAGE) -> Image.Image:
    """Render the example scene and write it to `path` (PNG)."""
    image = example_scene().image
    with atomic_output_file(path) as staging:
        image.save(staging, format="PNG")
    return image


def caption(prompt: str, mask) -> str:
    """The prompt, marked when the model answers with an empty mask (nothing there)."""
    return prompt if mask.any() else f"{prompt} (empty mask)"


def shape_name(index: int) -> str:
    shape = EXAMPLE_SHAPES[index]
    return f"{shape.colour} {shape.form}"


def judge(mask: np.ndarray, shape_masks: np.ndarray, target: tuple[int, ...]) -> dict:
    """What a mask of the example scene covers: the shapes holding `COVERED` of their pixels in it, the pixels
    outside them, its IoU with the `target` shapes (for an empty target: 1 when the mask is empty too, else 0), and
    whether it is right: it covers the target shapes and no other, with IoU >= `RIGHT_IOU`."""
    covered = [i for i, shape in enumerate(shape_masks) if (mask & shape).sum() >= COVERED * shape.sum()]
    wanted = shape_masks[list(target)].any(axis=0) if target else np.zeros_like(mask)
    union = (mask | wanted).sum()
    iou = float((mask & wanted).sum() / union) if union else 1.0
    elsewhere = int((mask & ~shape_masks[covered].any(axis=0)).sum()) if covered else int(mask.sum())
    return {"covers": [shape_name(i) for i in covered], "elsewhere_px": elsewhere, "iou": round(iou, 3),
            "right": covered == sorted(target) and iou >= RIGHT_IOU}


def covers_text(result: dict) -> str:
    if not result["area"]:
        return "nothing (empty mask)"
    shapes = ", ".join(result["covers"]) or "no whole shape"
    return shapes + (f" + {result['elsewhere_px']} px elsewhere" if result["elsewhere_px"] else "")


def readme_block(record: dict) -> str:
    """The README's text for the picture of `record` (the JSON this script writes): the picture and, per prompt,
    what it names, what the mask covers, its IoU, presence score and (a model with an IoU head) predicted IoU."""
    predicted = all("iou_score" in result for result in record["results"])
    lines = [README_BEGIN, f"![selfie-refshapes on the example image]({record['picture']})", "",
             "| prompt | names | the mask covers | IoU | presence |" + " predicted IoU |" * predicted,
             "|---|---|---|---|---|" + "---|" * predicted]
    for result in record["results"]:
        names = ", ".join(result["names"]) or "nothing"
        lines.append(f"| {result['prompt']} | {names} | {covers_text(result)} | {result['iou']:.2f} | "
                     f"{result['presence_score']:.2f} |" + f" {result.get('iou_score', 0):.2f} |" * predicted)
    right = [f'"{result["prompt"]}"' for result in record["results"] if result["right"]]
    lines += ["", f"Right (the mask covers just the shapes the prompt names, IoU >= {RIGHT_IOU}; empty where it names",
              f"nothing): {len(right)} of {len(record['results'])}" + (f", {', '.join(right)}." if right else "."),
              README_END]
    return "\n".join(lines)


def replace_readme_block(readme: Path, block: str) -> None:
    """Put `block` between the README's `README_BEGIN` and `README_END` lines (the markers included)."""
    text = readme.read_text(encoding="utf-8")
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise SystemExit(f"error: {readme} needs one {README_BEGIN!r} line and one {README_END!r} line")
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    with atomic_output_file(readme) as staging:
        staging.write_text(text[:start] + block + text[end:], encoding="utf-8")


def repository_path(path: Path) -> str:
    """`path` relative to the repository (as the README links it) when it lies inside, else as given."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def draw_grid(cells: list[Image.Image], columns: int) -> Image.Image:
    """The cells in rows of `columns`, on white."""
    columns = min(columns, len(cells))
    rows = -(-len(cells) // columns)
    width, height = cells[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, cell in enumerate(cells):
        grid.paste(cell, ((i % columns) * width, (i // columns) * height))
    return grid


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=EXAMPLE_IMAGE)
    parser.add_argument("--redraw-image", action="store_true", help="first draw the example image to --image")
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: the shipped demo model)")
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the picture; its JSON goes beside it")
    parser.add_argument(
        "--readme", type=Path, default=None,
        help="file whose render_demo_grid block gets the picture's text (default: README.md for the default picture)",
    )
    args = parser.parse_args(argv)
    logging.disable_progress_bar()  # no "Loading weights" bar
    readme = args.readme or (README if args.output == DEFAULT_OUTPUT else None)

    if args.redraw_image:
        draw_example_image(args.image)
    model, processor = load_model(args.model)
    image = read_image(args.image)
    scene = example_scene()
    on_example = np.array_equal(np.asarray(image), np.asarray(scene.image))  # the shapes' masks are known
    results, cells = [], []
    for prompt, (mask, score, iou) in zip(args.prompts, segment_with_scores(model, processor, image, args.prompts)):
        result = {"prompt": prompt, "area": int(mask.sum()), "presence_score": round(score, 4)}
        if iou is not None:
            result["iou_score"] = round(iou, 4)
        if on_example and prompt in PROMPTS:
            result.update(names=[shape_name(i) for i in PROMPTS[prompt]], **judge(mask, scene.masks, PROMPTS[prompt]))
        result["segmentation"] = coco_rle(mask)
        results.append(result)
        cells.append(render_overlay(image, mask, caption(prompt, mask)))
    if readme and not all("names" in result for result in results):
        raise SystemExit("error: --readme needs the example image and prompts of PROMPTS (what they name is known)")
    grid = draw_grid(cells, args.columns)
    record = {"command": "python examples/render_demo_grid.py", "model": args.model or "the shipped selfie-refshapes",
              "image": repository_path(args.image), "picture": repository_path(args.output), "columns": args.columns,
              "results": results}
    with atomic_output_file(args.output) as staging:
        grid.save(staging, format="PNG")
    with atomic_output_file(args.output.with_suffix(".json")) as staging:
        staging.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    if readme:
        replace_readme_block(readme, readme_block(record))
    print(f"wrote {args.output} and {args.output.with_suffix('.json')} ({len(cells)} prompts)"
          + (f"; its text in {readme}" if readme else ""))


if __name__ == "__main__":
    main()
