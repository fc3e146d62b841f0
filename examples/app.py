"""A demo page: upload an image, type what to segment, see the mask over the image.

    pip install -e ".[app]"
    python examples/app.py [--model DIR_OR_HUB_ID] [--port 7860] [--device auto]

With no `--model` it serves the small RefShapes model shipped in the package (try the bundled example). The page
draws the same overlay as `selfie-segment` (`modeling_selfie.overlay.render_overlay`).
"""

import argparse
import warnings
from pathlib import Path

import gradio as gr

from modeling_selfie.cli import load_model, segment_with_scores
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


def make_segment(model, processor):
    """The page's action: `(PIL image, prompt, "phrase" | "instruction")` -> `(overlay image, Markdown summary)`."""

    def segment(image, prompt: str, kind: str = "phrase"):
        if image is None:
            raise gr.Error("Upload an image first.")
        if not prompt or not prompt.strip():
            raise gr.Error("Type what to segment, e.g. 'red circle'.")
        image, prompt = rgb_image(image), prompt.strip()  # 16-bit scaled (EXIF orientation: gradio applies it)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnknownWordsWarning)
            ((mask, score, iou),) = segment_with_scores(model, processor, image, [prompt], kind)
        area = int(mask.sum())
        summary = f"**{prompt}**: {area} px ({100 * area / mask.size:.1f}% of the image), presence score {score:.2f}"
        if iou is not None:
            summary += f", predicted IoU {iou:.2f}"
        for warning in caught:
            if issubclass(warning.category, UnknownWordsWarning):
                gr.Warning(str(warning.message))
                summary += f"\n\nWarning: {warning.message}"
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
                # image_mode=None: the file's own mode, as `rgb_image` reads 16-bit images (gradio's RGB clips them)
                image = gr.Image(type="pil", image_mode=None, label="Image", elem_id="input-image")
                prompt = gr.Textbox(label="What to segment", placeholder="red circle", elem_id="prompt")
                kind = gr.Radio(["phrase", "instruction"], value="phrase", label="Prompt kind")
                button = gr.Button("Segment", variant="primary", elem_id="segment-button")
            with gr.Column():
                overlay = gr.Image(type="pil", format="png", label="Mask overlay", elem_id="overlay")  # lossless
                summary = gr.Markdown(elem_id="summary")
        gr.Examples([[str(EXAMPLE), "red circle", "phrase"]], [image, prompt, kind], elem_id="examples")
        button.click(segment, [image, prompt, kind], [overlay, summary], api_name="segment")
        prompt.submit(segment, [image, prompt, kind], [overlay, summary], api_name=False)
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
