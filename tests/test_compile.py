"""torch.compile: the SELFIE head traces without graph breaks, and the compiled forward gives the same masks."""

import torch

from modeling_selfie.presets import tiny_model_and_processor

from .helpers import WORDS, random_image


def test_segmentation_head_compiles_without_graph_breaks():
    model, _ = tiny_model_and_processor(WORDS)
    head = model.seg_head
    d = model.config.text_config.hidden_size
    image_hidden, image_features = torch.randn(6, 4, d), torch.randn(6, 4, d)
    image_features_hq = torch.randn(6, 16, d)
    seg_hidden = torch.randn(2, d)

    def fused(image_hidden, image_features, image_features_hq, seg_hidden):
        llm_pixels = head.llm_pixel_features(image_hidden, 2, 3)
        pixels = head.pixel_features(llm_pixels, image_features, image_features_hq, 2, 3)
        return head.mask_logits(pixels.expand(2, -1, -1, -1), head.seg_embeddings(seg_hidden))

    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="eager")  # fullgraph: any graph break raises
    with torch.no_grad():
        expected = fused(image_hidden, image_features, image_features_hq, seg_hidden)
        got = compiled(image_hidden, image_features, image_features_hq, seg_hidden)
    assert got.shape == (2, 16, 24)
    torch.testing.assert_close(got, expected)


def test_compiled_forward_gives_the_same_masks():
    model, processor = tiny_model_and_processor(WORDS)
    inputs = processor(images=[random_image(80, 64), random_image(64, 64, seed=1)], queries=["red circle", "shape"])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        expected = model(**inputs).pred_masks
        got = compiled(**inputs).pred_masks
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b)
