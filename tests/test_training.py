"""Training utilities on the tiny model (CPU, fp32): collation, the trainer's logging, LoRA, activation
checkpointing, resuming and merging."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainingArguments

from modeling_selfie import SelfieForSegmentation, SelfieProcessor
from modeling_selfie.presets import tiny_model_and_processor
from modeling_selfie.training import (
    SelfieDataCollator,
    SelfieTrainer,
    _unsharded_copy,
    apply_lora,
    merge_and_save,
)

WORDS = ("segment", "the", "red", "blue", "green", "square", "and", "describe", "image", "colours")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def square_sample(index: int) -> dict:
    """A 56x56 image with one coloured 28 px square; the query names its colour."""
    rng = np.random.default_rng(index)
    colour = list(COLOURS)[index % len(COLOURS)]
    pixels = np.full((56, 56, 3), 100, np.uint8)
    masks = np.zeros((1, 56, 56), np.uint8)
    top, left = rng.integers(0, 3, 2) * 14
    pixels[top : top + 28, left : left + 28] = COLOURS[colour]
    masks[0, top : top + 28, left : left + 28] = 1
    return {
        "image": Image.fromarray(pixels),
        "conversation": [
            {"role": "user", "content": f"segment the {colour} square"},
            {"role": "assistant", "content": "It is [SEG] ."},
        ],
        "masks": masks,
        "task": "referring",
        "source": "squares",
    }


TRAIN = [square_sample(i) for i in range(24)]
HELD_OUT = [square_sample(1000 + i) for i in range(4)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small for intra-op threads: one thread is as fast and immune to busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def training_args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        max_steps=6,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=True,
        seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def lora_model(vision_lora: bool = False):
    model, processor = tiny_model_and_processor(WORDS, seed=0)
    return apply_lora(model.train(), rank=4, alpha=8, dropout=0.0, vision_lora=vision_lora), processor


def lora_tensors(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


# ----------------------------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------------------------


def test_collator_mixed_batch():
    """Two tile grids, two [SEG] in one sample, a VQA sample without masks and a text-only sample in one batch."""
    model, processor = tiny_model_and_processor(WORDS, seed=0)
    wide, tall = Image.new("RGB", (112, 56), (200, 0, 0)), Image.new("RGB", (56, 112), (0, 0, 200))
    samples = [
        {
            "image": wide,
            "conversation": [
                {"role": "user", "content": "segment the red and the blue square"},
                {"role": "assistant", "content": "[SEG] and [SEG] ."},
            ],
            "masks": np.stack([np.eye(56, 112, dtype=np.uint8), np.ones((56, 112), np.uint8)]),
            "task": "referring",
            "source": "two",
        },
        {
            "image": Image.new("RGB", (56, 56), (0, 200, 0)),
            "conversation": [
                {"role": "user", "content": "describe the image"},
                {"role": "assistant", "content": "green"},
            ],
            "masks": np.zeros((0, 56, 56), np.uint8),
            "task": "vqa",
            "source": "vqa",
        },
        {
            "image": None,
            "conversation": [{"role": "user", "content": "colours"}, {"role": "assistant", "content": "red and blue"}],
            "masks": np.zeros((0, 1, 1), np.uint8),
            "task": "vqa",
            "source": "text",
        },
        {
            "image": tall,
            "conversation": [
                {"role": "user", "content": "segment the blue square"},
                {"role": "assistant", "content": "It is [SEG] ."},
            ],
            "masks": np.ones((1, 112, 56), np.uint8),
            "task": "referring",
            "source": "one",
        },
    ]
    batch = SelfieDataCollator(processor, max_tiles=4)(samples)

    assert batch["tile_grid"].tolist() == [[1, 2], [1, 1], [2, 1]]
    assert batch["pixel_values"].shape == (5, 3, 56, 56)
    image_tokens = (batch["input_ids"] == processor.image_token_id) & batch["attention_mask"].bool()
    assert image_tokens.sum(1).tolist() == [2 * 4, 1 * 4, 0, 2 * 4]  # tiles x image_seq_length
    assert [tuple(m.shape) for m in batch["mask_labels"]] == [(2, 56, 112), (0, 56, 56), (0, 1, 1), (1, 112, 56)]
    assert torch.equal(batch["mask_labels"][0][0], torch.eye(56, 112))
    for b, sample in enumerate(samples):
        expected = processor.tokenizer(sample["conversation"][1]["content"] + "<|im_end|>", add_special_tokens=False)
        supervised = batch["labels"][b][batch["labels"][b] != -100].tolist()
        assert supervised == expected["input_ids"], f"sample {b}"

    outputs = model(**batch)
    assert [tuple(m.shape) for m in outputs.pred_masks] == [(2, 8, 16), (0, 1, 1), (0, 1, 1), (1, 16, 8)]
    for name in ("loss", "text_loss", "mask_bce_loss", "mask_dice_loss"):
        assert torch.isfinite(getattr(outputs, name)), name


def test_collator_rejects_mask_count_mismatch():
    _, processor = tiny_model_and_processor(WORDS, seed=0)
    bad = {**square_sample(0), "masks": np.zeros((2, 56, 56), np.uint8), "source": "broken"}
    with pytest.raises(ValueError, match="batch sample 1 .*broken"):
        SelfieDataCollator(processor)([square_sample(1), bad])


# ----------------------------------------------------------------------------------------------------------------
# LoRA and the trainer
# ----------------------------------------------------------------------------------------------------------------


def test_apply_lora_trains_only_adapters_and_saved_modules():
    model, _ = lora_model(vision_lora=False)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or ".modules_to_save." in name for name in trainable)
    saved = {name.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for name in trainable if "modules_to_save" in name}
    assert saved == {"seg_head", "embed_tokens", "lm_head"}
    assert not any("vision_tower" in name for name in trainable)
    assert any("language_model.layers.1.mlp.down_proj.lora_A" in name for name in trainable)

    with_vision, _ = lora_model(vision_lora=True)
    assert any("vision_tower.encoder.layer.0.attention.q_proj.lora_A" in n for n, _ in with_vision.named_parameters())
    with pytest.raises(ValueError, match="rank"):
        apply_lora(tiny_model_and_processor(WORDS)[0], rank=0)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A LoRA model trained 12 steps (2 micro-batches per step) with evaluation at the end."""
    model, processor = lora_model()
    args = training_args(
        tmp_path_factory.mktemp("lora"),
        max_steps=12,
        logging_steps=4,
        gradient_accumulation_steps=2,
        eval_strategy="steps",
        eval_steps=12,
    )
    trainer = SelfieTrainer(
        model=model, args=args, train_dataset=TRAIN, eval_dataset=HELD_OUT, processing_class=processor
    )
    trainer.train()
    return trainer


