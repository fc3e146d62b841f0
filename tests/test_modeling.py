"""SelfieForSegmentation behaviour on tiny random configs: the specification of the model."""

import logging

import pytest
import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration

from modeling_selfie import SelfieConfig, SelfieForSegmentation
from modeling_selfie.modeling_selfie import (
    depth_to_space,
    dual_pathway_mask_function,
    dual_pathway_pattern,
    stitch_tiles,
)
from modeling_selfie.presets import preset_config, tiny_model_and_processor

from .helpers import WORDS, random_image


def segment(model, processor, images, queries, **kwargs):
    inputs = processor(images=images, queries=queries, **kwargs)
    with torch.no_grad():
        return model(**inputs), inputs


# --------------------------------------------------------------------------------------------- helpers


def test_depth_to_space_inverts_internvl_pixel_shuffle_on_non_square_maps(tiny):
    model, _ = tiny
    x = torch.randn(2, 6, 10, 8)  # [N, rows, cols, C]: a non-square map (reference bug Q1 scrambles these)
    shuffled = model.model.pixel_shuffle(x, scale_factor=0.5)
    assert shuffled.shape == (2, 3, 5, 32)
    assert torch.equal(depth_to_space(shuffled, 2), x)


def test_stitch_tiles_places_tile_blocks_row_major():
    rows, cols, g = 2, 3, 2
    # token value = tile index * 100 + token index (row-major inside the tile)
    tokens = torch.arange(rows * cols)[:, None] * 100 + torch.arange(g * g)[None]
    stitched = stitch_tiles(tokens[..., None].float(), rows, cols)[0, ..., 0]
    assert stitched.shape == (rows * g, cols * g)
    for t in range(rows * cols):
        r, c = divmod(t, cols)
        block = stitched[r * g : (r + 1) * g, c * g : (c + 1) * g]
        assert torch.equal(block.flatten(), tokens[t].float()), f"tile {t} not at block ({r}, {c})"


# --------------------------------------------------------------------------------------------- attention


def reference_dual_pathway(input_ids, attention_mask, image_id, seg_id):
    """The reference's rule (shared/reference item 7), written out with loops: the specification."""
    batch, length = input_ids.shape
    allowed = torch.zeros(batch, length, length, dtype=torch.bool)
    for b in range(batch):
        has_seg = bool((input_ids[b] == seg_id).any())
        for q in range(length):
            for k in range(length):
                real_k = bool(attention_mask[b, k])
                allowed[b, q, k] = k <= q and real_k
                if has_seg and input_ids[b, q] == image_id and input_ids[b, k] in (image_id, seg_id) and real_k:
                    allowed[b, q, k] = True
    return allowed


@pytest.mark.parametrize("attn", ["sdpa", "eager", "mask_function"])
def test_dual_pathway_mask_matches_reference_rule(attn):
    from modeling_selfie.compat import create_causal_mask

    model, _ = tiny_model_and_processor(WORDS)
    image_id, seg_id = model.config.image_token_id, model.config.seg_token_id
    ids = [[0, 1, image_id, image_id, image_id, 2, seg_id, 3, seg_id], [1, image_id, image_id, image_id, 2, 3, 4, 5, 6],
           [0, 0, 1, image_id, image_id, image_id, 2, seg_id, 3]]
    input_ids = torch.tensor(ids)
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 9, [0, 0, 1, 1, 1, 1, 1, 1, 1]])
    embeds = torch.zeros(3, 9, 64)
    if attn == "mask_function":  # the form flex attention receives, rendered densely by the sdpa mask builder
        seg = (input_ids == seg_id) & attention_mask.bool()
        pattern = dual_pathway_pattern(input_ids == image_id, seg, seg.any(1), "image_to_seg", attention_mask)
        config = model.config.text_config
        config._attn_implementation = "sdpa"
        mask = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=attention_mask, cache=None,
                                  or_mask_function=dual_pathway_mask_function(*pattern))
    else:
        model.set_attn_implementation(attn)
        mask = model.model.seg_attention_mask(input_ids, embeds, attention_mask, None, None)
        if mask.dtype != torch.bool:  # an additive float mask (eager, and sdpa once the pattern is added): 0 = attend
            mask = mask == 0
    expected = reference_dual_pathway(input_ids, attention_mask, image_id, seg_id)
    real_rows = attention_mask.bool()[:, :, None].expand_as(expected)  # padding rows mean nothing
    assert torch.equal(mask[:, 0][real_rows], expected[real_rows])


