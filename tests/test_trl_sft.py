"""Supervised fine-tuning through `trl.SFTTrainer` (modeling_selfie.trl_selfie): TRL conversational rows with masks
(RLE and arrays), the same loss as `SelfieTrainer` on the same batch, and a LoRA step that moves the adapters and the
segmentation head."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import TrainingArguments
from trl import SFTConfig

from modeling_selfie.compat import activation_checkpointing_field
from modeling_selfie.presets import tiny_model_and_processor
from modeling_selfie.trainer_selfie import SelfieDataCollator, SelfieTrainer, selfie_lora_config
from modeling_selfie.trl_selfie import SelfieSFTCollator, SelfieSFTTrainer, sample_from_row

from .helpers import WORDS, random_image
from .helpers import coco_rle_text as rle


pytestmark = pytest.mark.usefixtures("one_thread")


def square(height: int, width: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[top : top + side, left : left + side] = 1
    return mask


def trl_rows(masks_as_arrays: bool = False) -> list[dict]:
    """Rows as TRL's conversational vision datasets hold them: content blocks with an image placeholder, one image per
    row, one mask per [SEG]: COCO RLEs, or 0/1 arrays as nested lists (one format per dataset: Arrow columns have one
    type)."""
    masks = [[square(56, 56, 8, 8, 20)], [square(56, 70, 0, 30, 25), square(56, 70, 20, 0, 16)]]
    masks = [[m.tolist() if masks_as_arrays else rle(m) for m in row_masks] for row_masks in masks]
    return [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "segment the red square"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "the red square [SEG] ."}]},
            ],
            "images": [random_image(56, 56, seed=1)],
            "masks": masks[0],
        },
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "segment the blue circle and the green shape"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "[SEG] and [SEG] ."}]},
            ],
            "images": [random_image(70, 56, seed=2)],
            "masks": masks[1],
        },
    ]


def selfie_samples() -> list[dict]:
    """The same two samples in SELFIE's own sample format (what `SelfieTrainer`'s collator reads)."""
    rows = trl_rows()
    return [
        {
            "image": rows[0]["images"][0],
            "conversation": [
                {"role": "user", "content": "segment the red square"},
                {"role": "assistant", "content": "the red square [SEG] ."},
            ],
            "masks": square(56, 56, 8, 8, 20)[None],
            "task": "referring",
            "source": "hand",
        },
        {
            "image": rows[1]["images"][0],
            "conversation": [
                {"role": "user", "content": "segment the blue circle and the green shape"},
                {"role": "assistant", "content": "[SEG] and [SEG] ."},
            ],
            "masks": np.stack([square(56, 70, 0, 30, 25), square(56, 70, 20, 0, 16)]),
            "task": "referring",
            "source": "hand",
        },
    ]


def sft_config(output_dir, **overrides) -> SFTConfig:
    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=2, learning_rate=1e-2, lr_scheduler_type="constant",
        max_steps=1, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
        bf16=False, seed=0, **{activation_checkpointing_field(): False},
    )
    settings.update(overrides)
    return SFTConfig(**settings)


def test_rows_read_as_selfie_samples():
    """RLE and nested-list masks decode to the hand-made arrays; content blocks become SELFIE's text turns."""
    string_turns = [{**row, "messages": sample["conversation"]} for row, sample in zip(trl_rows(), selfie_samples())]
    for row, sample in zip([*trl_rows(), *trl_rows(masks_as_arrays=True), *string_turns], selfie_samples() * 3):
        read = sample_from_row(row)
        np.testing.assert_array_equal(read["masks"], sample["masks"])
        assert read["conversation"] == sample["conversation"]
        assert read["image"] is row["images"][0] or read["image"].tobytes() == row["images"][0].tobytes()


def test_bad_rows_name_the_problem():
    row = trl_rows()[0]
    with pytest.raises(ValueError, match="system"):
        sample_from_row({**row, "messages": [{"role": "system", "content": "be brief"}, *row["messages"]]})
    with pytest.raises(ValueError, match="2 images"):
        sample_from_row({**row, "images": row["images"] * 2})
    with pytest.raises(ValueError, match="RLE of size"):
        sample_from_row({**row, "images": [random_image(60, 56)]})


