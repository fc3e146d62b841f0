"""A demo page: upload an image, type what to segment, see the mask over the image.

    pip install -e ".[app]"
    python examples/app.py [--model DIR_OR_HUB_ID] [--port 7860]

With no `--model` it serves the small RefShapes model shipped in the package (try the bundled example).
"""

import argparse
from pathlib import Path

import gradio as gr

from modeling_selfie.cli import load_model, render_overlay

EXAMPLE = Path(__file__).parent / "assets" / "shapes.png"


def build_app(model, processor) -> gr.Blocks:
    """The Gradio page around `model.segment` and the CLI's overlay picture."""

    def segment(image, prompt: str, kind: str):
        if image is None:
            raise gr.Error("Upload an image first.")
        if not prompt or not prompt.strip():
            raise gr.Error("Type what to segment, e.g. 'red circle'.")
        mask = model.segment(processor, image.convert("RGB"), prompt.strip(), query_kind=kind)[0].cpu().numpy()
        area = int(mask.sum())
        summary = f"**{prompt.strip()}**: {area} px ({100 * area / mask.size:.1f}% of the image)"
        return render_overlay(image.convert("RGB"), mask, prompt.strip()), summary

    with gr.Blocks(title="SELFIE: segment with one [SEG] token") as app:
        gr.Markdown("## SELFIE\nSegment an image from a phrase or a question, with the MLLM itself as the segmenter.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Image", elem_id="input-image")
                prompt = gr.Textbox(label="What to segment", placeholder="red circle", elem_id="prompt")
                kind = gr.Radio(["phrase", "instruction"], value="phrase", label="Prompt kind")
                button = gr.Button("Segment", variant="primary", elem_id="segment-button")
            with gr.Column():
                overlay = gr.Image(type="pil", label="Mask overlay", elem_id="overlay")
                summary = gr.Markdown(elem_id="summary")
        gr.Examples([[str(EXAMPLE), "red circle", "phrase"]], [image, prompt, kind], elem_id="examples")
        button.click(segment, [image, prompt, kind], [overlay, summary])
        prompt.submit(segment, [image, prompt, kind], [overlay, summary])
    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder or Hub id (default: the shipped RefShapes model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    model, processor = load_model(args.model)
    build_app(model, processor).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
