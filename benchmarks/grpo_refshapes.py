"""Does GRPO with a mask reward teach a SELFIE model? SFT, then GRPO, on RefShapes reasoning questions, on a CPU.

    python benchmarks/grpo_refshapes.py                     # ~7 min on 2 busy cores
    python benchmarks/grpo_refshapes.py --grpo-steps 20 --eval-size 32   # a quick look

1. Start from the shipped tiny RefShapes model (`modeling_selfie/pretrained/selfie-refshapes`, 3.4 M parameters,
   one 112 px tile per image here) and fine-tune it with `SelfieSFTTrainer` (LoRA) to answer reasoning questions
   ("Which shape has three corners?") with the name of the target, then `[SEG]`: "red triangle [SEG]".
2. Train that model with `SelfieGRPOTrainer` (a fresh LoRA, the segmentation head frozen): it samples answers,
   each answer's `[SEG]` mask is scored by IoU against the target (`mask_iou_reward`) plus `format_reward`.
3. Before and after GRPO, on held-out reasoning questions (the validation split): the model answers greedily with
   `SelfieForSegmentation.chat` (generate, then segment the answer's `[SEG]`), and the script prints the mean
   reward (IoU + format, the training reward) and the cIoU (total intersection / total union) of those masks, and
   the mean training reward of the first and last GRPO logging intervals. Everything is measured in this one run.
"""

import argparse
import json
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

from modeling_selfie import SelfieForSegmentation, SelfieProcessor
from modeling_selfie.compat import activation_checkpointing_field
from modeling_selfie.data.refshapes import RefShapesDataset
from modeling_selfie.trainer_selfie import selfie_lora_config
from modeling_selfie.trl_selfie import (
    SelfieGRPOConfig,
    SelfieGRPOTrainer,
    SelfieSFTTrainer,
    format_reward,
    grpo_row,
    mask_iou,
    mask_iou_reward,
    sft_row,
)
from trl import SFTConfig

REASONING = {"colour_shape": 0, "position": 0, "size": 0, "relation": 0, "multi_target": 0, "no_target": 0,
             "reasoning": 1}


def target_name(dataset: RefShapesDataset, index: int) -> str:
    """"colour form" of the item's (single) target shape."""
    example = dataset.example(index)
    shape = example.scene.shapes[example.expression.targets[0]]
    return f"{shape.colour} {shape.form}"


def named_sample(dataset: RefShapesDataset, index: int) -> dict:
    """The item with its answer replaced by "<name of the target> [SEG]"."""
    sample = dataset[index]
    question = sample["conversation"][0]
    answer = {"role": "assistant", "content": f"{target_name(dataset, index)} [SEG]"}
    return {**sample, "conversation": [question, answer]}


def evaluate(model, processor, dataset: RefShapesDataset) -> dict:
    """Greedy answers (`chat`) to the held-out questions: mean IoU + format reward, cIoU, and how often the answer
    names the target."""
    model.eval()
    rewards, intersection, union, named, answers = [], 0, 0, 0, []
    for i in range(len(dataset)):
        sample = dataset[i]
        out = model.chat(processor, sample["image"], [sample["conversation"][0]], max_new_tokens=8)
        target = sample["masks"][0] > 0
        pred = out["masks"][-1].numpy() if len(out["masks"]) else None
        rewards.append(mask_iou(pred, target) + format_reward([out["text"]])[0])
        pred = np.zeros_like(target) if pred is None else pred
        intersection += int(np.logical_and(pred, target).sum())
        union += int(np.logical_or(pred, target).sum())
        named += out["text"].startswith(target_name(dataset, i))
        answers.append(f"{sample['conversation'][0]['content']} -> {out['text']!r} (target: {target_name(dataset, i)})")
    return {"mean_reward": float(np.mean(rewards)), "cIoU": intersection / max(union, 1),
            "names_target": named / len(dataset), "answers": answers[:4]}