def test_trainer_lowers_loss_and_logs_components(lora_run):
    config = lora_run.model.config
    train_logs = [log for log in lora_run.state.log_history if "loss" in log]
    assert [log["step"] for log in train_logs] == [4, 8, 12]
    for log in train_logs:  # each term is averaged over the same micro-batches as the loss
        weighted = (
            config.text_loss_weight * log["text_loss"]
            + config.bce_loss_weight * log["mask_bce_loss"]
            + config.dice_loss_weight * log["mask_dice_loss"]
        )
        assert weighted == pytest.approx(log["loss"], rel=1e-5)
    assert train_logs[-1]["loss"] < train_logs[0]["loss"]

    eval_log = next(log for log in lora_run.state.log_history if "eval_loss" in log)
    weighted = (
        config.text_loss_weight * eval_log["eval_text_loss"]
        + config.bce_loss_weight * eval_log["eval_mask_bce_loss"]
        + config.dice_loss_weight * eval_log["eval_mask_dice_loss"]
    )
    assert weighted == pytest.approx(eval_log["eval_loss"], rel=1e-5)


def test_trainer_requires_raw_columns(tmp_path):
    model, processor = lora_model()
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        SelfieTrainer(
            model=model,
            args=training_args(tmp_path, remove_unused_columns=True),
            train_dataset=TRAIN,
            processing_class=processor,
        )


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_trains_every_adapter(tmp_path, use_reentrant):
    """With activation checkpointing every LoRA matrix, in the LLM and in the vision tower, gets gradients
    (reentrant checkpointing needs inputs that require grad)."""
    model, processor = lora_model(vision_lora=True)
    before = lora_tensors(model)
    args = training_args(
        tmp_path,
        max_steps=2,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": use_reentrant},
    )
    SelfieTrainer(model=model, args=args, train_dataset=TRAIN, processing_class=processor).train()
    assert model.get_base_model().model.language_model.layers[0].gradient_checkpointing
    after = lora_tensors(model)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, unchanged[:4]