@pytest.mark.parametrize(
    "mode, image_sees_text, text_sees_future_image",
    [("image_bidirectional", False, False), ("image_to_text", True, False), ("bidirectional", True, True)],
)
def test_attention_ablation_modes(mode, image_sees_text, text_sees_future_image):
    input_ids = torch.tensor([[1, 7, 7, 2, 9, 3]])
    seg = input_ids == 9
    queries, keys = dual_pathway_pattern(input_ids == 7, seg, seg.any(1), mode)
    grid = queries[0][:, None] & keys[0][None, :]
    assert grid[1, 2]  # image -> later image token, in every non-causal mode
    assert grid[1, 4] == (mode != "image_bidirectional")  # image -> [SEG]
    assert grid[1, 3] == image_sees_text
    assert grid[0, 1] == text_sees_future_image
    assert dual_pathway_pattern(input_ids == 7, seg, seg.any(1), "causal") is None
    assert not dual_pathway_pattern(input_ids == 7, seg, torch.tensor([False]), mode)[0].any()  # no [SEG]: causal


# --------------------------------------------------------------------------------------------- forward


def test_pred_masks_shapes_and_several_seg_tokens(tiny, image):
    model, processor = tiny
    conversation = [
        {"role": "user", "content": "Please segment the red circle in this image."},
        {"role": "assistant", "content": "Sure, [SEG]."},
        {"role": "user", "content": "Please segment the blue square in this image."},
        {"role": "assistant", "content": "Sure, [SEG]."},
    ]
    inputs = processor(images=[image], conversations=[conversation])
    with torch.no_grad():
        out = model(**inputs)
    assert len(out.pred_masks) == 1
    assert out.pred_masks[0].shape == (2, 8, 8)  # 2 [SEG]; 4x the 2x2 LLM token grid of a 56 px tile
    assert not torch.allclose(out.pred_masks[0][0], out.pred_masks[0][1])

    # The k-th mask is the dot product of the pixel features with the k-th [SEG] vector, read at position p-1.
    ids = inputs["input_ids"][0]
    seg_positions = (ids == processor.seg_token_id).nonzero().flatten()
    with torch.no_grad():
        base = model.model(**{k: v for k, v in inputs.items() if k != "tile_grid"})
        hidden = base.last_hidden_state[0]
        vectors = model.seg_head.seg_embeddings(hidden[seg_positions - 1])
        llm_pixels = model.seg_head.llm_pixel_features(hidden[ids == model.config.image_token_id][None], 1, 1)
        pixels = model.seg_head.pixel_features(llm_pixels, base.image_features, base.image_features_hq, 1, 1)
        expected = model.seg_head.mask_logits(pixels.expand(2, -1, -1, -1), vectors)
    torch.testing.assert_close(out.pred_masks[0], expected, atol=1e-5, rtol=1e-5)


def test_multi_tile_stitching_puts_each_tile_where_it_is():
    """With residual_mode='none' every pixel feature comes from its own tile's ViT features, so each block of the
    stitched mask must equal the mask computed from that tile alone with the same [SEG] vector."""
    model, processor = tiny_model_and_processor(WORDS, seed=1, residual_mode="none")
    processor.image_processor.max_patches = 6
    image = random_image(168, 112, seed=3)  # aspect 1.5 -> a 2 x 3 grid of 56 px tiles
    out, inputs = segment(model, processor, [image], ["the red circle"])
    rows, cols = inputs["tile_grid"][0].tolist()
    assert (rows, cols) == (2, 3)
    side = 4  # mask pixels per tile side: the ViT grid (residual_mode="none" averages the unshuffled chunks)
    assert out.pred_masks[0].shape == (1, rows * side, cols * side)

    with torch.no_grad():
        base = model.model(**{k: v for k, v in inputs.items() if k != "tile_grid"})
        seg_pos = (inputs["input_ids"][0] == processor.seg_token_id).nonzero().flatten()
        vector = model.seg_head.seg_embeddings(base.last_hidden_state[0, seg_pos - 1])
        for t in range(rows * cols):
            r, c = divmod(t, cols)
            alone = model.seg_head.pixel_features(
                None, base.image_features[t : t + 1], base.image_features_hq[t : t + 1], 1, 1
            )
            expected = model.seg_head.mask_logits(alone, vector)[0]
            block = out.pred_masks[0][0, r * side : (r + 1) * side, c * side : (c + 1) * side]
            torch.testing.assert_close(block, expected, atol=1e-5, rtol=1e-5, msg=f"tile {t} misplaced")


