"""Training utilities on the tiny model (CPU, fp32): collation, the trainer's logging, LoRA, activation
checkpointing, resuming and merging."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainingArguments

from modeling_selfie import SelfieForSegmentation, SelfieProcessor
from modeling_selfie.presets import tiny_model_and_processor
from modeling_selfie.training import (
    LOCAL_SETTINGS,
    SelfieDataCollator,
    SelfieTrainer,
    SelfieTrainingArguments,
    _unsharded_copy,
    apply_lora,
    cpu_threads,
    main,
    merge_and_save,
    resolve_settings,
    vision_parameter_names,
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


pytestmark = pytest.mark.usefixtures("one_thread")


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


def vqa_data_root(root) -> str:
    """A data root with a four-record VQAv2 jsonl (the layout `vqav2` reads)."""
    (root / "vqav2" / "images").mkdir(parents=True)
    records = []
    for i, colour in enumerate(["red", "green", "blue", "red"]):
        Image.new("RGB", (56, 56), COLOURS[colour]).save(root / "vqav2" / "images" / f"{i}.png")
        records.append({"image": f"vqav2/images/{i}.png", "question": "describe the image", "answer": colour})
    (root / "vqav2" / "vqav2_train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return str(root)


def write_recipe(path, training: dict | None = None, **top) -> str:
    recipe = {"datasets": [{"name": "vqav2", "split": "train"}], "sample_rates": {"vqa": 1}, **top}
    if training is not None:
        recipe["training"] = training
    path.write_text(json.dumps(recipe))
    return str(path)


QUIET = ["--save-strategy", "no", "--report-to", "none", "--disable-tqdm", "true"]


@pytest.mark.parametrize(
    "recipe, rates",
    [("self1e", {"semantic": 1, "referring": 1, "reasoning": 1, "vqa": 1}),
     ("self1e-seg", {"semantic": 6, "referring": 20, "reasoning": 6, "vqa": 1})],
)
def test_shipped_recipes_are_the_authors_command_lines(recipe, rates):
    """Batch 5 x accumulation 8, lr and vision lr 1e-4, LoRA 128/256 on LLM and vision, 1 epoch, max length 512,
    gradient checkpointing, AdamW + cosine; SELF1E samples every dataset once, SELF1E-SEG by the paper's Tab. 8."""
    run = resolve_settings(["--model", "m", "--recipe", recipe, "--data-root", "d", "--output-dir", "o"])
    args, script = run.training, run.script
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (5, 8)
    assert (args.learning_rate, args.vision_learning_rate, args.num_train_epochs) == (1e-4, 1e-4, 1)
    assert (args.optim, args.lr_scheduler_type) == ("adamw_torch", "cosine")
    assert args.gradient_checkpointing is True and script.model_max_length == 512
    assert (script.lora_rank, script.lora_alpha) == (128, 256)
    assert (script.vision_lora_rank, script.vision_lora_alpha) == (128, 256)
    assert run.recipe["sample_rates"] == rates and run.recipe["seed"] == 0
    for key in ("per_device_train_batch_size", "learning_rate", "vision_learning_rate", "lora_rank",
                "vision_lora_rank", "model_max_length", "activation_checkpointing", "sample_rates"):
        assert run.sources[key] == "recipe", key


def test_flags_override_only_the_keys_given(tmp_path):
    recipe = write_recipe(tmp_path / "r.json", {"learning_rate": 3e-4, "lora_rank": 16, "lora_alpha": 32, "seed": 7})
    run = resolve_settings(["--model", "m", "--recipe", recipe, "--data-root", "d", "--output-dir", "o",
                            "--lora-rank", "4", "--seed", "0", "--sample-rates", "vqa=3"])
    assert (run.script.lora_rank, run.sources["lora_rank"]) == (4, "flag")
    assert (run.training.seed, run.sources["seed"]) == (0, "flag")  # a flag equal to the default still wins
    assert (run.script.lora_alpha, run.sources["lora_alpha"]) == (32, "recipe")
    assert (run.training.learning_rate, run.sources["learning_rate"]) == (3e-4, "recipe")
    assert (run.training.num_train_epochs, run.sources["num_train_epochs"]) == (3, "default")
    assert run.recipe["sample_rates"] == {"vqa": 3} and run.sources["sample_rates"] == "flag"
    table = run.table()
    assert "| lora_rank " in table and "| flag " in table and table.count("\n") == len(run.rows()) + 1


