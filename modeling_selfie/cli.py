"""`selfie-segment IMAGE "PROMPT"`: segment an image from a sentence and write the mask and an overlay picture.

    selfie-segment examples/assets/shapes.png "red circle"
    selfie-segment photo.jpg "Which object can hold water?" --kind instruction --model path/or/hub-id

With no `--model` it uses the small model shipped in the package (trained on RefShapes, see its model card in
`modeling_selfie/pretrained/selfie-refshapes/README.md`).
"""

import argparse
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from .io_utils import atomic_output_file

DEFAULT_MODEL = "selfie-refshapes"
OVERLAY_COLOUR = (255, 0, 180)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def default_model_dir() -> Path:
    """Folder of the model shipped in the package."""
    return Path(str(resources.files("modeling_selfie").joinpath("pretrained", DEFAULT_MODEL)))


def load_model(name_or_path: str | None = None, device: str | None = None):
    """(model, processor) from a folder or Hub id; the shipped RefShapes model when `None`."""
    from transformers import AutoModel, AutoProcessor

    import modeling_selfie  # noqa: F401  (registers the selfie model type)

    source = str(name_or_path or default_model_dir())
    if name_or_path is None and not (default_model_dir() / "config.json").exists():
        raise CLIError(f"the shipped model is missing from {default_model_dir()}; reinstall modeling-selfie")
    if Path(source).exists() and not (Path(source) / "config.json").is_file():
        raise CLIError(f"{source} is not a model folder (no config.json)")
    try:
        model = AutoModel.from_pretrained(source)
        processor = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError, KeyError) as error:
        raise CLIError(f"cannot load the model from {source}: {error}") from error
    return model.to(device or "cpu").eval(), processor


def read_image(path: str | Path) -> Image.Image:
    """An RGB PIL image, or a `CLIError` that says why the file cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise CLIError(f"cannot read image {path}: {error}") from error


def render_overlay(image: Image.Image, mask: np.ndarray | torch.Tensor, caption: str, alpha: float = 0.55) -> Image.Image:
    """The image with the mask tinted over it, its outline drawn, and the caption in a band underneath.

    Args:
        image: RGB image.
        mask: bool `[H, W]` at the image's size.
        caption: text shown under the picture (the prompt).
    """
    mask = np.asarray(mask, dtype=bool)
    pixels = np.asarray(image, dtype=np.float32)
    tint = np.asarray(OVERLAY_COLOUR, dtype=np.float32)
    pixels[mask] = (1 - alpha) * pixels[mask] + alpha * tint
    edge = mask & ~(
        np.pad(mask, 1, mode="edge")[2:, 1:-1] & np.pad(mask, 1, mode="edge")[:-2, 1:-1]
        & np.pad(mask, 1, mode="edge")[1:-1, 2:] & np.pad(mask, 1, mode="edge")[1:-1, :-2]
    )
    pixels[edge] = tint
    tinted = Image.fromarray(pixels.astype(np.uint8))
    font = ImageFont.load_default(size=max(12, image.width // 28))
    band = int(font.size * 1.8)
    canvas = Image.new("RGB", (image.width, image.height + band), (255, 255, 255))
    canvas.paste(tinted, (0, 0))
    ImageDraw.Draw(canvas).text((6, image.height + band // 5), caption, fill=(0, 0, 0), font=font)
    return canvas


def segment_file(
    image_path: str | Path,
    prompt: str,
    model=None,
    processor=None,
    output_prefix: str | Path | None = None,
    query_kind: str = "phrase",
) -> dict:
    """Segment `image_path` from `prompt`; write `{prefix}_mask.png` and `{prefix}_overlay.png`.

    Returns `{"mask": bool [H, W], "area": pixels, "fraction": area / pixels, "mask_path", "overlay_path"}`.
    """
    if not prompt or not prompt.strip():
        raise CLIError("the prompt is empty: say what to segment, e.g. \"red circle\"")
    image = read_image(image_path)
    if model is None or processor is None:
        model, processor = load_model()
    mask = model.segment(processor, image, prompt.strip(), query_kind=query_kind)[0].cpu().numpy()
    prefix = Path(output_prefix) if output_prefix else Path(image_path).with_suffix("").name
    mask_path, overlay_path = Path(f"{prefix}_mask.png"), Path(f"{prefix}_overlay.png")
    with atomic_output_file(mask_path) as staging:
        Image.fromarray(mask.astype(np.uint8) * 255).save(staging, format="PNG")
    with atomic_output_file(overlay_path) as staging:
        render_overlay(image, mask, prompt.strip()).save(staging, format="PNG")
    area = int(mask.sum())
    return {"mask": mask, "area": area, "fraction": area / mask.size, "mask_path": mask_path,
            "overlay_path": overlay_path}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfie-segment", description=__doc__.split("\n\n")[0])
    parser.add_argument("image", help="image file to segment")
    parser.add_argument("prompt", help="what to segment: a phrase (\"red circle\") or, with --kind instruction, a question")
    parser.add_argument("--model", help="model folder or Hub id (default: the shipped RefShapes model)")
    parser.add_argument("--output", help="prefix of the written files (default: the image's name, in this folder)")
    parser.add_argument("--kind", choices=["phrase", "instruction"], default="phrase", help="prompt template")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    try:
        model, processor = load_model(args.model, args.device)
        result = segment_file(args.image, args.prompt, model, processor, args.output, args.kind)
    except CLIError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    height, width = result["mask"].shape
    print(
        f"{args.prompt!r}: mask of {result['area']} px ({100 * result['fraction']:.1f}% of {width}x{height}) -> "
        f"{result['mask_path']}, {result['overlay_path']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
