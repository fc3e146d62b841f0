"""The overlay picture shared by `selfie-segment`, the demo page and the README grid: the mask in its own colours, the
rest dimmed, an outline in a colour that stands out there, and a caption that shows every script people type (not
the font's missing-glyph box) and stays inside the picture."""

import numpy as np
import pytest
from PIL import Image, ImageFont

from modeling_selfie import overlay
from modeling_selfie.overlay import CAPTION_LINES, ELLIPSIS, caption_font, render_overlay, wrap_caption

PROMPTS = {
    "Latin": "Größe, naïve café — œuvre żółw",
    "Cyrillic": "красный круг слева",
    "Greek": "κόκκινος κύκλος αριστερά",
    "Chinese": "左边的红色圆圈",
    "Japanese": "赤い丸とカタカナ",
    "Korean": "왼쪽의 빨간 원",
}
NOT_IN_ANY_FONT = "\U0010fffd"  # a private-use code point: every font draws its .notdef glyph for it


def glyph(font: ImageFont.FreeTypeFont, character: str) -> tuple:
    mask = font.getmask(character)
    return mask.size, bytes(mask)


@pytest.mark.parametrize("script", PROMPTS)
def test_caption_font_has_a_real_glyph_for_every_character(script):
    font = caption_font(16)
    missing = glyph(font, NOT_IN_ANY_FONT)
    for character in PROMPTS[script].replace(" ", ""):
        size, pixels = glyph(font, character)
        assert (size, pixels) != missing and any(pixels), (
            f"{character!r} ({script}) is drawn as the missing-glyph box by {getattr(font, 'path', font)}: install "
            f"a font of modeling_selfie.overlay.CAPTION_FONTS (Debian: apt-get install fonts-wqy-microhei)"
        )


def test_the_check_sees_missing_glyphs_in_a_font_without_cjk():
    latin_only = ImageFont.load_default(16)  # Pillow's built-in font
    missing = glyph(latin_only, NOT_IN_ANY_FONT)
    assert glyph(latin_only, "赤") == missing and glyph(latin_only, "a") != missing


@pytest.mark.parametrize("script", PROMPTS)
def test_overlay_draws_the_caption_inside_the_band(script):
    image = Image.new("RGB", (200, 80), (40, 40, 40))
    mask = np.zeros((80, 200), dtype=bool)
    with_caption = np.asarray(render_overlay(image, mask, PROMPTS[script]))
    blank = np.asarray(render_overlay(image, mask, ""))
    assert with_caption.shape == blank.shape
    assert np.array_equal(with_caption[:80], blank[:80])  # the caption never touches the picture
    ink = (with_caption[80:] != blank[80:]).any(axis=-1)
    columns = np.flatnonzero(ink.any(axis=0))
    assert columns.size and columns[0] > 0 and columns[-1] < 199


def test_long_captions_wrap_to_the_width_and_end_in_an_ellipsis():
    font = caption_font(14)
    words = "the small red circle to the left of the largest blue star above the green square near the edge"
    lines = wrap_caption(words, font, 150)
    assert len(lines) == CAPTION_LINES and all(font.getlength(line) <= 150 for line in lines)
    assert lines[-1].endswith(ELLIPSIS)
    assert words.startswith(" ".join(lines)[:-1].rstrip())  # broken at spaces, words kept whole and in order
    assert lines[0] == "the small red circle to"[: len(lines[0])] and not lines[0].endswith(" ")

    cjk = "左边的红色圆圈和右边的蓝色星星以及中间最大的绿色正方形"
    lines = wrap_caption(cjk, font, 100)  # no spaces: broken between characters
    assert len(lines) == CAPTION_LINES and all(font.getlength(line) <= 100 for line in lines)
    assert cjk.startswith(lines[0] + lines[1][:-1]) and lines[1].endswith(ELLIPSIS)

    assert wrap_caption("red   circle\n", font, 150) == ["red circle"]
    assert wrap_caption("", font, 150) == []


def test_overlays_of_one_image_have_one_size_whatever_the_caption():
    image = Image.new("RGB", (120, 90))
    mask = np.zeros((90, 120), dtype=bool)
    sizes = {render_overlay(image, mask, caption).size for caption in ("", "red", "a long caption " * 20, "赤" * 50)}
    assert len(sizes) == 1 and sizes.pop()[0] == 120


def picture_of(image: Image.Image, mask: np.ndarray) -> np.ndarray:
    return np.asarray(render_overlay(image, mask, "x"), dtype=np.int16)[: image.height]


def test_the_mask_keeps_its_colours_the_rest_is_dimmed_and_an_outline_runs_around_it():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    mask = np.zeros((60, 80), dtype=bool)
    mask[20:40, 30:50] = True
    picture = picture_of(Image.fromarray(pixels), mask)
    assert np.array_equal(picture[mask], pixels[mask])  # every mask pixel as in the image
    ring = np.zeros_like(mask)
    ring[18:42, 28:52] = True
    ring &= ~mask  # 2 px around the mask (80x60: the thinnest outline)
    assert len(np.unique(picture[ring], axis=0)) == 1 and tuple(picture[ring][0]) in overlay.OUTLINE_COLOURS
    far = np.ones_like(mask)
    far[10:50, 20:60] = False
    outside, before = picture[far], pixels[far].astype(np.int16)
    assert (outside.sum(-1) < before.sum(-1)).mean() > 0.95  # darker
    assert np.ptp(outside, axis=-1).mean() < 0.5 * np.ptp(before, axis=-1).mean()  # greyer


RED, PINK, BLUE, YELLOW = (215, 38, 38), (255, 105, 180), (35, 80, 215), (240, 205, 30)


@pytest.mark.parametrize("colour", [RED, PINK, BLUE, YELLOW])
def test_the_outline_colour_stands_out_from_the_shape_and_its_surroundings(colour):
    pixels = np.full((100, 120, 3), 245, dtype=np.uint8)
    mask = np.zeros((100, 120), dtype=bool)
    mask[30:70, 40:80] = True
    pixels[mask] = colour
    picture = picture_of(Image.fromarray(pixels), mask)
    outline = tuple(int(v) for v in picture[28, 60])
    assert outline in overlay.OUTLINE_COLOURS
    assert np.linalg.norm(np.subtract(outline, colour)) > 200  # far from the shape
    assert np.linalg.norm(np.subtract(outline, picture[5, 5])) > 100  # and from the dimmed picture around it


def test_an_empty_mask_dims_the_whole_picture_without_an_outline():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    picture = picture_of(image, np.zeros((40, 50), dtype=bool))
    assert np.array_equal(picture, np.asarray(overlay.dim_background(image)))
    assert picture.sum() < 0.7 * np.asarray(image, dtype=np.int64).sum()


@pytest.fixture
def no_font_files(monkeypatch):
    monkeypatch.setattr(overlay, "CAPTION_FONTS", ("/nonexistent/font.ttf",))
    caption_font.cache_clear()
    yield
    caption_font.cache_clear()


def test_falls_back_to_pillows_font_when_no_font_file_is_there(no_font_files):
    font = caption_font(14)
    assert glyph(font, "r") == glyph(ImageFont.load_default(14), "r")
    picture = render_overlay(Image.new("RGB", (100, 40)), np.zeros((40, 100), dtype=bool), "red circle")
    assert picture.width == 100 and (np.asarray(picture)[40:] < 128).any()  # the caption is still drawn
