"""Reinforcement through `trl.GRPOTrainer` (modeling_selfie.trl_selfie): the reward functions on hand-made masks and
answers, the mask of a generated [SEG] as the model's own dual-pathway forward gives it, a GRPO step with LoRA (head
frozen, or trained by the supervised mask term), and `selfie-train --method grpo` as a user runs it (a datasets
folder written by `datasets`, final/ loaded back, resume from a checkpoint, one `error:` line for a bad recipe)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from modeling_selfie import SelfieForSegmentation, SelfieProcessor
from modeling_selfie.compat import activation_checkpointing_field
from modeling_selfie.presets import tiny_model_and_processor
from modeling_selfie.trainer_selfie import selfie_lora_config
from modeling_selfie.trl_selfie import (
    SelfieGRPOConfig,
    SelfieGRPOTrainer,
    format_reward,
    grpo_row,
    mask_iou_reward,
    no_target_reward,
)

from .helpers import WORDS, random_image
from .helpers import coco_rle_text as rle

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------
# Rewards, by hand
# ----------------------------------------------------------------------------------------------------------------

TOP_LEFT = np.zeros((4, 4), bool)
TOP_LEFT[:2, :2] = True  # 4 pixels
TOP_ROWS = np.zeros((4, 4), np.uint8)
TOP_ROWS[:2] = 1  # 8 pixels, 4 of them in TOP_LEFT
EMPTY = np.zeros((4, 4), np.uint8)


def test_mask_iou_reward_by_hand():
    """IoU 4/8 with the target as an RLE and as nested lists; no [SEG] scores 0; an empty prediction of an empty
    target scores 1, a non-empty one 0; a row's last mask is the one scored."""
    rewards = mask_iou_reward(
        pred_masks=[TOP_LEFT, TOP_LEFT, None, ~TOP_LEFT & False, TOP_LEFT, TOP_LEFT],
        masks=[[rle(TOP_ROWS)], [TOP_ROWS.tolist()], [rle(TOP_ROWS)], [rle(EMPTY)], [rle(EMPTY)],
               [rle(EMPTY), rle(TOP_ROWS)]],
    )
    assert rewards == [0.5, 0.5, 0.0, 1.0, 0.0, 0.5]


def test_format_reward_by_hand():
    answers = ["red triangle [SEG]", "[SEG].", "It is [SEG] .", "red [SEG] triangle", "[SEG] and [SEG]",
               "red triangle", ""]
    assert format_reward(answers=answers) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_no_target_reward_by_hand():
    """Only rows without a target are scored (None for the others): an empty mask or a presence score under the
    threshold is right, a confident non-empty mask or no [SEG] at all is wrong."""
    rewards = no_target_reward(
        pred_masks=[EMPTY.astype(bool), TOP_LEFT, TOP_LEFT, None, TOP_LEFT],
        presence_scores=[0.9, 0.9, 0.2, None, 0.9],
        masks=[[rle(EMPTY)], [rle(EMPTY)], [EMPTY.tolist()], [rle(EMPTY)], [rle(TOP_ROWS)]],
    )
    assert rewards == [1.0, 0.0, 1.0, 0.0, None]
    assert no_target_reward(pred_masks=[TOP_LEFT], presence_scores=[0.6], masks=[[]], presence_threshold=0.7) == [1.0]


# ----------------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------------


def target(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[4:30, 6:40] = 1
    return mask


def rows(n: int = 4) -> list[dict]:
    """GRPO rows written from SELFIE samples (`grpo_row`): prompt, one image, the answer's mask as an RLE."""
    samples = [
        {
            "image": random_image(56, 56, seed=i),
            "conversation": [{"role": "user", "content": "segment the red square"},
                             {"role": "assistant", "content": "[SEG] ."}],
            "masks": target(56, 56)[None],
            "task": "referring",
            "source": "hand",
        }
        for i in range(n)
    ]
    return [grpo_row(sample) for sample in samples]


def grpo_config(output_dir, **overrides) -> SelfieGRPOConfig:
    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
        learning_rate=1e-2, max_steps=1, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=True, bf16=False, seed=0, **{activation_checkpointing_field(): False},
    )
    settings.update(overrides)
    return SelfieGRPOConfig(**settings)


def test_completion_mask_is_the_models_dual_pathway_mask(tmp_path):
    """The mask the rewards score is the mask the model's own teacher-forced forward gives for the same prompt and
    answer (the processor's rendering of the whole conversation)."""
    model, processor = tiny_model_and_processor(WORDS, seed=0)
    trainer = SelfieGRPOTrainer(model=model, reward_funcs=[mask_iou_reward], args=grpo_config(tmp_path),
                                train_dataset=Dataset.from_list(rows()), processing_class=processor)
    image = random_image(70, 56, seed=5)
    prompt = [{"role": "user", "content": [{"type": "image", "image": image},
                                           {"type": "text", "text": "segment the red square"}]}]
    answer = processor.tokenizer("red square [SEG]", add_special_tokens=False)["input_ids"]
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    predicted = trainer.predict_completion_masks([prompt, prompt], [answer + [end], answer[:-1] + [end]])
    assert predicted["answers"] == ["red square [SEG]", "red square"]
    assert predicted["pred_masks"][1] is None and predicted["presence_scores"][1] is None
    inputs = processor(images=[image], conversations=[[{"role": "user", "content": "segment the red square"},
                                                       {"role": "assistant", "content": "red square [SEG]"}]])
    with torch.no_grad():
        out = model.eval()(**inputs)
    expected = processor.post_process_masks(out.pred_masks, [(56, 70)])[0][0]
    assert predicted["pred_masks"][0].shape == (56, 70)
    np.testing.assert_array_equal(predicted["pred_masks"][0], expected.numpy())
    assert predicted["presence_scores"][0] == pytest.approx(float(out.presence_logits[0][0].sigmoid()))


