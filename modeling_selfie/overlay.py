"""The overlay picture of `selfie-segment`, the demo page and the README grid: the mask in its own colours, the rest
of the image dimmed to grey, an outline around the mask in a colour chosen against the image, and the prompt as a
caption in a band underneath. An empty mask leaves the whole picture dimmed.

Captions are set in the first font of `CAPTION_FONTS` found on the machine. The first, WenQuanYi Micro Hei (Debian
package `fonts-wqy-microhei`, installed by `.ci/browser.sh`), covers Latin, Greek, Cyrillic, CJK and Hangul; the
fallbacks cover less (DejaVu Sans: no CJK; Pillow's built-in font: Latin only), and characters a font lacks show as
its missing-glyph box. Needs only numpy and Pillow (no torch), so the demo page and the CLI share it cheaply.
"""

import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# The outline takes the one of these that stands out most from the colours it runs along (the mask and the dimmed
# picture around it). No magenta: over red, pink or purple it reads as one more shade of them.
OUTLINE_COLOURS = ((0, 255, 255), (255, 255, 0), (0, 255, 0), (255, 255, 255), (0, 0, 0))
BACKGROUND_SATURATION = 0.35  # how much colour the picture outside the mask keeps (0: grey)
BACKGROUND_BRIGHTNESS = 0.6  # and how bright it stays
COLOUR_SAMPLES = 20_000
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


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """`mask` grown by a square of `radius` pixels each way: per axis, OR-ed with shifted copies whose reach
    doubles each time (log2(radius) steps, fast on photos)."""
    grown = np.pad(mask, radius)  # a margin the shifts never fill up, so np.roll wraps nothing in
    for axis in (0, 1):
        reach = 0
        while reach < radius:
            step = min(2 * reach + 1, radius - reach)
            grown = grown | np.roll(grown, step, axis) | np.roll(grown, -step, axis)
            reach += step
    return grown[radius : radius + mask.shape[0], radius : radius + mask.shape[1]]


def dim_background(image: Image.Image) -> Image.Image:
    """The RGB `image` turned towards grey (`BACKGROUND_SATURATION`) and darkened (`BACKGROUND_BRIGHTNESS`)."""
    grey = image.convert("L").convert("RGB")
    return Image.blend(grey, image, BACKGROUND_SATURATION).point(lambda value: round(value * BACKGROUND_BRIGHTNESS))


def outline_colour(pixels: np.ndarray) -> tuple[int, int, int]:
    """The colour of `OUTLINE_COLOURS` farthest from `pixels` (`[N, 3]` RGB, the colours the outline runs
    along): the one whose distance to its nearest 5% of them is largest."""
    candidates = np.asarray(OUTLINE_COLOURS, dtype=np.float32)[:, None]
    distances = np.linalg.norm(pixels.astype(np.float32)[None] - candidates, axis=-1)
    return OUTLINE_COLOURS[int(np.argmax(np.percentile(distances, 5, axis=1)))]


def render_overlay(image: Image.Image, mask, caption: str) -> Image.Image:
    """The image with the mask in its own colours and the rest dimmed, the mask outlined in the colour of
    `OUTLINE_COLOURS` that stands out most there, and the caption in a band underneath.

    Args:
        image: RGB image of size `(W, H)`.
        mask: bool `[H, W]` (numpy, or a CPU tensor) at the image's size.
        caption: text shown under the picture (the prompt), wrapped to the image's width in up to
            `CAPTION_LINES` lines and ellipsised beyond them.
    Returns:
        An RGB image `W` wide: the picture on top of a white caption band of fixed height (`CAPTION_LINES` lines,
        whatever the caption), so overlays of one image all have the same size. The outline, `max(2, min(W, H) //
        100)` px wide, lies outside the mask, so every mask pixel keeps the image's colour.
    """
    mask = np.asarray(mask, dtype=bool)
    image = image.convert("RGB")
    pixels = np.array(Image.composite(image, dim_background(image), Image.fromarray(mask)))
    width = max(2, min(mask.shape) // 100)
    outline = _dilate(mask, width) & ~mask
    if outline.any():
        around = np.flatnonzero(_dilate(mask, 3 * width))  # the mask and the dimmed picture near the outline
        around = around[:: max(1, around.size // COLOUR_SAMPLES)]
        pixels[outline] = outline_colour(pixels.reshape(-1, 3)[around])

    font = caption_font(max(12, image.width // 28))
    ascent, descent = font.getmetrics()
    line_height, margin = ascent + descent + 2, max(3, font.size // 3)
    canvas = Image.new("RGB", (image.width, image.height + CAPTION_LINES * line_height + 2 * margin), "white")
    canvas.paste(Image.fromarray(pixels), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(wrap_caption(caption, font, image.width - 2 * margin)):
        draw.text((margin, image.height + margin + i * line_height), line, fill=(0, 0, 0), font=font)
    return canvas
