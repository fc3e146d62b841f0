"""The tiny model learns a small referring task from scratch on CPU: the mask loss falls and held-out IoU beats the
trivial answer (the union of all objects) by a wide margin. Run with `pytest -s` to see the figures."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainingArguments

from modeling_selfie.presets import tiny_model_and_processor
from modeling_selfie.processing_selfie import segmentation_answer, segmentation_question
from modeling_selfie.training import SelfieDataCollator, SelfieTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red": (230, 40, 40), "green": (40, 210, 40), "blue": (40, 40, 230), "yellow": (230, 220, 40)}
SIDE, CELL = 56, 14  # one 56 px tile; objects sit on the 14 px ViT patch grid


class TwoSquares(torch.utils.data.Dataset):
    """Grey images with two squares of different colours (1 or 2 cells wide); the query names one colour.

    Each sample also carries `objects`: the union of both squares, the trivial baseline's answer.
    """

    def __init__(self, size: int, seed: int, side: int = SIDE, cell: int = CELL):
        self.size, self.seed, self.side, self.cell = size, seed, side, cell

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng((self.seed, index))
        pixels = np.full((self.side, self.side, 3), 128, np.uint8)
        colours = rng.choice(list(COLOURS), size=2, replace=False)
        taken = np.zeros((self.side // self.cell, self.side // self.cell), bool)
        masks = []
        for colour in colours:
            while True:  # place the square on free cells
                cells = int(rng.integers(1, 3))
                row, col = rng.integers(0, self.side // self.cell - cells + 1, 2)
                if not taken[row : row + cells, col : col + cells].any():
                    break
            taken[row : row + cells, col : col + cells] = True
            mask = np.zeros((self.side, self.side), np.uint8)
            mask[row * self.cell : (row + cells) * self.cell, col * self.cell : (col + cells) * self.cell] = 1
            pixels[mask.astype(bool)] = COLOURS[colour]
            masks.append(mask)
        target = int(rng.integers(0, 2))
        return {
            "image": Image.fromarray(pixels),
            "conversation": [
                {"role": "user", "content": segmentation_question(f"{colours[target]} square")},
                {"role": "assistant", "content": segmentation_answer()},
            ],
            "masks": masks[target][None],
            "objects": np.maximum(masks[0], masks[1]),
            "task": "referring",
            "source": "two_squares",
        }


def iou(prediction: np.ndarray, target: np.ndarray) -> float:
    union = np.logical_or(prediction, target).sum()
    return float(np.logical_and(prediction, target).sum() / union) if union else 1.0


def held_out_iou(model, processor, dataset) -> tuple[float, float]:
    """Mean IoU of the model's masks and of the union-of-objects baseline over `dataset`."""
    collator = SelfieDataCollator(processor)
    model.eval()
    scores, baseline = [], []
    with torch.no_grad():
        for start in range(0, len(dataset), 16):
            samples = [dataset[i] for i in range(start, min(start + 16, len(dataset)))]
            pred_masks = model(**collator(samples)).pred_masks
            masks = processor.post_process_masks(pred_masks, [(SIDE, SIDE)] * len(samples))
            for sample, mask in zip(samples, masks, strict=True):
                scores.append(iou(mask[0].numpy(), sample["masks"][0]))
                baseline.append(iou(sample["objects"], sample["masks"][0]))
    return float(np.mean(scores)), float(np.mean(baseline))


def test_tiny_model_learns_referring_squares(tmp_path):
    model, processor = tiny_model_and_processor((*COLOURS, "square"), seed=0)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=700,  # at 400 steps held-out IoU ranged 0.68-0.91 over init seeds; at 700, 0.91-0.95
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        warmup_steps=20,
        lr_scheduler_type="cosine",
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=True,
        seed=0,
    )
    trainer = SelfieTrainer(
        model=model.train(), args=args, train_dataset=TwoSquares(8192, seed=1), processing_class=processor
    )
    trainer.train()

    logs = [log for log in trainer.state.log_history if "loss" in log]
    mask_loss = [log["mask_bce_loss"] + log["mask_dice_loss"] for log in logs]
    model_iou, baseline_iou = held_out_iou(model, processor, TwoSquares(128, seed=2))
    print(
        f"\nmask loss (BCE + DICE, first / last {args.logging_steps} steps): {mask_loss[0]:.3f} -> "
        f"{mask_loss[-1]:.3f}; BCE {logs[0]['mask_bce_loss']:.3f} -> {logs[-1]['mask_bce_loss']:.3f}, "
        f"DICE {logs[0]['mask_dice_loss']:.3f} -> {logs[-1]['mask_dice_loss']:.3f}\n"
        f"held-out IoU over 128 queries: model {model_iou:.3f}, union-of-objects baseline {baseline_iou:.3f}"
    )
    assert mask_loss[-1] < 0.5 * mask_loss[0]
    assert model_iou > baseline_iou + 0.2
