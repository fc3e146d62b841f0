"""torch.compile: the SELFIE head and mask construction trace without graph breaks for a fixed batch layout, and the
compiled forward gives the same masks."""

import pytest
import torch

from modeling_selfie import SegmentationLayout, SelfieForSegmentation
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


def mixed_batch(processor):
    """Two tile grids, a sample without [SEG], a sample with two [SEG] and padding: every path of the head."""
    processor.image_processor.max_patches = 6
    images = [random_image(168, 112, seed=1), random_image(56, 112, seed=2), random_image(60, 60, seed=3),
              random_image(168, 112, seed=4)]
    two = [{"role": "user", "content": "Please segment the red circle in this image."},
           {"role": "assistant", "content": "Sure, [SEG]."},
           {"role": "user", "content": "Please segment the blue square in this image."},
           {"role": "assistant", "content": "Sure, [SEG]."}]
    conversations = [processor.segmentation_conversation("red circle"), [{"role": "user", "content": "hello"}], two,
                     processor.segmentation_conversation("the blue square left")]
    return processor(images=images, conversations=conversations)


def test_layout_is_read_on_the_host_and_checked():
    model, processor = tiny_model_and_processor(WORDS)
    inputs = mixed_batch(processor)
    layout = SegmentationLayout.from_inputs(model.config, inputs["input_ids"], inputs["attention_mask"],
                                            inputs["tile_grid"])
    assert layout == SegmentationLayout(seg_counts=(1, 0, 2, 1), image_samples=(0, 1, 2, 3),
                                        tile_grids=((2, 3), (2, 1), (1, 1), (2, 3)))
    assert layout.seg_tile_ranges() == [(0, 6), (8, 15)]  # no F_V1^HQ for the 2 tiles of the chat sample
    with pytest.raises(ValueError, match="tile_grid describes"):
        SegmentationLayout.from_inputs(model.config, inputs["input_ids"], inputs["attention_mask"],
                                       torch.ones(4, 2, dtype=torch.long))
    no_image = processor(images=[None, random_image(56, 56)], conversations=[
        processor.segmentation_conversation("red circle"), [{"role": "user", "content": "hello"}]])
    with pytest.raises(ValueError, match="Sample 0 has 1 \\[SEG\\] token\\(s\\) and 0 images"):
        model(**no_image)


def test_mask_construction_traces_as_one_graph_and_gives_the_same_masks():
    """For a fixed layout, the head and the mask construction read no device values: fullgraph=True raises on any
    `.tolist()`, `bool(tensor)` or data-dependent shape."""
    model, processor = tiny_model_and_processor(WORDS)
    inputs = mixed_batch(processor)
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    layout = SegmentationLayout.from_inputs(model.config, input_ids, attention_mask, inputs["tile_grid"])
    with torch.no_grad():
        expected = model(**inputs)
        base = model.model(input_ids=input_ids, pixel_values=inputs["pixel_values"], attention_mask=attention_mask,
                           seg_layout=layout)
    assert base.image_features_hq.shape[0] == 13  # the tiles of the three segmenting samples' images

    def head(input_ids, attention_mask, hidden_states, image_features, image_features_hq):
        token_masks = model.model.token_masks(input_ids, None, attention_mask)
        return model.predict_masks(*token_masks, hidden_states, image_features, image_features_hq, layout,
                                   with_aux=True)

    def attention(input_ids, attention_mask, embeds):
        return model.model.seg_attention_mask(input_ids, embeds, attention_mask, None, None, has_seg=True)

    embeds = torch.zeros(*input_ids.shape, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        masks, aux = torch.compile(head, fullgraph=True, backend="eager")(
            input_ids, attention_mask, base.last_hidden_state, base.image_features, base.image_features_hq)
        mask = torch.compile(attention, fullgraph=True, backend="eager")(input_ids, attention_mask, embeds)
    assert [tuple(m.shape) for m in masks] == [(1, 16, 24), (0, 1, 1), (2, 8, 8), (1, 16, 24)]
    for got, want in zip(masks, expected.pred_masks):
        assert torch.equal(got, want)
    assert [a.shape[0] for a in aux] == [1, 0, 2, 1]
    assert torch.equal(mask, attention(input_ids, attention_mask, embeds))


def test_compiled_forward_breaks_only_inside_transformers():
    """The whole forward under dynamo: the remaining graph breaks are transformers' own (output capturing, the
    image-token count check that plain InternVL has too), none in SELFIE's code."""
    model, processor = tiny_model_and_processor(WORDS)
    inputs = processor(images=[random_image(80, 64), random_image(64, 64, seed=1)], queries=["red circle", "shape"])
    layout = SegmentationLayout.from_inputs(model.config, inputs["input_ids"], inputs["attention_mask"],
                                            inputs["tile_grid"])
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**inputs, seg_layout=layout)
    ours = [reason for reason in explained.break_reasons
            if reason.user_stack and reason.user_stack[-1].filename.endswith("modeling_selfie.py")]
    assert not ours, [reason.reason for reason in ours]


def test_segmentation_path_reads_no_device_values():
    """On meta tensors (shapes, no values) any `.tolist()`, `bool(tensor)`, `nonzero` or boolean-mask indexing
    raises, so running the head, the mask construction and the attention mask there shows that, given the layout,
    they never wait for the device. (torch.compile alone would not show it: recent dynamo traces `.tolist()` and
    data-dependent shapes without a graph break.)"""
    model, processor = tiny_model_and_processor(WORDS)
    inputs = mixed_batch(processor)
    layout = SegmentationLayout.from_inputs(model.config, inputs["input_ids"], inputs["attention_mask"],
                                            inputs["tile_grid"])
    with torch.device("meta"):
        meta = SelfieForSegmentation(model.config)
        input_ids, attention_mask = inputs["input_ids"].to("meta"), inputs["attention_mask"].to("meta")
        (batch, length), width = input_ids.shape, model.config.text_config.hidden_size
        hidden_states, embeds = torch.empty(batch, length, width), torch.empty(batch, length, width)
        image_features, image_features_hq = torch.empty(15, 4, width), torch.empty(13, 16, width)

    token_masks = meta.model.token_masks(input_ids, None, attention_mask)
    masks, aux = meta.predict_masks(*token_masks, hidden_states, image_features, image_features_hq, layout,
                                    with_aux=True)
    mask = meta.model.seg_attention_mask(input_ids, embeds, attention_mask, None, None, has_seg=True)
    assert [tuple(m.shape) for m in masks] == [(1, 16, 24), (0, 1, 1), (2, 8, 8), (1, 16, 24)]
    assert [tuple(m.shape) for m in aux] == [(1, 8, 12), (0, 1, 1), (2, 4, 4), (1, 8, 12)]
    assert mask.shape == (batch, 1, length, length)
