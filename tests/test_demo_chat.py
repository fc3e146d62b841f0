"""What the README and the demo model's card say about its chat: any question is answered with one of SELF1E's
answer templates holding one [SEG], and that [SEG] gets a mask."""

from pathlib import Path

import pytest

from modeling_selfie.cli import default_model_dir, load_model, read_image
from modeling_selfie.processing_selfie import ANSWERS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "assets" / "shapes.png"


@pytest.fixture(scope="module")
def demo():
    return load_model()


@pytest.mark.parametrize("question", ["What colour is the star?", "Hello, who are you?", "Describe the image."])
def test_demo_model_answers_any_question_with_a_segmentation_template(demo, question):
    model, processor = demo
    image = read_image(EXAMPLE)
    reply = model.chat(processor, image, [{"role": "user", "content": question}])
    assert reply["text"].replace(" ", "") in {answer.replace(" ", "") for answer in ANSWERS}
    assert reply["masks"].shape == (1, image.height, image.width)
    assert "Sure , the segmentation result is [SEG] ." in (default_model_dir() / "README.md").read_text()
