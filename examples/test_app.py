"""examples/app.py without a browser: the page builds, serves, and its `/segment` action returns the CLI's overlay.

Needs the `app` extra (gradio); run by `.ci/browser.sh` (with the browser test beside it when Chromium is there):

    pip install -e ".[app,dev]"
    python -m pytest examples/test_app.py -q -p no:cacheprovider

It serves the model shipped in the package, as the page does by default.
"""

import contextlib
import importlib.util
import os
import re
import socket
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from modeling_selfie.cli import load_model, segment_with_scores
from modeling_selfie.data.refshapes import COLOURS, FORMS
from modeling_selfie.overlay import render_overlay
from modeling_selfie.processing_selfie import UnknownWordsWarning

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parents[1]
APP_FILE = Path(__file__).parent / "app.py"
spec = importlib.util.spec_from_file_location("selfie_demo_app", APP_FILE)
app_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(app_module)
helpers_spec = importlib.util.spec_from_file_location("selfie_test_helpers", ROOT / "tests" / "helpers.py")
test_helpers = importlib.util.module_from_spec(helpers_spec)  # png_claiming: a PNG header written by hand
helpers_spec.loader.exec_module(test_helpers)


@pytest.fixture(scope="module")
def model_and_processor():
    return load_model()


@pytest.fixture(scope="module")
def example():
    return Image.open(app_module.EXAMPLE).convert("RGB")


def expected_overlay(model_and_processor, image, prompt):
    ((mask, score, iou),) = segment_with_scores(*model_and_processor, image, [prompt])
    return np.asarray(render_overlay(image, mask, prompt)), mask, score, iou


@pytest.mark.parametrize("prompt, written, unknown", [
    ("red circle", "red circle", None), ("Red Circle!", "Red Circle\\!", None),
    ("左边的红色圆圈", "左边的红色圆圈", "'左边的红色圆圈'"), ("the cat", "the cat", "'cat'"),
    ("*red* [circle](javascript:x) <b>", "\\*red\\* \\[circle\\]\\(javascript\\:x\\) \\<b\\>",
     "'javascript', 'x', 'b'"),
])
def test_segment_action_returns_the_overlay_and_a_summary(model_and_processor, example, prompt, written, unknown):
    """The summary is Markdown: what the user wrote is escaped (`written`, by hand), so that it shows as typed."""
    segment = app_module.make_segment(*model_and_processor)
    overlay, summary = segment(example, f"  {prompt} ", "phrase")
    with pytest.warns(UnknownWordsWarning) if unknown else contextlib.nullcontext():
        pixels, mask, score, iou = expected_overlay(model_and_processor, example, prompt)
    assert np.array_equal(np.asarray(overlay), pixels) and overlay.width == example.width
    line = f"**{written}**: {int(mask.sum())} px ({100 * mask.mean():.1f}% of the image), presence score {score:.2f}"
    line += f", predicted IoU {iou:.2f}" * (iou is not None)  # the shipped model has an IoU head
    if unknown is None:
        assert summary == line
    else:  # the words the model cannot read are named on the page, and "<unk>" shows as written
        warning = summary.split("\n")[-1]
        assert summary.startswith(line + "\n\nWarning: ") and unknown in warning and "as \\<unk\\>" in warning


def test_bad_uploads_and_prompts_get_their_reason(model_and_processor, tmp_path):
    """As gradio hands the upload over unprocessed (`{"path": ...}`): files written by hand and by PIL."""
    (tmp_path / "bomb.png").write_bytes(test_helpers.png_claiming(100_000, 100_000))
    (tmp_path / "notes.png").write_text("not a picture")
    Image.new("RGB", (2, 2), (220, 30, 30)).save(tmp_path / "tiny.png")
    segment = app_module.make_segment(*model_and_processor)
    for name, prompt, message in [
        ("bomb.png", "red", "bomb.png is too large: 10,000,000,000 pixels, more than the limit of 89,478,485"),
        ("notes.png", "red", "not an image file"),
        ("tiny.png", "?!...,;", "holds no word"),
    ]:
        with pytest.raises(gr.Error, match=re.escape(message)):
            segment({"path": str(tmp_path / name)}, prompt, "phrase")
    overlay, summary = segment({"path": str(tmp_path / "tiny.png")}, "red circle", "phrase")
    assert overlay.width == 2 and "**red circle**: " in summary


