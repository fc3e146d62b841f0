"""The overlay picture of `selfie-segment`, the demo page and the README grid: the mask tinted over the image, its
outline drawn, and the prompt as a caption in a band underneath.

Captions are set in the first font of `CAPTION_FONTS` found on the machine. The first, WenQuanYi Micro Hei (Debian
package `fonts-wqy-microhei`, installed by `.ci/browser.sh`), covers Latin, Greek, Cyrillic, CJK and Hangul; the
fallbacks cover less (DejaVu Sans: no CJK; Pillow's built-in font: Latin only), and characters a font lacks show as
its missing-glyph box. Needs only numpy and Pillow (no torch), so the demo page and the CLI share it cheaply.
"""

import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

OVERLAY_COLOUR = (255, 0, 180)
CAPTION_FONTS = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",  # fonts-wqy-microhei: Latin, Greek, Cyrillic, CJK, Hangul
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",  # fonts-noto-cjk: the same scripts
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",  # fonts-dejavu-core: Latin, Greek, Cyrillic
)
CAPTION_LINES = 2
ELLIPSIS = "\u2026"


@functools.lru_cache(maxsize=16)
def caption_font(size: int) -> ImageFont.FreeTypeFont:
    """The first of `CAPTION_FONTS` that exists, at `size` px; Pillow's built-in font when none does."""
    for path in CAPTION_FONTS:
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size)


def _longest_fitting_prefix(text: str, font: ImageFont.FreeTypeFont, width: float, suffix: str = "") -> int:
    """Length of the longest prefix `p` of `text` with `font.getlength(p + suffix) <= width` (binary search)."""
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if font.getlength(text[:middle] + suffix) <= width:
            low = middle
        else:
            high = middle - 1
    return low


def wrap_caption(text: str, font: ImageFont.FreeTypeFont, width: float, max_lines: int = CAPTION_LINES) -> list[str]:
    """`text` in at most `max_lines` lines that each fit `width` px in `font`.

    Lines break at the last space that fits, or between characters where there is none (CJK has no spaces); text
    that still does not fit is cut at the end of the last line, which then ends with "…". Runs of whitespace become
    one space.
    """
    rest = " ".join(text.split())
    lines = []
    while rest and len(lines) < max_lines:
        cut = len(rest) if font.getlength(rest) <= width else max(1, _longest_fitting_prefix(rest, font, width))
        space = rest.rfind(" ", 0, cut + 1)
        if cut < len(rest) and space > 0:
            cut = space
        lines.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        last = f"{lines[-1]} {rest}"
        lines[-1] = last[: _longest_fitting_prefix(last, font, width, ELLIPSIS)].rstrip() + ELLIPSIS
    return lines


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with at least one 4-neighbour outside it (the image border counts as inside)."""
    padded = np.pad(mask, 1, mode="edge")
    interior = padded[2:, 1:-1] & padded[:-2, 1:-1] & padded[1:-1, 2:] & padded[1:-1, :-2]
    return mask & ~interior


def render_overlay(image: Image.Image, mask, caption: str, alpha: float = 0.55) -> Image.Image:
    """The image with the mask tinted over it, its outline drawn, and the caption in a band underneath.

    Args:
        image: RGB image of size `(W, H)`.
        mask: bool `[H, W]` (numpy, or a CPU tensor) at the image's size.
        caption: text shown under the picture (the prompt), wrapped to the image's width in up to
            `CAPTION_LINES` lines and ellipsised beyond them.
        alpha: opacity of the tint.
    Returns:
        An RGB image `W` wide: the tinted picture on top of a white caption band of fixed height (`CAPTION_LINES`
        lines, whatever the caption), so overlays of one image all have the same size.
    """
    mask = np.asarray(mask, dtype=bool)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    tint = np.asarray(OVERLAY_COLOUR, dtype=np.float32)
    pixels[mask] = (1 - alpha) * pixels[mask] + alpha * tint
    pixels[_outline(mask)] = tint

    font = caption_font(max(12, image.width // 28))
    ascent, descent = font.getmetrics()
    line_height, margin = ascent + descent + 2, max(3, font.size // 3)
    canvas = Image.new("RGB", (image.width, image.height + CAPTION_LINES * line_height + 2 * margin), "white")
    canvas.paste(Image.fromarray(pixels.astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(wrap_caption(caption, font, image.width - 2 * margin)):
        draw.text((margin, image.height + margin + i * line_height), line, fill=(0, 0, 0), font=font)
    return canvas