def interval_rewards(log_history: list[dict]) -> tuple[float, float]:
    """Mean training reward of the first and the last logging interval."""
    rewards = [log["reward"] for log in log_history if "reward" in log]
    return rewards[0], rewards[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--grpo-steps", type=int, default=60)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--grpo-learning-rate", type=float, default=5e-4)
    parser.add_argument("--eval-size", type=int, default=64)
    # one thread: on cores other work keeps busy, a second thread stalls every operation (docs/performance.md)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", default="/tmp/grpo_refshapes")
    parser.add_argument("--output", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    checkpointing = {activation_checkpointing_field(): False}
    common = dict(report_to="none", use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True,
                  seed=args.seed, **checkpointing)

    folder = Path(str(resources.files("modeling_selfie").joinpath("pretrained", "selfie-refshapes")))
    model = SelfieForSegmentation.from_pretrained(folder)
    processor = SelfieProcessor.from_pretrained(folder)
    processor.image_processor.max_patches = 1  # GRPO takes one tile per image
    # The trainers feed the questions as written (as SelfieTrainer does); chat() would otherwise rewrite them as this
    # processor's "words" normalisation does (lower case: "please", a word this vocabulary lacks).
    processor.query_normalization = None
    train = RefShapesDataset("train", size=100_000, seed=args.seed, kind_weights=REASONING)
    held_out = RefShapesDataset("validation", size=args.eval_size, seed=args.seed, kind_weights=REASONING)

    # 1. SFT: answer "<name of the target> [SEG]".
    sft_size = args.sft_steps * 8
    sft_rows = Dataset.from_list([sft_row(named_sample(train, i)) for i in range(sft_size)])
    sft = SelfieSFTTrainer(
        model=model.train(), train_dataset=sft_rows, processing_class=processor,
        args=SFTConfig(output_dir=f"{args.run_dir}/sft", max_steps=args.sft_steps, per_device_train_batch_size=8,
                       learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=10, logging_steps=25,
                       max_length=None, **common),
        peft_config=selfie_lora_config(rank=8, alpha=16, dropout=0.0),
    )
    sft.train()
    model = sft.model.merge_and_unload()
    sft_minutes = (time.perf_counter() - started) / 60
    before = evaluate(model, processor, held_out)

    # 2. GRPO with the mask reward, from the SFT model.
    grpo_size = args.grpo_steps * args.prompts_per_step  # each prompt once
    grpo_rows = Dataset.from_list([grpo_row(named_sample(train, i)) for i in range(sft_size, sft_size + grpo_size)])
    grpo = SelfieGRPOTrainer(
        model=model.train(), reward_funcs=[mask_iou_reward, format_reward], train_dataset=grpo_rows,
        processing_class=processor,
        args=SelfieGRPOConfig(output_dir=f"{args.run_dir}/grpo", max_steps=args.grpo_steps,
                              per_device_train_batch_size=args.prompts_per_step * args.num_generations,
                              num_generations=args.num_generations, max_completion_length=6, temperature=1.0,
                              beta=0.0, learning_rate=args.grpo_learning_rate, lr_scheduler_type="constant",
                              logging_steps=max(1, args.grpo_steps // 6), **common),
        peft_config=selfie_lora_config(rank=8, alpha=16, dropout=0.0),
    )
    grpo_started = time.perf_counter()
    grpo.train()
    grpo_minutes = (time.perf_counter() - grpo_started) / 60
    first_reward, last_reward = interval_rewards(grpo.state.log_history)
    after = evaluate(grpo.model.merge_and_unload(), processor, held_out)

    figures = {
        "held_out": {"after_sft": before, "after_grpo": after},
        "training_reward": {"first_interval": first_reward, "last_interval": last_reward},
        "settings": vars(args),
        "minutes": {"sft": sft_minutes, "grpo": grpo_minutes, "total": (time.perf_counter() - started) / 60},
    }
    print(f"\nheld-out RefShapes reasoning questions ({args.eval_size}), greedy answers through chat():")
    print("| model | mean reward (IoU + format) | cIoU | answer names the target |")
    print("|---|---|---|---|")
    for name, row in (("after SFT", before), (f"after {args.grpo_steps} GRPO steps", after)):
        print(f"| {name} | {row['mean_reward']:.3f} | {row['cIoU']:.3f} | {row['names_target']:.1%} |")
    for name, row in (("after SFT", before), ("after GRPO", after)):
        print(f"{name}, first answers:\n  " + "\n  ".join(row["answers"]))
    print(f"GRPO training reward (mean of {args.num_generations} samples x {args.prompts_per_step} prompts per step): "
          f"first interval {first_reward:.3f}, last interval {last_reward:.3f}")
    print(f"minutes: SFT {sft_minutes:.1f}, GRPO {grpo_minutes:.1f}, total {figures['minutes']['total']:.1f}")
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