def test_identical_tiles_give_identical_mask_halves():
    model, processor = tiny_model_and_processor(WORDS, seed=2, residual_mode="none")
    processor.image_processor.max_patches = 2
    half = random_image(56, 56, seed=5)
    image = random_image(112, 56)
    image.paste(half, (0, 0))
    image.paste(half, (56, 0))
    out, inputs = segment(model, processor, [image], ["the red circle"])
    assert inputs["tile_grid"].tolist() == [[1, 2]]
    mask = out.pred_masks[0][0]
    torch.testing.assert_close(mask[:, :4], mask[:, 4:], atol=1e-5, rtol=1e-5)


def test_sample_without_seg_is_plain_internvl(tiny, image):
    model, processor = tiny
    chat = [[{"role": "user", "content": "describe the shape"}]]
    inputs = processor(images=[image], conversations=chat)
    plain = InternVLForConditionalGeneration(InternVLConfig(**{
        k: v for k, v in model.config.to_dict().items() if k in InternVLConfig.__dataclass_fields__
    })).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(key.startswith("seg_head.") for key in unexpected)
    with torch.no_grad():
        ours = model(**inputs)
        theirs = plain(**{k: v for k, v in inputs.items() if k != "tile_grid"})
    assert torch.equal(ours.logits, theirs.logits)
    assert ours.pred_masks is None


def test_generate_works_and_matches_internvl(tiny, image):
    model, processor = tiny
    inputs = processor(images=[image], text=["<|im_start|>user\n<IMG_CONTEXT>\ndescribe<|im_end|>\n<|im_start|>assistant\n"])
    inputs.pop("tile_grid")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 5
    # greedy decoding equals step-by-step argmax of full forwards (no cache)
    ids = inputs["input_ids"]
    with torch.no_grad():
        for _ in range(5):
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)


def test_mixed_batch_and_padding_invariance(tiny):
    model, processor = tiny
    images = [random_image(80, 64, seed=1), random_image(64, 90, seed=2)]
    long_query = "the red circle left of the blue square"
    seg_alone, _ = segment(model, processor, images[:1], [long_query])
    chat_only = processor(images=images[1:], conversations=[[{"role": "user", "content": "hello"}]])
    mixed = processor(
        images=images,
        conversations=[processor.segmentation_conversation(long_query), [{"role": "user", "content": "hello"}]],
    )
    with torch.no_grad():
        out = model(**mixed)
        chat_alone = model(**chat_only)
    assert out.pred_masks[0].shape == (1, 8, 8) and out.pred_masks[1].shape[0] == 0
    torch.testing.assert_close(out.pred_masks[0], seg_alone.pred_masks[0], atol=1e-5, rtol=1e-5)
    # the chat sample, padded in the mixed batch, keeps its causal logits at its real positions
    real = mixed["attention_mask"][1].bool()
    torch.testing.assert_close(out.logits[1][real], chat_alone.logits[0], atol=1e-4, rtol=1e-4)

    padded = processor(images=images[:1] * 2, queries=[long_query, "the circle"])
    with torch.no_grad():
        both = model(**padded)
    assert padded["attention_mask"][1].sum() < padded["attention_mask"][1].numel()  # sample 1 is padded
    single, _ = segment(model, processor, images[:1], ["the circle"])
    torch.testing.assert_close(both.pred_masks[1], single.pred_masks[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "flex_attention"])
def test_attention_backends_agree_with_sdpa(attn, image):
    model, processor = tiny_model_and_processor(WORDS, seed=0)
    inputs = processor(images=[image, image], queries=["the red circle", "circle"])
    with torch.no_grad():
        reference = model(**inputs).pred_masks
        model.set_attn_implementation(attn)
        other = model(**inputs).pred_masks
    for a, b in zip(reference, other):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flash_attention_is_refused_with_a_clear_error(image):
    model, processor = tiny_model_and_processor(WORDS)
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        model.model.seg_attention_mask(
            torch.tensor([[model.config.image_token_id, model.config.seg_token_id]]),
            torch.zeros(1, 2, 64), None, None, None,
        )


