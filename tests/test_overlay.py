"""The overlay picture shared by `selfie-segment`, the demo page and the README grid: tint, outline, and a caption
that shows every script people type (not the font's missing-glyph box) and stays inside the picture."""

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


def test_overlay_tints_only_the_mask_and_outlines_it():
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:8, 5:15] = True
    picture = np.array(render_overlay(image, mask, "x"))[:10]
    assert picture[mask].any(axis=-1).all() and not picture[~mask].any()
    assert (picture[2, 5:15] == overlay.OVERLAY_COLOUR).all() and not (picture[4, 7] == overlay.OVERLAY_COLOUR).all()


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
