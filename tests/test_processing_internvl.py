"""A SELFIE processor from any InternVL3 start, the authors' prompt token for token, and the model/processor check.

Folders and tokenizers come from `tests/internvl_artifacts.py`: a Qwen2 byte-level BPE tokenizer with InternVL's
tokens (built with `tokenizers`), processor files in the layouts of the Hub's `-hf` and original InternVL3 folders.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from modeling_selfie import SelfieForSegmentation, SelfieImageProcessor, SelfieProcessor
from modeling_selfie.processing_selfie import SELF1E_SYSTEM_MESSAGE

from .internvl_artifacts import IMAGE_MEAN, write_internvl3_hf_folder, write_original_internvl3_folder


def picture(width=90, height=60, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def hf_folder(tmp_path):
    write_internvl3_hf_folder(tmp_path, layout="hub")
    return tmp_path


def test_processor_from_an_internvl3_hf_folder_tiles_as_selfie(hf_folder):
    processor = SelfieProcessor.from_pretrained(hf_folder)
    assert isinstance(processor.image_processor, SelfieImageProcessor)
    assert processor.image_processor.size.height == 56 and list(processor.image_processor.image_mean) == IMAGE_MEAN
    assert processor.image_seq_length == 4
    inputs = processor(images=[picture()], queries=["the red circle"])
    assert inputs["pixel_values"].shape == (1, 3, 56, 56)  # one tile, no thumbnail (InternVL's would be 13)
    assert inputs["tile_grid"].tolist() == [[1, 1]]
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 4


def test_seg_id_of_processor_and_model_from_the_same_internvl_folder_agree(hf_folder):
    processor = SelfieProcessor.from_pretrained(hf_folder)
    model = SelfieForSegmentation.from_pretrained(hf_folder)
    assert processor.seg_token_id == model.config.seg_token_id
    assert processor.image_token_id == model.config.image_token_id
    processor.check_model(model.config)


def test_processor_from_an_original_internvl3_folder(tmp_path):
    ids = write_original_internvl3_folder(tmp_path)
    processor = SelfieProcessor.from_pretrained(tmp_path)
    assert processor.image_token_id == ids["<IMG_CONTEXT>"]  # the tokenizer config names no image roles
    assert processor.start_image_token == "<img>" and processor.end_image_token == "</img>"
    assert processor.image_processor.size.height == 56 and processor.image_seq_length == 4
    assert processor.seg_token_id == len(AutoTokenizer.from_pretrained(tmp_path))


def test_fine_tuning_starts_from_an_internvl3_hf_folder(hf_folder):
    """The step that crashed with "Sample 0 has 3 [SEG] token(s) and 13 images": a multi-turn sample, a loss."""
    processor = SelfieProcessor.from_pretrained(hf_folder)
    model = SelfieForSegmentation.from_pretrained(hf_folder).train()
    turns = []
    for phrase in ("the left part", "the right part", "the top"):
        turns += [{"role": "user", "content": f"Please segment the {phrase} in this image."},
                  {"role": "assistant", "content": "Sure, it is [SEG]."}]
    masks = np.zeros((3, 60, 90), dtype=np.uint8)
    masks[0, :, :45] = masks[1, :, 45:] = masks[2, :30] = 1
    inputs = processor(images=[picture()], conversations=[turns], masks=[masks], return_labels=True)
    out = model(**inputs)
    assert [tuple(m.shape) for m in out.pred_masks] == [(3, 8, 8)]  # 2x the 4x4 ViT grid
    assert torch.isfinite(out.loss) and out.mask_bce_loss > 0
    out.loss.backward()
    assert model.seg_head.proj_out.fc1.weight.grad.abs().sum() > 0


def expected_self1e_ids(tokenizer, phrase: str, tokens_per_tile: int) -> list[int]:
    """The authors' evaluation input through "[SEG].", written out by hand (template internvl2_5)."""
    image = "<img>" + "<IMG_CONTEXT>" * tokens_per_tile + "</img>"
    text = (
        "<|im_start|>system\nYou are an helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{image}\n What is {phrase} in this image? Please output segmentation mask.<|im_end|>\n"
        "<|im_start|>assistant\n[SEG].<|im_end|>\n"
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_self1e_prompt_is_the_authors_token_for_token(hf_folder):
    processor = SelfieProcessor.from_pretrained(hf_folder)
    assert processor.prompt_style == "self1e" and processor.system_message == SELF1E_SYSTEM_MESSAGE
    inputs = processor(images=[picture(), picture()], queries=["  the man on the left ", "The Man on the LEFT"])
    ids = [row[mask.bool()].tolist() for row, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    assert ids[0] == expected_self1e_ids(processor.tokenizer, "the man on the left", 4)
    # stripped, case kept: lowercasing is their RefCOCO loader's (ReferringDataset(lowercase=True)), ReasonSeg
    # phrases keep their case
    assert ids[1] == expected_self1e_ids(processor.tokenizer, "The Man on the LEFT", 4)


def test_self1e_instruction_prompt_keeps_case(hf_folder):
    processor = SelfieProcessor.from_pretrained(hf_folder)
    question = "Which Object can hold water?"
    inputs = processor(images=[picture()], queries=[question], query_kind="instruction")
    image = "<img>" + "<IMG_CONTEXT>" * 4 + "</img>"
    text = (
        "<|im_start|>system\nYou are an helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{image}\n {question} Please output segmentation mask.<|im_end|>\n"
        "<|im_start|>assistant\n[SEG].<|im_end|>\n"
    )
    assert inputs["input_ids"][0].tolist() == processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_style_and_system_message_live_in_the_saved_processor(hf_folder, tmp_path):
    processor = SelfieProcessor.from_pretrained(hf_folder, prompt_style="internvl", system_message="Be brief.")
    processor.save_pretrained(tmp_path / "saved")
    again = SelfieProcessor.from_pretrained(tmp_path / "saved")
    assert (again.prompt_style, again.system_message) == ("internvl", "Be brief.")
    inputs = again(images=[picture()], queries=["The Cat"])
    text = again.tokenizer.decode(inputs["input_ids"][0])
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text
    assert "</img>\nWhat is The Cat in this image?" in text  # InternVL's format: no space, case kept


def test_unknown_prompt_style_is_refused(hf_folder):
    with pytest.raises(ValueError, match="prompt_style='fancy'"):
        SelfieProcessor.from_pretrained(hf_folder, prompt_style="fancy")


def test_a_mismatched_processor_is_an_error_where_model_and_processor_meet(hf_folder, tiny):
    model = SelfieForSegmentation.from_pretrained(hf_folder).eval()
    _, tiny_processor = tiny  # another tokenizer: other [SEG] and image ids
    with pytest.raises(ValueError, match=r"\[SEG\] token id: processor \d+, model \d+"):
        model.segment(tiny_processor, picture(), "the cat")
    with pytest.raises(ValueError, match="does not match the model"):
        model.chat(tiny_processor, picture(), [{"role": "user", "content": "hello"}])
    from modeling_selfie import ReferringSegmentationPipeline

    with pytest.raises(ValueError, match="does not match the model"):
        ReferringSegmentationPipeline(model=model, processor=tiny_processor)
    from modeling_selfie.evaluation import evaluate_open_vocab, evaluate_referring

    for evaluate in (evaluate_referring, evaluate_open_vocab):
        with pytest.raises(ValueError, match="does not match the model"):
            evaluate(model, tiny_processor, [])


def test_segment_returns_presence_scores_of_its_own_forward(tiny):
    model, processor = tiny
    image, queries = picture(), ["red circle", "blue square"]
    masks, scores = model.segment(processor, image, queries, return_scores=True)
    inputs = processor(images=[image, image], queries=queries)
    with torch.no_grad():
        out = model(**inputs)
    _, expected = processor.post_process_masks(out.pred_masks, [(image.height, image.width)] * 2,
                                               presence_logits=out.presence_logits, return_scores=True)
    assert scores == pytest.approx([float(e[0]) for e in expected], abs=1e-6)  # capped at the image's size too
    assert all(s <= float(p[0].sigmoid()) + 1e-6 for s, p in zip(scores, out.presence_logits))
    assert [bool(m.any()) for m in masks] == [s >= 0.5 for s in scores]
    assert all(torch.equal(a, b) for a, b in zip(masks, model.segment(processor, image, queries)))