@pytest.mark.parametrize("masks_as_arrays", [False, True], ids=["rle", "arrays"])
def test_sft_trainer_loss_equals_selfie_trainer_loss(tmp_path, masks_as_arrays):
    """One batch, one model: `SFTTrainer` (TRL's dataset, column filtering and dataloader) and `SelfieTrainer`
    compute the same text + BCE + DICE loss."""
    model, processor = tiny_model_and_processor(WORDS, seed=0)
    model.eval()  # no dropout: two forwards must agree
    dataset = Dataset.from_list(trl_rows(masks_as_arrays))
    sft = SelfieSFTTrainer(model=model, args=sft_config(tmp_path / "sft"), train_dataset=dataset,
                           processing_class=processor)
    batch_sft = next(iter(sft.get_train_dataloader()))  # through TRL's column filtering
    selfie = SelfieTrainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path / "selfie"), remove_unused_columns=False, use_cpu=True,
                               report_to="none"),
        data_collator=SelfieDataCollator(processor),
        processing_class=processor,
    )
    batch_selfie = SelfieDataCollator(processor)(selfie_samples())
    for key in ("input_ids", "attention_mask", "labels", "pixel_values", "tile_grid"):
        torch.testing.assert_close(batch_sft[key], batch_selfie[key])
    with torch.no_grad():
        loss_sft, out_sft = sft.compute_loss(model, batch_sft, return_outputs=True)
        loss_selfie, out_selfie = selfie.compute_loss(model, batch_selfie, return_outputs=True)
    torch.testing.assert_close(loss_sft, loss_selfie)
    for name in ("text_loss", "mask_bce_loss", "mask_dice_loss"):
        assert out_sft[name] > 0
        torch.testing.assert_close(out_sft[name], out_selfie[name])
    expected = (model.config.text_loss_weight * out_selfie.text_loss + model.config.bce_loss_weight *
                out_selfie.mask_bce_loss + model.config.dice_loss_weight * out_selfie.mask_dice_loss)
    torch.testing.assert_close(loss_sft, expected)


def test_sft_step_with_lora_moves_adapters_and_head(tmp_path):
    """TRL wraps the model with SELFIE's LoraConfig (`peft_config`); one step moves the LoRA weights and the
    segmentation head (trained fully), not the frozen projector; the loss terms are logged."""
    model, processor = tiny_model_and_processor(WORDS, seed=0)
    trainer = SelfieSFTTrainer(
        model=model.train(), args=sft_config(tmp_path), train_dataset=Dataset.from_list(trl_rows()),
        processing_class=processor, peft_config=selfie_lora_config(rank=4, alpha=8, dropout=0.0),
    )
    assert isinstance(trainer.model, PeftModel)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {name for name, value in before.items() if not torch.equal(value, after[name])}
    assert any("lora_B" in name for name in changed)
    assert any(".seg_head." in name and "modules_to_save" in name for name in changed)
    assert not any("multi_modal_projector" in name for name in changed)
    logged = next(log for log in trainer.state.log_history if "loss" in log)
    for name in ("text_loss", "mask_bce_loss", "mask_dice_loss"):
        assert logged[name] > 0


def test_collator_keeps_max_length(tmp_path):
    """`SFTConfig.max_length` reaches the collator: a two-exchange conversation loses its last exchange."""
    _, processor = tiny_model_and_processor(WORDS, seed=0)
    row = trl_rows()[0]
    long_row = {**row, "messages": row["messages"] * 2, "masks": row["masks"] * 2}
    full = SelfieSFTCollator(processor)([long_row])
    short = SelfieSFTCollator(processor, max_length=full["input_ids"].shape[1] - 1)([long_row])
    assert short["mask_labels"][0].shape[0] == 1 and full["mask_labels"][0].shape[0] == 2
