"""SelfieProcessor: prompts, tiling, labels, mask targets and post-processing."""

import random

import numpy as np
import pytest
import torch

from modeling_selfie.processing_selfie import (
    ANSWERS,
    SHORT_QUESTIONS,
    SelfieProcessor,
    segmentation_answer,
    segmentation_question,
    select_tile_grid,
)

from .helpers import random_image


def test_validation_prompts_are_the_papers():
    assert segmentation_question("the red circle") == (
        "What is the red circle in this image? Please output segmentation mask."
    )
    assert segmentation_question("Which shape has three corners?", kind="instruction") == (
        "Which shape has three corners? Please output segmentation mask."
    )
    assert segmentation_answer() == "[SEG]."
    rng = random.Random(0)
    questions = {segmentation_question("x", rng=rng) for _ in range(200)}
    assert questions == {q.format(text="x") for q in SHORT_QUESTIONS}
    assert {segmentation_answer(rng) for _ in range(200)} == set(ANSWERS)
    with pytest.raises(ValueError, match="query kind"):
        segmentation_question("x", kind="sentence")


def test_processor_registers_seg_on_a_tokenizer_that_lacks_it(tiny):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from modeling_selfie.tokenization import INTERNVL_TOKEN_ROLES, SPECIAL_TOKENS

    _, processor = tiny
    specials = [token for token in SPECIAL_TOKENS if token != "[SEG]"]
    vocab = {token: i for i, token in enumerate([*specials, "a"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r" +"), "removed")
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", extra_special_tokens=INTERNVL_TOKEN_ROLES
    )
    assert tokenizer.convert_tokens_to_ids("[SEG]") == tokenizer.unk_token_id

    fresh = SelfieProcessor(image_processor=processor.image_processor, tokenizer=tokenizer, image_seq_length=4)

    assert fresh.seg_token_id == len(vocab)
    assert tokenizer("[SEG] a")["input_ids"] == [fresh.seg_token_id, vocab["a"]]


def test_segmentation_inputs_labels_and_mask_labels(tiny):
    _, processor = tiny
    images = [random_image(80, 64), random_image(50, 90, seed=1)]
    masks = [np.ones((1, 64, 80), np.uint8), np.zeros((1, 90, 50), np.uint8)]
    inputs = processor(images=images, queries=["the red circle", "circle"], masks=masks, return_labels=True)

    assert inputs["pixel_values"].shape == (2, 3, 56, 56)
    assert inputs["tile_grid"].tolist() == [[1, 1], [1, 1]]
    assert (inputs["input_ids"] == processor.image_token_id).sum(1).tolist() == [4, 4]
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    assert "".join(tokens).endswith("assistant\n[SEG].<|im_end|>\n")
    supervised = inputs["labels"][0][inputs["labels"][0] != -100]
    assert processor.tokenizer.convert_ids_to_tokens(supervised) == ["[SEG]", ".", "<|im_end|>"]
    assert [m.shape for m in inputs["mask_labels"]] == [(1, 64, 80), (1, 90, 50)]
    assert inputs["mask_labels"][0].dtype == torch.float32 and inputs["mask_labels"][0].max() == 1


def test_several_assistant_turns_are_all_supervised(tiny):
    _, processor = tiny
    conversation = [
        {"role": "user", "content": "Please segment the red circle in this image."},
        {"role": "assistant", "content": "Sure, [SEG]."},
        {"role": "user", "content": "and the blue square"},
        {"role": "assistant", "content": "It is [SEG]."},
    ]
    inputs = processor(images=[random_image(60, 60)], conversations=[conversation], return_labels=True,
                       masks=[np.zeros((2, 60, 60))])
    supervised = processor.tokenizer.convert_ids_to_tokens(inputs["labels"][0][inputs["labels"][0] != -100])
    assert supervised == ["Sure", ",", "[SEG]", ".", "<|im_end|>", "It", "is", "[SEG]", ".", "<|im_end|>"]


def test_bad_inputs_are_named(tiny):
    _, processor = tiny
    image = random_image(60, 60)
    with pytest.raises(ValueError, match=r"queries\[1\] is empty"):
        processor(images=[image, image], queries=["circle", "  "])
    with pytest.raises(ValueError, match=r"masks\[0\] has shape \(2, 60, 60\) but sample 0 has 1 \[SEG\]"):
        processor(images=[image], queries=["circle"], masks=[np.zeros((2, 60, 60))])
    with pytest.raises(ValueError, match="exactly one of"):
        processor(images=[image], queries=["circle"], text=["x"])


