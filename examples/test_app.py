"""examples/app.py without a browser: the page builds, serves, and its `/segment` action returns the CLI's overlay.

Needs the `app` extra (gradio); run by `.ci/browser.sh` (with the browser test beside it when Chromium is there):

    pip install -e ".[app,dev]"
    python -m pytest examples/test_app.py -q -p no:cacheprovider

It serves the model shipped in the package, as the page does by default.
"""

import contextlib
import importlib.util
import os
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
APP_FILE = Path(__file__).parent / "app.py"
spec = importlib.util.spec_from_file_location("selfie_demo_app", APP_FILE)
app_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(app_module)


@pytest.fixture(scope="module")
def model_and_processor():
    return load_model()


@pytest.fixture(scope="module")
def example():
    return Image.open(app_module.EXAMPLE).convert("RGB")


def expected_overlay(model_and_processor, image, prompt):
    ((mask, score),) = segment_with_scores(*model_and_processor, image, [prompt])
    return np.asarray(render_overlay(image, mask, prompt)), mask, score


@pytest.mark.parametrize("prompt, unknown", [("red circle", None), ("Red Circle!", None), ("左边的红色圆圈", "'左边的红色圆圈'"),
                                             ("the cat", "'cat'")])
def test_segment_action_returns_the_overlay_and_a_summary(model_and_processor, example, prompt, unknown):
    segment = app_module.make_segment(*model_and_processor)
    overlay, summary = segment(example, f"  {prompt} ", "phrase")
    with pytest.warns(UnknownWordsWarning) if unknown else contextlib.nullcontext():
        pixels, mask, score = expected_overlay(model_and_processor, example, prompt)
    assert np.array_equal(np.asarray(overlay), pixels) and overlay.width == example.width
    line = f"**{prompt}**: {int(mask.sum())} px ({100 * mask.mean():.1f}% of the image), presence score {score:.2f}"
    if unknown is None:
        assert summary == line
    else:  # the words the model cannot read are named on the page
        assert summary.startswith(line + "\n\nWarning: ") and unknown in summary.split("\n")[-1]


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


def test_served_page_answers_its_segment_api(model_and_processor, example):
    app = app_module.build_app(*model_and_processor)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        overlay_file, summary = client.predict(
            handle_file(str(app_module.EXAMPLE)), "red circle", "phrase", api_name="/segment"
        )
    finally:
        app.close()
    pixels, mask, _ = expected_overlay(model_and_processor, example, "red circle")
    assert np.array_equal(np.asarray(Image.open(overlay_file).convert("RGB")), pixels)
    assert summary.startswith(f"**red circle**: {int(mask.sum())} px")