def test_own_data_with_a_shipped_recipes_training_block(tmp_path):
    """A recipe that `"extends"` a shipped one keeps its training block and changes only the keys it gives;
    `--datasets FILE` swaps a recipe's datasets and sample rates for the file's."""
    own = [{"name": "custom_referring", "annotations": "refs.jsonl", "rate": 4}]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"name": "mine", "extends": "self1e-seg", "datasets": own,
                                "training": {"lora_rank": 16, "lora_alpha": 32}}))
    base = ["--model", "m", "--data-root", "d", "--output-dir", "o"]
    run = resolve_settings([*base, "--recipe", str(path)])
    assert run.recipe["datasets"] == own and run.recipe["name"] == "mine" and run.values["datasets"] == [own[0]["name"]]
    assert run.recipe["sample_rates"] == {"semantic": 6, "referring": 20, "reasoning": 6, "vqa": 1}
    assert "description" not in run.recipe and "notes" not in run.recipe and "extends" not in run.recipe
    assert (run.script.lora_rank, run.script.lora_alpha, run.script.vision_lora_rank) == (16, 32, 128)
    assert (run.training.per_device_train_batch_size, run.training.gradient_accumulation_steps) == (5, 8)
    assert run.values["activation_checkpointing"] is True and run.sources["model_max_length"] == "recipe"

    datasets = tmp_path / "my_datasets.json"
    datasets.write_text(json.dumps({"datasets": own, "sample_rates": {"referring": 3}}))
    run = resolve_settings([*base, "--recipe", "self1e", "--datasets", str(datasets)])
    assert run.recipe["datasets"] == own and run.recipe["sample_rates"] == {"referring": 3}
    assert (run.script.lora_rank, run.training.learning_rate) == (128, 1e-4)  # self1e's training block
    assert run.sources["datasets"] == run.sources["sample_rates"] == "flag: my_datasets.json"
    datasets.write_text(json.dumps({"datasets": own, "rates": {}}))
    with pytest.raises(ValueError, match="my_datasets.json.*unknown key.*'rates'"):
        resolve_settings([*base, "--recipe", "self1e", "--datasets", str(datasets)])
    path.write_text(json.dumps({"extends": "self2e", "datasets": own}))
    with pytest.raises(FileNotFoundError, match="'self2e' is neither a file nor a shipped recipe .*self1e-seg"):
        resolve_settings([*base, "--recipe", str(path)])


@pytest.mark.parametrize(
    "cores, processes, environ, load, threads",
    [(8, 1, {}, 0.0, 8), (8, 4, {}, 0.3, 2), (8, 3, {}, 0.0, 2), (2, 4, {}, 0.0, 1),  # cores shared by processes
     (2, 1, {}, 9.2, 1), (8, 2, {}, 4.7, 2), (16, 1, {}, 40.0, 1),  # other work keeps cores busy
     (8, 1, {"OMP_NUM_THREADS": "3"}, 0.0, None), (8, 1, {"OMP_NUM_THREADS": ""}, 0.0, 8)],  # the user's choice
)
def test_cpu_threads_share_the_idle_cores_among_processes(cores, processes, environ, load, threads):
    assert cpu_threads(cores, processes, environ, load) == threads