def test_dual_pathway_changes_image_features_only_when_seg_is_present(image):
    model, processor = tiny_model_and_processor(WORDS, seed=0)
    inputs = processor(images=[image], queries=["the red circle"])
    with torch.no_grad():
        dual = model(**inputs).pred_masks[0]
        model.config.seg_attention = "causal"
        causal = model(**inputs).pred_masks[0]
    assert (dual - causal).abs().max() > 1e-3


def test_gradients_reach_every_selfie_module(image):
    model, processor = tiny_model_and_processor(WORDS, seed=0)
    model.train()
    inputs = processor(images=[image], queries=["the red circle"], masks=[torch.ones(1, 64, 80)], return_labels=True)
    out = model(**inputs)
    out.loss.backward()
    for name, param in model.named_parameters():
        if name.startswith(("seg_head.", "model.multi_modal_projector.", "model.vision_tower.")):
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches {name}"
    seg_row = model.get_input_embeddings().weight.grad[processor.seg_token_id]
    assert seg_row.abs().sum() > 0  # image tokens attend to [SEG], so its input embedding learns
    assert out.text_loss > 0 and out.mask_bce_loss > 0 and out.mask_dice_loss > 0


def test_mask_label_count_mismatch_is_a_clear_error(tiny, image):
    model, processor = tiny
    inputs = processor(images=[image], queries=["the red circle"])
    with pytest.raises(ValueError, match=r"mask_labels\[0\] holds 2 masks but sample 0 has 1"):
        model(**inputs, mask_labels=[torch.ones(2, 10, 10)])


def test_mask_loss_normalisation_options(image):
    model, processor = tiny_model_and_processor(WORDS, seed=0)
    inputs = processor(
        images=[image, image],
        conversations=[processor.segmentation_conversation("the circle"), [{"role": "user", "content": "hello"}]],
        masks=[torch.ones(1, 64, 80), torch.zeros(0, 64, 80)],
    )
    with torch.no_grad():
        per_batch = model(**inputs).mask_bce_loss
        model.config.mask_loss_normalization = "mask"
        per_mask = model(**inputs).mask_bce_loss
    torch.testing.assert_close(per_mask, 2 * per_batch)  # 1 mask in a batch of 2 sequences


@pytest.mark.parametrize(
    "use_hq, mode, side", [(False, "none", 2), (True, "none", 4), (True, "rfr", 4), (False, "rfa", 4), (True, "rfa", 8)]
)
def test_ablation_switches_set_mask_resolution(use_hq, mode, side, image):
    model, processor = tiny_model_and_processor(WORDS, use_hq_features=use_hq, residual_mode=mode)
    out, _ = segment(model, processor, [image], ["the circle"])
    assert out.pred_masks[0].shape == (1, side, side)


def test_invalid_switches_are_refused():
    with pytest.raises(Exception, match="residual_mode"):
        SelfieConfig(residual_mode="rfx")
    with pytest.raises(Exception, match="use_hq_features=True"):
        SelfieConfig(residual_mode="rfr", use_hq_features=False)
    with pytest.raises(Exception, match="seg_attention"):
        SelfieConfig(seg_attention="sideways")


# --------------------------------------------------------------------------------------------- loading


def test_save_and_load_round_trip_is_exact(tiny, image, tmp_path):
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is SelfieForSegmentation
    assert type(AutoModel.from_pretrained(tmp_path)) is SelfieForSegmentation  # the model that segments
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    inputs = loaded_processor(images=[image], queries=["the red circle"])
    with torch.no_grad():  # same weights; kernels may round differently in the last bit
        torch.testing.assert_close(model(**inputs).pred_masks[0], loaded(**inputs).pred_masks[0], atol=1e-6, rtol=0)