@pytest.mark.parametrize(
    "size, max_tiles, expected",
    [((700, 400), 12, (1, 2)), ((700, 400), 1, (1, 1)), ((400, 700), 12, (2, 1)), ((1000, 250), 12, (1, 4))],
)
def test_tile_grid_choice(size, max_tiles, expected):
    assert select_tile_grid(*size, tile_size=448, max_tiles=max_tiles) == expected


def test_dynamic_tiling_returns_rows_cols_and_tile_count(tiny):
    _, processor = tiny
    processor.image_processor.max_patches = 12
    try:
        inputs = processor(images=[random_image(224, 112), random_image(56, 112)], queries=["a", "b"])
    finally:
        processor.image_processor.max_patches = 1
    assert inputs["tile_grid"].tolist() == [[2, 4], [2, 1]]  # exact ties go to the larger grid while it fits
    rows_cols = inputs["tile_grid"]
    assert inputs["pixel_values"].shape[0] == int(rows_cols.prod(-1).sum())
    image_tokens = (inputs["input_ids"] == processor.image_token_id).sum(1)
    assert image_tokens.tolist() == (rows_cols.prod(-1) * 4).tolist()


def test_post_process_masks_resizes_to_each_image_and_thresholds(tiny):
    _, processor = tiny
    logits = [torch.tensor([[[-1.0, 1.0], [1.0, -1.0]]]), torch.zeros(0, 1, 1)]
    masks = processor.post_process_masks(logits, [(4, 6), (3, 5)])
    assert masks[0].shape == (1, 4, 6) and masks[0].dtype == torch.bool
    assert masks[0][0, 0, 0] == False and masks[0][0, 0, -1] == True and masks[0][0, -1, 0] == True  # noqa: E712
    assert masks[1].shape == (0, 3, 5)
    soft = processor.post_process_masks(logits[:1], [(4, 6)], binarize=False)[0]
    assert soft.dtype == torch.float32 and soft.min() < 0 < soft.max()
    strict = processor.post_process_masks(logits[:1], [(4, 6)], mask_threshold=0.99)[0]
    assert strict.sum() < masks[0].sum()


def test_multimodal_token_counts_are_the_tiles_the_processor_makes(tiny):
    """vLLM-style token counting (`_get_num_multimodal_tokens`) counts SELFIE's tiles: no thumbnail."""
    _, processor = tiny
    processor.image_processor.max_patches = 6
    try:
        images = [random_image(w, h, seed=i) for i, (w, h) in enumerate([(56, 56), (200, 60), (60, 200), (90, 80)])]
        counted = processor._get_num_multimodal_tokens(image_sizes=[(im.height, im.width) for im in images])
        inputs = processor(images=images, queries=["shape"] * len(images))
    finally:
        processor.image_processor.max_patches = 1
    tiles = inputs["tile_grid"].prod(1).tolist()
    assert counted["num_image_patches"] == tiles and tiles != [1, 1, 1, 1]
    image_tokens = (inputs["input_ids"] == processor.image_token_id).sum(1)
    assert counted["num_image_tokens"] == (image_tokens + 2).tolist()  # with <img> and </img>


def test_rescale_and_normalize_settings_are_honoured(tiny):
    _, processor = tiny
    image = random_image(56, 56)  # one tile at the tile size: no resize
    raw = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float()
    plain = processor.image_processor(image, do_rescale=False, do_normalize=False, return_tensors="pt")
    torch.testing.assert_close(plain["pixel_values"][0], raw)
    scaled = processor.image_processor(image, rescale_factor=0.5, do_normalize=False, return_tensors="pt")
    torch.testing.assert_close(scaled["pixel_values"][0], raw * 0.5)
    default = processor.image_processor(image, return_tensors="pt")["pixel_values"][0]
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    torch.testing.assert_close(default, (raw / 255 - mean) / std)


def test_padding_given_in_text_kwargs_is_applied_once(tiny):
    _, processor = tiny
    inputs = processor(images=[random_image(56, 56)], queries=["shape"], text_kwargs={"padding": "max_length",
                                                                                      "max_length": 64})
    assert inputs["input_ids"].shape == (1, 64)