def test_unknown_recipe_keys_are_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="'lora_rnak'"):
        resolve_settings(["--model", "m", "--recipe", write_recipe(tmp_path / "a.json", {"lora_rnak": 4}),
                          "--data-root", "d"])
    with pytest.raises(ValueError, match="'output_dir'.*per-run"):
        resolve_settings(["--model", "m", "--recipe", write_recipe(tmp_path / "b.json", {"output_dir": "x"}),
                          "--data-root", "d"])
    bad_top = write_recipe(tmp_path / "c.json", {}, epochs=2)
    assert main(["--model", "m", "--recipe", bad_top, "--data-root", "d", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "'epochs'" in err[0]


def test_processor_of_another_model_is_an_error_before_training(tmp_path, capsys):
    model, processor = tiny_model_and_processor(WORDS)
    model.save_pretrained(tmp_path / "model")
    processor.image_seq_length = 16  # a processor made for 4x4 tokens per tile; the model has 2x2
    processor.save_pretrained(tmp_path / "processor")
    status = main(["--model", str(tmp_path / "model"), "--processor", str(tmp_path / "processor"), "--recipe",
                   write_recipe(tmp_path / "r.json"), "--data-root", vqa_data_root(tmp_path / "data"),
                   "--output-dir", str(tmp_path / "run"), *QUIET])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: The processor does not match the model (image tokens per tile: processor 16")
    assert not (tmp_path / "run" / "final").exists()


def test_help_is_short_and_help_all_lists_trainer_options(capsys):
    assert main(["--help"]) == 0
    short = capsys.readouterr().out
    assert len(short.splitlines()) < 70
    for text in ("--recipe", "--data-root", "--lora-rank", "--vision-lora-rank", "--push-to-hub", "Example",
                 "--help-all", "InternVL3"):
        assert text in short, text
    assert main(["--help-all"]) == 0
    assert "--adam_beta2" in capsys.readouterr().out


def test_vision_learning_rate_is_its_own_param_group(tmp_path):
    model, processor = lora_model(vision_lora=True)
    args = SelfieTrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, vision_learning_rate=2e-4,
                                   lr_scheduler_type="cosine", report_to="none", remove_unused_columns=False,
                                   use_cpu=True, weight_decay=0.1)
    trainer = SelfieTrainer(model=model, args=args, train_dataset=TRAIN, processing_class=processor)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    vision = {id(p) for name, p in model.named_parameters() if name in vision_parameter_names(model)}
    assert vision and all("lora_" in name for name in vision_parameter_names(model))
    groups = [(group["lr"], {id(p) for p in group["params"]}) for group in trainer.optimizer.param_groups]
    assert {lr for lr, ids in groups if ids & vision} == {2e-4}
    assert all(not ids & vision for lr, ids in groups if lr == 1e-3)
    assert set().union(*(ids for _, ids in groups)) == {id(p) for p in model.parameters() if p.requires_grad}
    for _ in range(4):
        trainer.optimizer.step()  # no gradients: nothing moves
        trainer.lr_scheduler.step()
    rates = {group["lr"] / group["initial_lr"] for group in trainer.optimizer.param_groups}
    assert len({round(r, 9) for r in rates}) == 1 and 0 < rates.pop() < 1  # one cosine for every group


def test_collator_shortens_samples_over_max_length():
    _, processor = tiny_model_and_processor(WORDS, seed=0)
    sample = square_sample(0)
    three = {**sample, "conversation": sample["conversation"] * 3, "masks": np.concatenate([sample["masks"]] * 3)}
    full = SelfieDataCollator(processor)([three])
    one = SelfieDataCollator(processor)([sample])
    limit = int(one["attention_mask"].sum()) + 2  # the first exchange fits, the second does not
    batch = SelfieDataCollator(processor, max_length=limit)([three, sample])
    assert int(full["attention_mask"].sum()) > limit >= int(batch["attention_mask"].sum(1).max())
    assert [m.shape[0] for m in batch["mask_labels"]] == [1, 1]
    assert torch.equal(batch["input_ids"][0, : one["input_ids"].shape[1]], one["input_ids"][0])
    with pytest.raises(ValueError, match="batch sample 0 .*first exchange.*model_max_length 5"):
        SelfieDataCollator(processor, max_length=5)([sample])


def test_training_entry_point_applies_the_recipe(tmp_path, monkeypatch):
    """`python -m modeling_selfie.training` on a one-dataset recipe: every training-block key reaches the model,
    the optimizer, the collator and the Trainer; the settings table is saved; the merged checkpoint loads."""
    trainers = []
    original_train = SelfieTrainer.train

    def recording_train(self, *args, **kwargs):
        trainers.append((self, [name for name, _ in self.model.named_parameters() if "lora_A" in name]))
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(SelfieTrainer, "train", recording_train)
    training = {
        "lora_rank": 4, "lora_alpha": 12, "lora_dropout": 0.0, "lora_target_modules": ["q_proj", "v_proj"],
        "vision_lora_rank": 2, "vision_lora_alpha": 6, "vision_lora_target_modules": ["fc1"],
        "learning_rate": 1e-3, "vision_learning_rate": 5e-4, "lr_scheduler_type": "cosine", "warmup_steps": 1,
        "max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
        "activation_checkpointing": True, "model_max_length": 300, "seed": 3,
    }  # fmt: skip
    recipe = write_recipe(tmp_path / "recipe.json", training, seed=5)
    run_dir = tmp_path / "run"
    status = main(["--model", "selfie-tiny", "--recipe", recipe, "--data-root", vqa_data_root(tmp_path / "data"),
                   "--output-dir", str(run_dir), "--lora-alpha", "8", "--resume-from-checkpoint", "last", *QUIET])
    assert status == 0
    ((trainer, names),) = trainers  # the model is merged in place afterwards
    config = trainer.model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.0)  # alpha: the flag wins
    assert set(config.rank_pattern.values()) == {2} and set(config.alpha_pattern.values()) == {6}
    assert {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name in names} == {"q_proj", "v_proj", "fc1"}
    assert {group["initial_lr"] for group in trainer.optimizer.param_groups} == {1e-3, 5e-4}
    assert (trainer.args.lr_scheduler_type, trainer.args.warmup_steps, trainer.args.seed) == ("cosine", 1, 3)
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (2, 2)
    assert trainer.args.gradient_checkpointing and trainer.data_collator.max_length == 300
    assert trainer.train_dataset.seed == 5 and trainer.state.global_step == 2

    settings = json.loads((run_dir / "settings.json").read_text())["settings"]
    assert settings["lora_alpha"] == {"value": 8, "from": "flag"}
    assert settings["vision_lora_rank"] == {"value": 2, "from": "recipe"}
    assert settings["num_train_epochs"]["from"] == "default"
    assert "| vision_learning_rate" in (run_dir / "settings.md").read_text()
    final = run_dir / "final"
    merged = SelfieForSegmentation.from_pretrained(final)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert SelfieProcessor.from_pretrained(final).seg_token_id == merged.config.seg_token_id
    assert settings["resume_from_checkpoint"]["value"] == "last" and settings["output_dir"]["value"] == str(run_dir)
    shared = json.loads((final / "settings.json").read_text())["settings"]  # what final/ and the card say
    assert set(shared) == set(settings) - set(LOCAL_SETTINGS) and shared["recipe"]["value"] == "recipe.json"
    assert all(shared[key] == settings[key] for key in shared if key != "recipe")
    card = (final / "README.md").read_text()
    assert "\"max_steps\": 2" in card and "| vision_learning_rate" in card
    for name in ("README.md", "settings.md", "settings.json"):
        text = (final / name).read_text()
        assert str(tmp_path) not in text and "resume_from_checkpoint" not in text and "output_dir" not in text, name


# ----------------------------------------------------------------------------------------------------------------
# Sharing
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """HfApi with the network calls replaced: each upload_folder copies the folder to tmp_path/uploads/<n>."""
    import shutil
    from types import SimpleNamespace

    from huggingface_hub import HfApi

    uploads = []

    def fake_create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def fake_upload_folder(self, repo_id, folder_path, **kwargs):
        target = tmp_path / "uploads" / str(len(uploads))
        shutil.copytree(folder_path, target)
        uploads.append((repo_id, target))
        return f"https://hub.invalid/{repo_id}/commit/{len(uploads)}"

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(HfApi, "whoami", lambda self, token=None, **kwargs: {"name": "team"})
    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    return uploads


def refuse_network(*args, **kwargs):
    raise AssertionError("the push check went to the network")


@pytest.mark.parametrize("case", ["offline", "no token", "token refused"])
def test_push_settings_fail_in_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys, case):
    """`--push-to-hub` that cannot push (HF_HUB_OFFLINE, no login, a token the Hub refuses) stops at once with one
    `error:` line, before the data, the settings files and the model; no network call is made."""
    import huggingface_hub
    from huggingface_hub import HfApi

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", case == "offline")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(HfApi, "whoami", refuse_network)
    if case == "token refused":
        monkeypatch.setenv("HF_TOKEN", "hf_refused")

        def refused(self, token=None, **kwargs):
            raise OSError("401 Client Error: Unauthorized for url\nInvalid credentials in Authorization header")

        monkeypatch.setattr(HfApi, "whoami", refused)
    monkeypatch.setattr("modeling_selfie.training.load_model_and_processor", refuse_network)
    status = main(["--model", "selfie-tiny", "--recipe", write_recipe(tmp_path / "r.json"), "--data-root",
                   str(tmp_path / "no_data"), "--output-dir", str(tmp_path / "run"), "--push-to-hub", *QUIET])
    out, err = capsys.readouterr()
    assert status == 2 and out == "" and not (tmp_path / "run").exists()
    (line,) = err.strip().splitlines()
    expected = {"offline": "offline mode is on (HF_HUB_OFFLINE)", "no token": "needs a Hugging Face token",
                "token refused": "did not accept the token or could not be reached (401 Client Error"}
    assert line.startswith("error: --push-to-hub") and expected[case] in line


