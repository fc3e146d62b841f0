"""The paper's ablations (Tab. 5 / 6 / 7) in miniature, on RefShapes, on a CPU.

    python benchmarks/ablations_refshapes.py                    # 8 trainings x 3 seeds, ~30 min on 2 cores
    python benchmarks/ablations_refshapes.py --steps 60 --seeds 0 --eval-size 50   # a quick look

Every variant trains the same small InternVL-shaped model from scratch with the same budget, data and seeds; only
the SELFIE switch under study changes:

* feature path (Tab. 5 / 6): baseline = low-resolution LLM features only (`use_hq_features=False`,
  `residual_mode="none"`), + F_V1^HQ (`use_hq_features=True`), + RFR (`residual_mode="rfr"`), + RFA
  (`residual_mode="rfa"`, the released model);
* attention (Tab. 7, with RFA): causal, image_bidirectional, image_to_seg (released), image_to_text, bidirectional.

It prints a markdown table (mean and standard deviation over seeds) of cIoU, gIoU and Boundary IoU on held-out
RefShapes expressions, and writes it with the raw per-seed numbers to `--output` (JSON).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from modeling_selfie import SelfieConfig, SelfieForSegmentation, SelfieImageProcessor, SelfieProcessor
from modeling_selfie.data.refshapes import RefShapesDataset, curriculum_dataset, parse_kind_weights, vocabulary
from modeling_selfie.evaluation import ReferringMetrics, boundary_iou
from modeling_selfie.io_utils import atomic_output_file
from modeling_selfie.presets import variance_preserving_init_
from modeling_selfie.processing_selfie import ANSWERS, LONG_QUESTIONS, SHORT_QUESTIONS, VALIDATION_QUESTIONS
from modeling_selfie.tokenization import build_word_level_tokenizer
from modeling_selfie.training import SelfieDataCollator

VARIANTS = {
    "baseline (LLM features only)": dict(use_hq_features=False, residual_mode="none"),
    "+ F_V1^HQ": dict(use_hq_features=True, residual_mode="none"),
    "+ RFR": dict(use_hq_features=True, residual_mode="rfr"),
    "+ RFA (released)": dict(use_hq_features=True, residual_mode="rfa"),
    "attention: causal": dict(seg_attention="causal"),
    "attention: + [IMG]->[IMG]": dict(seg_attention="image_bidirectional"),
    "attention: + [IMG]->[SEG] (released)": dict(seg_attention="image_to_seg"),
    "attention: + [IMG]->[TEXT]": dict(seg_attention="image_to_text"),
    "attention: bidirectional": dict(seg_attention="bidirectional"),
}
TILE = 112


def build(seed: int, switches: dict) -> tuple[SelfieForSegmentation, SelfieProcessor]:
    words = " ".join((*SHORT_QUESTIONS, *LONG_QUESTIONS, *ANSWERS, *VALIDATION_QUESTIONS.values()))
    for mark in (".", ",", "?", "{text}"):
        words = words.replace(mark, " ")
    tokenizer = build_word_level_tokenizer([*words.split(), *vocabulary()])
    processor = SelfieProcessor(
        image_processor=SelfieImageProcessor(size={"height": TILE, "width": TILE}, max_patches=1),
        tokenizer=tokenizer, image_seq_length=(TILE // 28) ** 2, system_message="", prompt_style="internvl",
    )
    config = SelfieConfig(
        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                           image_size=[TILE, TILE], patch_size=[14, 14], attention_bias=True, use_mean_pooling=True),
        text_config=dict(model_type="qwen2", hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=384, vocab_size=len(tokenizer),
                         max_position_embeddings=512, tie_word_embeddings=False),
        image_token_id=processor.image_token_id, seg_token_id=processor.seg_token_id,
        image_seq_length=processor.image_seq_length, seg_hidden_size=32, bce_loss_weight=0.5, dice_loss_weight=2.0,
        **switches,
    )
    torch.manual_seed(seed)
    model = SelfieForSegmentation(config)
    variance_preserving_init_(model)
    return model, processor


def train(model, processor, seed: int, steps: int, batch_size: int, learning_rate: float, warmup_fraction: float,
          warmup_kinds: dict) -> None:
    """A plain AdamW loop with linear warmup and cosine decay (the Trainer adds nothing needed here), over
    `curriculum_dataset` in order."""
    data = curriculum_dataset(steps * batch_size, warmup_fraction, warmup_kinds, seed=seed)
    collate = SelfieDataCollator(processor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item()),
    )
    model.train()
    for step in range(steps):
        batch = collate([data[step * batch_size + i] for i in range(batch_size)])
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()


@torch.inference_mode()
def evaluate(model, processor, seed: int, size: int) -> dict:
    model.eval()
    data = RefShapesDataset("validation", size=size, seed=seed)
    metrics, boundaries = ReferringMetrics(), []
    for start in range(0, size, 32):
        samples = [data[i] for i in range(start, min(start + 32, size))]
        for kind in ("phrase", "instruction"):
            chosen = [s for s in samples if s["query_kind"] == kind]
            if not chosen:
                continue
            masks = model.segment(processor, [s["image"] for s in chosen], [s["query"] for s in chosen], kind)
            for sample, mask in zip(chosen, masks):
                target = torch.from_numpy(sample["masks"][0].astype(bool))
                metrics.update(mask, target)
                boundaries.append(boundary_iou(mask, target))
    result = metrics.compute()
    return {"cIoU": result["cIoU"], "gIoU": result["gIoU"], "boundary_IoU": statistics.mean(boundaries)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--warmup-fraction", type=float, default=0.0, help="share of colour/form-only samples first")
    parser.add_argument("--warmup-kinds", type=parse_kind_weights, default="colour_shape=2,multi_target=1")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-size", type=int, default=150)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--output", type=Path, default=Path("ablations_refshapes.json"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    raw, done = {}, {}  # done: results by effective config, so the released model is trained once per seed
    for name in args.variants:
        raw[name] = []
        for seed in args.seeds:
            began = time.monotonic()
            model, processor = build(seed, VARIANTS[name])
            key = (seed, json.dumps({k: getattr(model.config, k) for k in ("use_hq_features", "residual_mode",
                                                                             "seg_attention")}))
            if key not in done:
                train(model, processor, seed, args.steps, args.batch_size, args.learning_rate, args.warmup_fraction,
                      args.warmup_kinds)
                done[key] = evaluate(model, processor, seed, args.eval_size)
            raw[name].append(done[key])
            print(f"{name} seed {seed}: {raw[name][-1]} ({time.monotonic() - began:.0f} s)", flush=True)

    lines = ["| variant | cIoU | gIoU | Boundary IoU |", "|---|---|---|---|"]
    for name, runs in raw.items():
        cells = []
        for metric in ("cIoU", "gIoU", "boundary_IoU"):
            values = [100 * run[metric] for run in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {spread:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    with atomic_output_file(args.output) as staging:
        staging.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "output"},
                                       "runs": raw, "table": table}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
