"""A demo page: upload an image, type what to segment, see the mask over the image.

    pip install -e ".[app]"
    python examples/app.py [--model DIR_OR_HUB_ID] [--port 7860] [--device auto]

With no `--model` it serves the small RefShapes model shipped in the package (try the bundled example). The page
draws the same overlay as `selfie-segment` (`modeling_selfie.overlay.render_overlay`).
"""

import argparse
import html
import re
import warnings
from pathlib import Path

import gradio as gr
from PIL import Image

from modeling_selfie.cli import CLIError, load_model, read_image, segment_with_scores
from modeling_selfie.cli_inputs import prompt_problem
from modeling_selfie.data.refshapes import COLOURS, FORMS
from modeling_selfie.io_utils import rgb_image
from modeling_selfie.overlay import render_overlay
from modeling_selfie.processing_selfie import UnknownWordsWarning

EXAMPLE = Path(__file__).parent / "assets" / "shapes.png"
DEFAULT_MODEL_NOTE = (  # what the shipped RefShapes model was trained on, in one line
    f"The default model knows only coloured shapes: colours {', '.join(COLOURS)}; shapes {', '.join(FORMS)} "
    "(and plurals, \"shape\"); position (leftmost, topmost, lowest, on the left, at the top), size (largest, "
    "smallest, big, small), relations (left of, right of, above, below the ...), \"all\" / \"both\", and "
    "\"Which ...?\" questions as instructions. Other words are unknown to it."
)


def markdown_text(text: str) -> str:
    """`text` for a Markdown component, shown as written: every character Markdown or HTML would read (`*`, `_`,
    `<unk>`, `[...](...)`, `&`, ...) backslash-escaped."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>&~$:])", r"\\\1", text)


def make_segment(model, processor):
    """The page's action: `(image, prompt, "phrase" | "instruction")` -> `(overlay image, Markdown summary)`. The
    image is a PIL image, a file path, or the page's upload as gradio sends it unprocessed (`{"path": ...}`): the
    file is read as `selfie-segment` reads it (`io_utils.read_image`: its size limit, EXIF orientation, 16-bit
    and transparent images), and one it cannot read gets its one-line reason. What the user wrote is escaped
    wherever the page shows it."""

    def segment(image, prompt: str, kind: str = "phrase"):
        image = image.get("path") if isinstance(image, dict) else image
        if image is None:
            raise gr.Error("Upload an image first.")
        if not prompt or not prompt.strip():
            raise gr.Error("Type what to segment, e.g. 'red circle'.")
        if problem := prompt_problem(prompt, processor.query_normalization, kind):
            raise gr.Error(html.escape(problem))
        try:  # as shown: EXIF orientation applied, 16-bit scaled, transparency over white
            image = rgb_image(image) if isinstance(image, Image.Image) else read_image(image)
        except CLIError as error:
            raise gr.Error(html.escape(str(error))) from error
        prompt = prompt.strip()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnknownWordsWarning)
            ((mask, score, iou),) = segment_with_scores(model, processor, image, [prompt], kind)
        area = int(mask.sum())
        summary = (f"**{markdown_text(prompt)}**: {area} px ({100 * area / mask.size:.1f}% of the image), presence "
                   f"score {score:.2f}")
        if iou is not None:
            summary += f", predicted IoU {iou:.2f}"
        for warning in caught:
            if issubclass(warning.category, UnknownWordsWarning):
                gr.Warning(html.escape(str(warning.message)))
                summary += f"\n\nWarning: {markdown_text(str(warning.message))}"
            else:
                warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
        return render_overlay(image, mask, prompt), summary

    return segment


def build_app(model, processor, note: str | None = None) -> gr.Blocks:
    """The Gradio page around `model.segment` and the CLI's overlay picture; its action is the `/segment` API.
    `note`: a line under the title saying what the model can segment."""
    segment = make_segment(model, processor)
    with gr.Blocks(title="SELFIE: segment with one [SEG] token") as app:
        gr.Markdown("## SELFIE\nSegment an image from a phrase or a question, with the MLLM itself as the segmenter.")
        if note:
            gr.Markdown(note, elem_id="model-note")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="Image", elem_id="input-image")
                prompt = gr.Textbox(label="What to segment", placeholder="red circle", elem_id="prompt")
                kind = gr.Radio(["phrase", "instruction"], value="phrase", label="Prompt kind")
                button = gr.Button("Segment", variant="primary", elem_id="segment-button")
            with gr.Column():
                overlay = gr.Image(type="pil", format="png", label="Mask overlay", elem_id="overlay")  # lossless
                summary = gr.Markdown(elem_id="summary")
        gr.Examples([[str(EXAMPLE), "red circle", "phrase"]], [image, prompt, kind], elem_id="examples")
        # preprocess=False: the upload's path reaches `segment` unopened (gradio's own Pillow call would refuse a
        # decompression bomb with a generic error, and decode the image once more)
        button.click(segment, [image, prompt, kind], [overlay, summary], api_name="segment", preprocess=False)
        prompt.submit(segment, [image, prompt, kind], [overlay, summary], api_name=False, preprocess=False)
    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder or Hub id (default: the shipped RefShapes model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda, ...")
    args = parser.parse_args(argv)
    model, processor = load_model(args.model, args.device)
    note = DEFAULT_MODEL_NOTE if args.model is None else None
    build_app(model, processor, note).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