def test_the_page_says_what_the_default_model_knows(model_and_processor):
    vocabulary = model_and_processor[1].tokenizer.get_vocab()
    note = app_module.DEFAULT_MODEL_NOTE
    assert "\n" not in note and all(word in note and word in vocabulary for word in [*COLOURS, *FORMS])
    app = app_module.build_app(*model_and_processor, note=note)
    assert any(component.get("props", {}).get("value") == note for component in app.config["components"])


@pytest.mark.parametrize("image, prompt, message", [(None, "red circle", "Upload an image"), ("example", "  ", "Type")])
def test_segment_action_asks_for_what_is_missing(model_and_processor, example, image, prompt, message):
    segment = app_module.make_segment(*model_and_processor)
    with pytest.raises(gr.Error, match=message):
        segment(example if image == "example" else image, prompt, "phrase")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_api_call() -> str:
    """The README's `gradio_client` example (the python block after "Its action is also an API")."""
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("Its action is also an API") :].split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture(scope="module")
def served(model_and_processor):
    """The page, served on a free port: yields its URL."""
    app = app_module.build_app(*model_and_processor)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


def test_the_readmes_client_call_answers(served, model_and_processor, example, monkeypatch):
    code = readme_api_call()
    assert "handle_file(" in code and "http://127.0.0.1:7860/" in code
    monkeypatch.chdir(ROOT)  # its image path is relative to the repository
    namespace = {}
    exec(code.replace("http://127.0.0.1:7860/", served), namespace)
    pixels, mask, _, _ = expected_overlay(model_and_processor, example, "red circle")
    assert np.array_equal(np.asarray(Image.open(namespace["overlay_file"]).convert("RGB")), pixels)
    assert namespace["summary"].startswith(f"**red circle**: {int(mask.sum())} px")


def test_the_page_reads_sixteen_bit_and_exif_rotated_uploads_as_shown(served, model_and_processor, tmp_path):
    gray8 = np.random.default_rng(0).integers(0, 256, (48, 64), dtype=np.uint16)
    Image.fromarray(gray8 * 257).save(tmp_path / "gray16.png")  # 16-bit grayscale, from numpy through PIL
    stored = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to show"
    Image.fromarray(stored).save(tmp_path / "photo.jpg", format="JPEG", exif=exif)
    decoded = np.asarray(Image.open(tmp_path / "photo.jpg").convert("RGB"))
    shown = {"gray16.png": Image.fromarray(gray8.astype(np.uint8)).convert("RGB"),
             "photo.jpg": Image.fromarray(np.ascontiguousarray(np.rot90(decoded, k=-1)))}
    client = Client(served, verbose=False)
    for name, image in shown.items():
        overlay_file, _ = client.predict(handle_file(str(tmp_path / name)), "red", "phrase", api_name="/segment")
        pixels, _, _, _ = expected_overlay(model_and_processor, image, "red")
        assert np.array_equal(np.asarray(Image.open(overlay_file).convert("RGB")), pixels), name


def test_the_served_page_refuses_a_decompression_bomb_with_its_reason(served, tmp_path):
    (tmp_path / "bomb.png").write_bytes(test_helpers.png_claiming(100_000, 100_000))
    client = Client(served, verbose=False)
    with pytest.raises(Exception, match="is too large: 10,000,000,000 pixels"):
        client.predict(handle_file(str(tmp_path / "bomb.png")), "red", "phrase", api_name="/segment")