def test_push_to_hub_flag_uploads_the_merged_model_with_card(tmp_path, fake_hub, capsys):
    """`--push-to-hub` uploads once, at the end: the merged model with its remote code, the processor and a card
    with base_model, datasets, the recipe, the settings and the evaluation losses; no adapter, no checkpoint."""
    recipe = write_recipe(tmp_path / "recipe.json", {"lora_rank": 4, "lora_alpha": 8, "max_steps": 2,
                                                     "per_device_train_batch_size": 2}, name="colours")
    data_root = vqa_data_root(tmp_path / "data")
    status = main(["--model", "selfie-tiny", "--recipe", recipe, "--data-root", data_root, "--eval-recipe", recipe,
                   "--output-dir", str(tmp_path / "run"), "--push-to-hub", "--hub-model-id", "team/selfie-colours",
                   "--base-model", "OpenGVLab/InternVL3-2B-hf", "--eval-strategy", "steps", "--eval-steps", "2",
                   "--save-strategy", "steps", "--save-steps", "1", "--report-to", "none", "--disable-tqdm", "true"])
    assert status == 0
    assert len(fake_hub) == 1 and fake_hub[0][0] == "team/selfie-colours"  # checkpoints were not pushed
    assert "pushed https://hub.invalid/team/selfie-colours/commit/1" in capsys.readouterr().out
    uploaded = fake_hub[0][1]
    files = {p.name for p in uploaded.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "modeling_selfie.py", "configuration_selfie.py",
            "processing_selfie.py", "tokenizer.json"} <= files
    assert not files & {"adapter_config.json", "adapter_model.safetensors", "training_args.bin"}
    card = (uploaded / "README.md").read_text()
    assert "base_model: OpenGVLab/InternVL3-2B-hf" in card and "datasets:\n- vqav2" in card
    assert '"name": "colours"' in card and "| lora_rank " in card and "| colours/eval |" in card and "eval_loss" in card
    merged = SelfieForSegmentation.from_pretrained(uploaded)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    local = SelfieForSegmentation.from_pretrained(tmp_path / "run" / "final")  # the pushed model is final/'s
    for (name, a), (_, b) in zip(sorted(merged.state_dict().items()), sorted(local.state_dict().items()), strict=True):
        assert torch.equal(a, b), name


