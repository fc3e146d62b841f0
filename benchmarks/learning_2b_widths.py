"""Does the SELFIE head learn at InternVL3-2B widths from the model's own initialisation? A shallow model with the
2B preset's widths (InternViT-300M: 1024 wide, 16 heads, MLP 4096; Qwen2.5-1.5B: 1536 wide, 12 / 2 heads, MLP 8960;
SELFIE head at the LLM width) but few layers, trained with the shipped recipes' LoRA (rank 128, alpha 256, on the
LLM and the vision tower), learning rates (1e-4, vision 1e-4) and a fully trained head, on a two-squares referring
task (the query names one square's colour). Prints the mask loss per step and a held-out batch's loss before and
after; on a 2-core CPU the default run takes a few minutes.

    nice -n 10 python benchmarks/learning_2b_widths.py [--steps 30] [--vision-layers 1] [--llm-layers 2]

Weights are drawn by `SelfieForSegmentation`'s own `_init_weights` (transformers' N(0, 0.02) for Linear layers, the
head's init), as `from_pretrained` on an InternVL3-hf folder does for the new head; the backbone is random, not
pretrained: this checks the head and the training wiring at full width, not what pretraining adds. Tiles are 224 px
(64 LLM tokens per tile) instead of 448 px to keep the CPU run short.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from modeling_selfie import SelfieForSegmentation
from modeling_selfie.presets import preset_config
from modeling_selfie.processing_selfie import SelfieImageProcessor, SelfieProcessor
from modeling_selfie.tokenization import build_word_level_tokenizer
from modeling_selfie.training import SelfieDataCollator, apply_lora, vision_parameter_names

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: the task lives with its test
from tests.test_learning import COLOURS, TwoSquares  # noqa: E402

TILE, CELL = 224, 56


def two_squares(index: int, seed: int) -> dict:
    """A grey 224 px image with two squares (1 or 2 cells of 56 px) of different colours; the query names one (the
    task of `tests/test_learning.py`, at this benchmark's tile size)."""
    return TwoSquares(index + 1, seed, side=TILE, cell=CELL)[index]


def build(vision_layers: int, llm_layers: int, seed: int) -> tuple[SelfieForSegmentation, SelfieProcessor]:
    """The 2B preset's widths with few layers, 224 px tiles and a word-level tokenizer."""
    from modeling_selfie.processing_selfie import ANSWERS, LONG_QUESTIONS, SHORT_QUESTIONS

    prompt = " ".join((*SHORT_QUESTIONS, *LONG_QUESTIONS, *ANSWERS)).replace("{text}", " ")
    for mark in ".,?":
        prompt = prompt.replace(mark, " ")
    tokenizer = build_word_level_tokenizer([*prompt.split(), *COLOURS, "square"])
    tokens_per_tile = (TILE // 14 // 2) ** 2  # patch 14, pixel shuffle 0.5
    processor = SelfieProcessor(
        image_processor=SelfieImageProcessor(size={"height": TILE, "width": TILE}),
        tokenizer=tokenizer,
        image_seq_length=tokens_per_tile,
        system_message="",
    )
    config = preset_config(
        "selfie-2b",
        vision_config={"num_hidden_layers": vision_layers, "image_size": [TILE, TILE]},
        text_config={"num_hidden_layers": llm_layers, "vocab_size": len(tokenizer)},
        image_seq_length=tokens_per_tile,
        image_token_id=processor.image_token_id,
        seg_token_id=processor.seg_token_id,
    )
    torch.manual_seed(seed)
    return SelfieForSegmentation(config), processor


def mask_losses(outputs) -> tuple[float, float]:
    return float(outputs.mask_bce_loss.detach()), float(outputs.mask_dice_loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--vision-layers", type=int, default=1)
    parser.add_argument("--llm-layers", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the curve as JSON here")
    args = parser.parse_args()

    model, processor = build(args.vision_layers, args.llm_layers, args.seed)
    model = apply_lora(model.train(), rank=128, alpha=256, dropout=0.05, vision_lora=True)
    collator = SelfieDataCollator(processor)
    vision = vision_parameter_names(model)
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in params.items() if p.requires_grad and n not in vision], "lr": args.learning_rate},
            {"params": [params[n] for n in sorted(vision)], "lr": args.learning_rate},
        ],
        weight_decay=0.0,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"{args.vision_layers} vision + {args.llm_layers} LLM layers at InternVL3-2B widths: {total / 1e6:.0f}M "
          f"parameters, {trainable / 1e6:.1f}M trained (LoRA 128/256 on LLM and vision, head, embeddings)")

    held_out = collator([two_squares(i, seed=10_000) for i in range(8)])

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            result = mask_losses(model(**held_out))
        model.train()
        return result

    before = evaluate()
    curve = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = collator([two_squares(step * args.batch_size + i, seed=args.seed) for i in range(args.batch_size)])
        outputs = model(**batch)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        bce, dice = mask_losses(outputs)
        curve.append({"step": step, "mask_bce": bce, "mask_dice": dice, "text": float(outputs.text_loss.detach())})
        print(f"step {step:3d}  mask BCE {bce:.4f}  DICE {dice:.4f}  BCE+DICE {bce + dice:.4f}  "
              f"text {curve[-1]['text']:.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    after = evaluate()
    print(f"held-out 8 queries, mask BCE+DICE: {sum(before):.4f} before -> {sum(after):.4f} after {args.steps} steps "
          f"(BCE {before[0]:.4f} -> {after[0]:.4f}, DICE {before[1]:.4f} -> {after[1]:.4f})")
    if args.output:
        with open(args.output, "w") as file:
            json.dump({"args": vars(args), "held_out_before": before, "held_out_after": after, "curve": curve}, file,
                      indent=1)


if __name__ == "__main__":
    main()