def test_resume_from_checkpoint_continues(tmp_path):
    """Stopping after step 3 and resuming from its checkpoint ends where an uninterrupted run does."""
    model, processor = lora_model()
    full = SelfieTrainer(
        model=model,
        args=training_args(tmp_path / "full", save_strategy="steps", save_steps=3),
        train_dataset=TRAIN,
        processing_class=processor,
    )
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file()

    model, processor = lora_model()
    resumed = SelfieTrainer(
        model=model, args=training_args(tmp_path / "resumed"), train_dataset=TRAIN, processing_class=processor
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    assert [log["step"] for log in resumed.state.log_history if "loss" in log] == [2, 4, 6]  # step 2: restored
    expected, actual = lora_tensors(full.model), lora_tensors(resumed.model)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------------------------


def test_merge_and_save_matches_peft_model(lora_run, tmp_path):
    peft_model, processor = lora_run.model.eval(), lora_run.processing_class
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    batch = SelfieDataCollator(processor)(HELD_OUT)
    with torch.no_grad():
        expected = peft_model(**batch).pred_masks

        # The sharded path: a full state dict (gathered, hence not aliasing the live weights) merged into a copy.
        gathered = {name: tensor.clone() for name, tensor in peft_model.state_dict().items()}
        merge_and_save(_unsharded_copy(peft_model, gathered), tmp_path / "from_copy", processor)
        merged = merge_and_save(lora_run, tmp_path / "merged")
        assert merged is not None and not any("lora" in name for name, _ in merged.named_parameters())

        for folder in ("from_copy", "merged"):
            loaded = SelfieForSegmentation.from_pretrained(tmp_path / folder).eval()
            assert type(SelfieProcessor.from_pretrained(tmp_path / folder)) is SelfieProcessor
            actual = loaded(**batch).pred_masks
            for a, e in zip(actual, expected, strict=True):
                torch.testing.assert_close(a, e, rtol=0, atol=1e-5, msg=folder)

    with pytest.raises(FileExistsError):
        merge_and_save(merged, tmp_path / "merged", processor)


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def test_training_entry_point(tmp_path):
    """`python -m modeling_selfie.training` on a one-dataset recipe: a random selfie-tiny with LoRA trains two steps
    and the merged checkpoint loads."""
    import json

    from modeling_selfie.training import main

    data_root = tmp_path / "data"
    (data_root / "vqav2" / "images").mkdir(parents=True)
    records = []
    for i, colour in enumerate(["red", "green", "blue", "red"]):
        Image.new("RGB", (56, 56), COLOURS[colour]).save(data_root / "vqav2" / "images" / f"{i}.png")
        records.append({"image": f"vqav2/images/{i}.png", "question": "describe the image", "answer": colour})
    (data_root / "vqav2" / "vqav2_train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"datasets": [{"name": "vqav2", "split": "train"}], "sample_rates": {"vqa": 1}}))

    main(
        [
            "--model",
            "selfie-tiny",
            "--recipe",
            str(recipe),
            "--data-root",
            str(data_root),
            "--output-dir",
            str(tmp_path / "run"),
            "--max-steps",
            "2",
            "--per-device-train-batch-size",
            "2",
            "--lora-rank",
            "4",
            "--save-strategy",
            "no",
            "--report-to",
            "none",
            "--disable-tqdm",
            "true",
            "--use-cpu",
        ]
    )
    merged = SelfieForSegmentation.from_pretrained(tmp_path / "run" / "final")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert SelfieProcessor.from_pretrained(tmp_path / "run" / "final").seg_token_id == merged.config.seg_token_id