@pytest.mark.parametrize("mask_loss_weight", [0.0, 1.0], ids=["head-frozen", "head-trained"])
def test_grpo_step_with_lora(tmp_path, mask_loss_weight):
    """One GRPO step (generation, mask rewards, policy loss) moves the LoRA weights; the segmentation head moves only
    with the supervised mask term, whose value is logged."""
    model, processor = tiny_model_and_processor(WORDS, seed=0)
    trainer = SelfieGRPOTrainer(
        model=model.train(), reward_funcs=[mask_iou_reward, format_reward, no_target_reward],
        args=grpo_config(tmp_path, mask_loss_weight=mask_loss_weight), train_dataset=Dataset.from_list(rows()),
        processing_class=processor, peft_config=selfie_lora_config(rank=4, alpha=8, dropout=0.0),
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {name for name, value in before.items() if not torch.equal(value, after[name])}
    assert any("lora_" in name for name in changed)
    assert any(".seg_head." in name for name in changed) == (mask_loss_weight > 0)
    logged = trainer.state.log_history[0]
    assert 0 <= logged["rewards/mask_iou_reward/mean"] <= 1
    assert ("mask_loss" in logged) == (mask_loss_weight > 0)


# ----------------------------------------------------------------------------------------------------------------
# The command line, as a user runs it
# ----------------------------------------------------------------------------------------------------------------


def train(*argv, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "modeling_selfie.training", "--method", "grpo", *argv],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    model, processor = tiny_model_and_processor(WORDS, seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rows") / "grpo"
    Dataset.from_list(rows(8)).save_to_disk(str(folder))
    return folder


COMMON = ["--per-device-train-batch-size", "4", "--num-generations", "2", "--max-completion-length", "4",
          "--learning-rate", "0.01", "--logging-steps", "1", "--report-to", "none", "--use-cpu", "--bf16", "false",
          "--lora-rank", "4", "--lora-alpha", "8"]


def test_help_answers_without_torch():
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "modeling_selfie.training", "--method", "grpo",
                          "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0 and "--mask-loss-weight" in run.stdout and "--reward-funcs" in run.stdout
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in run.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert not imported & {"torch", "transformers", "trl", "peft"}


def test_cli_runs_saves_loads_and_resumes(tmp_path, model_dir, dataset_dir):
    """A GRPO run on a datasets folder writes checkpoints and final/ (merged: loads without peft and segments,
    LLM weights moved by the LoRA, the head as it was); a second run with more steps resumes from the last
    checkpoint."""
    out = tmp_path / "run"
    first = train("--model", str(model_dir), "--dataset", str(dataset_dir), "--output-dir", str(out),
                  "--max-steps", "1", "--save-steps", "1", *COMMON)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()
    final = SelfieForSegmentation.from_pretrained(out / "final")
    processor = SelfieProcessor.from_pretrained(out / "final")
    start = SelfieForSegmentation.from_pretrained(model_dir)
    moved = [name for name, p in final.state_dict().items() if "language_model" in name and
             not torch.equal(p, start.state_dict()[name])]
    assert moved
    head = [name for name in start.state_dict() if name.startswith("seg_head.")]  # frozen by default
    assert head and all(torch.equal(final.state_dict()[name], start.state_dict()[name]) for name in head)
    mask = final.segment(processor, random_image(56, 56), "red square")[0]
    assert mask.shape == (56, 56)
    card = (out / "final" / "README.md").read_text()  # a model card that says how the model was made
    assert "library_name: transformers" in card and "GRPO" in card and "1 step," in card and "`mask_iou`" in card

    second = train("--model", str(model_dir), "--dataset", str(dataset_dir), "--output-dir", str(out),
                   "--max-steps", "2", "--save-steps", "1", "--resume-from-checkpoint", "last", *COMMON)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-1'}" in second.stdout
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_bad_input_is_one_error_line(tmp_path, model_dir):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"data": {"source": "refshapes", "size": 4}, "training": {"learning_rat": 1e-4}}))
    bad = train("--model", str(model_dir), "--recipe", str(recipe), "--output-dir", str(tmp_path / "out"))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error:")
    assert "training.learning_rat" in bad.stderr
    missing = train("--model", str(model_dir), "--dataset", str(tmp_path / "nowhere"), "--output-dir",
                    str(tmp_path / "out"))
    assert missing.returncode == 2 and "error: --dataset" in missing.stderr
    method = subprocess.run([sys.executable, "-m", "modeling_selfie.training", "--method", "ppo"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert method.returncode == 2 and method.stderr.startswith("error: --method")