def test_loading_a_plain_internvl_checkpoint_adds_seg_and_initialises_the_head(tmp_path, caplog):
    config = preset_config("selfie-tiny")
    plain_config = InternVLConfig(**{
        k: v for k, v in config.to_dict().items() if k in InternVLConfig.__dataclass_fields__
    })
    plain = InternVLForConditionalGeneration(plain_config)
    plain.save_pretrained(tmp_path)
    vocab = plain_config.text_config.vocab_size

    with caplog.at_level(logging.WARNING):
        model = SelfieForSegmentation.from_pretrained(tmp_path)
    assert model.config.seg_token_id == vocab
    assert model.get_input_embeddings().weight.shape[0] == vocab + 1
    assert model.lm_head.weight.shape[0] == vocab + 1
    assert torch.equal(model.get_input_embeddings().weight[:vocab], plain.get_input_embeddings().weight)
    assert "SELFIE modules initialised from scratch" in caplog.text and "Added [SEG]" in caplog.text
    for name, param in model.seg_head.named_parameters():
        assert torch.isfinite(param).all() and (name.endswith("bias") or param.std() > 0), name

    given = SelfieForSegmentation.from_pretrained(tmp_path, seg_token_id=7)
    assert given.config.seg_token_id == 7 and given.get_input_embeddings().weight.shape[0] == vocab


def test_presets_on_meta_device_have_internvl3_sizes():
    expected = {"selfie-2b": 2.09e9, "selfie-8b": 7.94e9}  # InternVL3-2B / -8B published sizes
    for name, size in expected.items():
        config = preset_config(name)
        with torch.device("meta"):
            model = SelfieForSegmentation(config)
        total = sum(p.numel() for p in model.parameters())
        head = sum(p.numel() for p in model.seg_head.parameters())
        d = config.text_config.hidden_size
        assert head == 2 * (d * d + d + d * 4 * 64 + 4 * 64) + 2 * (64 * 64 + 64)
        assert abs((total - head) - size) / size < 0.005, f"{name}: {total - head:,} parameters without the head"


def test_preset_sub_config_overrides_update_the_preset():
    config = preset_config("selfie-tiny", text_config={"num_hidden_layers": 3}, seg_hidden_size=32)
    assert config.text_config.num_hidden_layers == 3 and len(config.text_config.layer_types) == 3
    assert config.text_config.hidden_size == preset_config("selfie-tiny").text_config.hidden_size == 64
    assert config.seg_hidden_size == 32


def test_batch_of_different_tile_grids_equals_each_image_alone():
    model, processor = tiny_model_and_processor(WORDS, seed=0)
    processor.image_processor.max_patches = 6
    images = [random_image(168, 112, seed=1), random_image(56, 112, seed=2), random_image(60, 60, seed=3)]
    queries = ["red circle", "the blue square", "shape"]
    batch, inputs = segment(model, processor, images, queries)
    assert inputs["tile_grid"].tolist() == [[2, 3], [2, 1], [1, 1]]
    for i, (image, query) in enumerate(zip(images, queries)):
        alone, _ = segment(model, processor, [image], [query])
        torch.testing.assert_close(batch.pred_masks[i], alone.pred_masks[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode, leaks", [("image_to_seg", True), ("image_bidirectional", False), ("causal", False)])
def test_answer_tokens_see_seg_through_image_tokens_only_when_images_attend_to_seg(mode, leaks, image):
    """With the paper's mask, image tokens see the later [SEG], and every text token after the image sees the image
    tokens: so the logits of the answer's first token depend on the answer words before [SEG]. A teacher-forced text
    loss on answer prefixes ("Sure, it is [SEG].") can use that; generation cannot, because [SEG] is not there yet.
    The path [SEG] -> image -> answer token needs three layers."""
    model, processor = tiny_model_and_processor(
        WORDS, seed=0, seg_attention=mode, text_config={"num_hidden_layers": 3}
    )
    first_answer_logits = []
    for answer in ("It is [SEG].", "Sure, [SEG]."):
        conversation = [
            {"role": "user", "content": "Please segment the red circle in this image."},
            {"role": "assistant", "content": answer},
        ]
        inputs = processor(images=[image], conversations=[conversation])
        start = int((inputs["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("assistant")).nonzero()[-1])
        with torch.no_grad():
            logits = model(**inputs).logits[0, start + 1]  # at the newline after "assistant": predicts the answer
        first_answer_logits.append(logits)
    assert torch.allclose(*first_answer_logits, atol=1e-5) != leaks