def test_push_to_hub_training_argument_pushes_the_same_files(tmp_path, fake_hub):
    """`TrainingArguments(push_to_hub=True)`: checkpoints are not pushed; `save_model()` (which the Trainer makes
    push) and `push_to_hub()` upload the merged model, loadable with and without this package."""
    import subprocess
    import sys

    from .test_hub import REMOTE_CHECK

    model, processor = lora_model()
    args = training_args(tmp_path / "run", push_to_hub=True, hub_model_id="team/selfie-squares",
                         save_strategy="steps", save_steps=2, max_steps=4)
    trainer = SelfieTrainer(model=model, args=args, train_dataset=TRAIN, processing_class=processor)
    trainer.train()
    assert fake_hub == [] and (tmp_path / "run" / "checkpoint-2").is_dir()
    trainer.save_model(str(tmp_path / "saved"))
    url = trainer.push_to_hub(base_model="OpenGVLab/InternVL3-2B-hf", datasets=["squares"])
    assert url.endswith("/commit/2") and [repo for repo, _ in fake_hub] == ["team/selfie-squares"] * 2
    first, second = (folder for _, folder in fake_hub)
    assert {p.name for p in first.iterdir()} == {p.name for p in second.iterdir()}
    assert "adapter_config.json" not in {p.name for p in second.iterdir()}
    assert "base_model: OpenGVLab/InternVL3-2B-hf" in (second / "README.md").read_text()

    image = HELD_OUT[0]["image"]
    image.save(tmp_path / "image.png")
    (tmp_path / "check.py").write_text(REMOTE_CHECK)
    remote = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(second), str(tmp_path / "image.png")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert remote.returncode == 0, remote.stderr[-3000:]
    logits = torch.tensor(json.loads(remote.stdout.strip().splitlines()[-1])["logits"])
    loaded = SelfieForSegmentation.from_pretrained(second).eval()
    with torch.no_grad():
        ours = loaded(**processor(images=[image], queries=["red circle"])).pred_masks[0].flatten()
    torch.testing.assert_close(logits, ours, atol=1e-5, rtol=1e-5)
