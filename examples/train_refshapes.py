"""Train the small SELFIE model shipped with the package, from scratch, on RefShapes, on a CPU.

    python examples/train_refshapes.py --threads 1 --output outputs/models/demo   # checkpoints: outputs/train_refshapes
    python examples/train_refshapes.py --threads 1 --output outputs/models/demo --resume   # continue it later

Continue the shipped model's training on one GPU in an 8-minute lease (6 minutes of steps, then scoring and
writing; the same command plus `--resume` continues it in the next lease):

    python examples/train_refshapes.py --device cuda --init-from modeling_selfie/pretrained/selfie-refshapes \
        --minutes 6 --max-steps 6000 --batch-size 32 --learning-rate 2e-4 --warmup-steps 50 --warmup-fraction 0 \
        --max-tiles 6 --backgrounds all --tiny-shapes \
        --train-kinds colour_shape=3,position=2,size=1.5,relation=1.5,multi_target=1,no_target=1,reasoning=1 \
        --data-workers 12 --curve-every 250 --run-dir outputs/train_refshapes_gpu --output outputs/models/refshapes-gpu

The model is InternVL-shaped but small (a 4-layer ViT on 112 px tiles, a 4-layer Qwen2 LLM, up to `--max-tiles`
tiles per image, 2 by default, so that shapes span more ViT patches), with a word-level tokenizer over the
RefShapes vocabulary and the paper's prompt templates. `--patch-size` and `--downsample-ratio` set the mask grid:
RFA unshuffles each ViT patch into `1 / downsample_ratio` cells a side, so 14 px patches with a 1/4 pixel shuffle
give 32x32 mask cells per tile (and 2x2 LLM tokens per tile) at the cost of 14 px patches with InternVL's 1/2 (16x16
cells). `--init-from` a model with a coarser shuffle re-lays its weights for the finer one (`regrid_state`), so a
stage can give the LLM more tokens per tile without starting from scratch.

Training uses `SelfieTrainer` with the SELFIE loss (text CE + BCE + DICE + auxiliary low-resolution term); the
learning-rate schedule spans `--max-steps`. `--minutes` is the time budget of one invocation: when it runs out, a
checkpoint is saved in `--run-dir` (with the run's settings and the training time so far), and `--resume` continues
from there in a later invocation, exactly as if never stopped. `--curve-every N` scores the model on the first
`--curve-size` test expressions every N steps and appends the result to `RUN_DIR/curve.jsonl` (cIoU against training
minutes, and the direction check: how alike the answers to "leftmost X" and "rightmost X" are). The first
`--warmup-fraction` of the samples hold only the expressions that name colours and forms (`--warmup-kinds`): trained
from scratch on the whole mix, the model stays on a plateau where it segments every shape and ignores the phrase; on
these it learns to read the phrase first. Each training image is asked up to `--max-turns` expressions, one `[SEG]`
turn each (as SELF1E's RefCOCO samples hold several sentences of an image). `--form-loss-weight` adds a training-only
term (`FormLossTrainer`): a linear classifier, dropped before the model is saved, reads the form of the shape under
each mask cell from the features the `[SEG]` vector is dotted with; `--other-shape-weight` adds a training-only BCE
on the pixels of the shapes an expression does not name, averaged over those pixels alone (hard negatives: a shape of
the named colour but another form); `--vision-learning-rate` gives the vision tower its own learning rate
(`examples/train_vision_forms.py` trains the tower alone on the same form labels).

Afterwards it measures cIoU / gIoU per expression kind on the RefShapes test split next to the colour-match baseline
(every shape of the named colour) and the ceiling of the model's mask grid, and the rate of empty masks on no-target
expressions, and writes the model, processor and a model card with those numbers to `--output` (atomically: a
failed run never replaces a good model).
"""

import argparse
import json
import math
import random
import re
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from modeling_selfie import SelfieConfig, SelfieForSegmentation, SelfieImageProcessor, SelfieProcessor
from modeling_selfie.data.refshapes import (
    ALL_DIRECTIONS,
    BACKGROUND_FAMILIES,
    COLOURS,
    DEFAULT_KIND_WEIGHTS,
    EXPRESSION_KINDS,
    FORMS,
    RefShapesDataset,
    check_backgrounds,
    check_directions,
    curriculum_dataset,
    opposite_expression,
    parse_kind_weights,
    split_words,
    vocabulary,
)
from modeling_selfie.evaluation import ReferringMetrics
from modeling_selfie.io_utils import atomic_output_dir, atomic_output_file
from modeling_selfie.presets import variance_preserving_init_
from modeling_selfie.processing_selfie import (
    ANSWERS,
    LONG_QUESTIONS,
    SHORT_QUESTIONS,
    VALIDATION_QUESTIONS,
    post_process_masks,
    select_tile_grid,
)
from modeling_selfie.tokenization import build_word_level_tokenizer
from modeling_selfie.training import SelfieDataCollator, SelfieTrainer, SelfieTrainingArguments
from modeling_selfie.training_defaults import VISION_LEARNING_RATE_HELP

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "modeling_selfie" / "pretrained" / "selfie-refshapes"
DEFAULT_RUN_DIR = ROOT / "outputs" / "train_refshapes"  # checkpoints and the learning curve (git-ignored)
TILE = 112  # default tile side in pixels (`--tile-size`)
TEST_SEED = 0  # the test split every run is scored on, whatever its --seed


def prompt_words() -> list[str]:
    text = " ".join((*SHORT_QUESTIONS, *LONG_QUESTIONS, *ANSWERS, *VALIDATION_QUESTIONS.values()))
    for mark in (".", ",", "?", "{text}"):
        text = text.replace(mark, " ")
    return text.split()


def build_model_and_processor(
    seed: int,
    patch_size: int = 14,
    downsample_ratio: float = 0.5,
    vision_layers: int = 4,
    llm_layers: int = 4,
    vision_width: int = 128,
    llm_width: int = 256,
    max_tiles: int = 2,
    bce_loss_weight: float = 0.5,
    dice_loss_weight: float = 2.0,
    tile_size: int = TILE,
) -> tuple[SelfieForSegmentation, SelfieProcessor]:
    """The demo model, randomly initialised, and its processor. A tile has `tile_size // patch_size` ViT patches a
    side; the pixel shuffle gives the LLM `downsample_ratio` of that per side, and RFA unshuffles each ViT patch into
    `1 / downsample_ratio` cells a side, so the mask grid has `tile_size // patch_size / downsample_ratio` cells a side.
    The ViT has heads of width 32 and an MLP 4x its width; the LLM 4 heads (2 key-value heads) and an MLP 3x. An image
    is resized to at most `max_tiles` tiles (plus a thumbnail when it takes more than one)."""
    tokenizer = build_word_level_tokenizer([*prompt_words(), *vocabulary()])
    image_processor = SelfieImageProcessor(size={"height": tile_size, "width": tile_size}, max_patches=max_tiles)
    processor = SelfieProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        image_seq_length=round(tile_size // patch_size * downsample_ratio) ** 2, system_message="",
        prompt_style="internvl",
        query_normalization="words",  # RefShapes expressions are lower-case words (questions: "Which ...?")
    )
    config = SelfieConfig(
        vision_config=dict(
            hidden_size=vision_width, num_hidden_layers=vision_layers, num_attention_heads=vision_width // 32,
            intermediate_size=4 * vision_width,
            image_size=[tile_size, tile_size], patch_size=[patch_size, patch_size], attention_bias=True,
            use_mean_pooling=True,
        ),
        text_config=dict(
            model_type="qwen2", hidden_size=llm_width, num_hidden_layers=llm_layers, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=3 * llm_width, vocab_size=len(tokenizer),
            max_position_embeddings=1024,
            tie_word_embeddings=False,
        ),
        downsample_ratio=downsample_ratio,
        image_token_id=processor.image_token_id,
        seg_token_id=processor.seg_token_id,
        unk_token_id=tokenizer.unk_token_id,  # a query with a word outside the vocabulary scores low presence
        image_seq_length=processor.image_seq_length,
        seg_hidden_size=64,
        bce_loss_weight=bce_loss_weight,  # from scratch, DICE-heavy weights learn small targets faster than 2 / 0.5
        dice_loss_weight=dice_loss_weight,
    )
    torch.manual_seed(seed)
    model = SelfieForSegmentation(config)
    variance_preserving_init_(model)  # from scratch, N(0, 0.02^2) weights leave the masks stuck at "background"
    return model, processor


class TimeBudget(TrainerCallback):
    """Stop training (and save a checkpoint to resume from) once `minutes` of this invocation have passed."""

    def __init__(self, minutes: float):
        self.deadline = time.monotonic() + 60 * minutes

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() > self.deadline and state.global_step < state.max_steps:
            control.should_training_stop = True
            control.should_save = True


class SaveEvery(TrainerCallback):
    """Save a checkpoint whenever `minutes` have passed since the last one, so that a run stopped at any time
    (killed, or its machine taken back) loses at most that much training."""

    def __init__(self, minutes: float):
        self.interval = 60 * minutes
        self.last = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() - self.last > self.interval:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        self.last = time.monotonic()


class TrainingClock(TrainerCallback):
    """Seconds spent in training steps, summed over every invocation of a resumed run: each checkpoint gets a
    `clock.json` with the sum so far, from which `main` restarts the clock."""

    FILE = "clock.json"

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds
        self._mark = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._mark = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.monotonic() - self._mark

    @classmethod
    def saved_seconds(cls, checkpoint: str) -> float:
        return json.loads((Path(checkpoint) / cls.FILE).read_text())["seconds"]

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        (checkpoint / self.FILE).write_text(json.dumps({"seconds": self.seconds}) + "\n")


class LearningCurve(TrainerCallback):
    """Every `every` steps (and at the last step), score the model on `dataset` and append
    `{"step", "minutes", "overall", kind: cIoU..., "position_opposite_iou", "relation_opposite_iou", ...}` (the
    direction check, `opposite_answer_iou`) to the JSON-lines file `path`; entries of steps at or after the
    current one (left by an interrupted run that was resumed from an earlier checkpoint) are dropped."""

    def __init__(self, path: Path, every: int, dataset, processor, clock: TrainingClock):
        self.path, self.every, self.dataset, self.processor, self.clock = path, every, dataset, processor, clock
        self.pairs = opposite_pairs(dataset)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every and state.global_step != state.max_steps:
            return
        results = evaluate_by_kind(model, self.processor, self.dataset)
        direction = opposite_answer_iou(model, self.processor, self.pairs)
        model.train()
        entry = {"step": state.global_step, "minutes": round(self.clock.seconds / 60, 4)}
        entry.update({key: round(value["cIoU"], 4) for key, value in results.items() if isinstance(value, dict)})
        entry.update({f"{kind}_opposite_iou": round(value, 4) for kind, value in direction.items()})
        entry["no_target_empty_rate"] = round(results["no_target_empty_rate"], 4)
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        kept = [line for line in lines if json.loads(line)["step"] < state.global_step]
        with atomic_output_file(self.path) as staging:
            staging.write_text("".join(line + "\n" for line in [*kept, json.dumps(entry)]))
        print(f"curve: {json.dumps(entry)}", flush=True)


class FormCollator(SelfieDataCollator):
    """`SelfieDataCollator` that also passes on each sample's `form_map` (`Scene.form_map`) as `form_maps`, a list of
    `[H, W]` tensors, for `FormLossTrainer`."""

    def __call__(self, samples):
        return {**super().__call__(samples), "form_maps": [torch.from_numpy(s["form_map"]) for s in samples]}


def cell_forms(form_map: torch.Tensor, size: tuple[int, int], cover: float = 0.6) -> torch.Tensor:
    """long `[h, w]`: the form index (`FORMS`) of the shape that covers at least `cover` of each mask cell, else
    -100 (background, edges, several shapes) - from a `Scene.form_map` `[H, W]` (0 background, 1 + form index)."""
    one_hot = torch.nn.functional.one_hot(form_map.long(), 1 + len(FORMS)).permute(2, 0, 1)[None].float()
    shares = torch.nn.functional.interpolate(one_hot, size=size, mode="area")[0, 1:]
    best, form = shares.max(0)
    return torch.where(best >= cover, form, -100)


class FormLossTrainer(SelfieTrainer):
    """`SelfieTrainer` with two training-only terms that read each scene's form map (`Scene.form_map`):

    * the form loss: a linear classifier (`model.form_classifier`, added by `add_form_classifier` and removed before
      the model is saved) reads the form of the shape under each mask cell from the pixel features F'_IMG that the
      `[SEG]` vector is dotted with. Those features carried colour but not form (`docs/demo-model.md`), so where two
      shapes share the named colour no `[SEG]` vector separated them; this term asks them to carry form.
      `form_loss_weight` x the cross-entropy over the cells inside one shape; the logs get `form_loss` and
      `form_accuracy`.
    * the other-shape loss: `other_shape_weight` x the mean BCE (towards 0) of the mask logits over the pixels of
      the shapes the expression does not name. The mask's own BCE averages over every pixel, where a same-colour
      shape covered by mistake is a few percent of them; this term weighs those hard negatives as much as the rest
      of the mask. The logs get `other_shape_loss`.

    Every sample must hold one image with `[SEG]` (as RefShapes')."""

    def __init__(self, *args, form_loss_weight: float = 0.0, other_shape_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.form_loss_weight = form_loss_weight
        self.other_shape_weight = other_shape_weight
        self._form_totals = torch.zeros(3)  # loss x cells, right cells, cells since the last log
        self._other_totals = torch.zeros(2)  # summed other-shape loss, masks since the last log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        form_maps = inputs.pop("form_maps")
        features = []  # F'_IMG `[n, H, W, C]` per tile grid, as `predict_masks` computes them
        hook = self.accelerator.unwrap_model(model).seg_head.proj_out.register_forward_hook(
            lambda module, args, output: features.append(output) if output.dim() == 4 else None
        )
        try:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        finally:
            hook.remove()
        if self.form_loss_weight:
            loss = loss + self.form_loss_weight * self.form_loss(model, features, form_maps, inputs["tile_grid"])
        if self.other_shape_weight:
            loss = loss + self.other_shape_weight * self.other_shape_loss(
                outputs.pred_masks, inputs["mask_labels"], form_maps
            )
        return (loss, outputs) if return_outputs else loss

    def other_shape_loss(self, pred_masks: list, mask_labels: list, form_maps: list) -> torch.Tensor:
        """Mean over masks of the BCE towards 0 of the logits `[n, H, W]` on the pixels of shapes outside the
        mask's label `[n, h, w]` (any shape of the form map `[h, w]`), each logit cell weighed by the share of it
        such pixels cover; masks with no other shape do not count."""
        losses = []
        for logits, labels, form_map in zip(pred_masks, mask_labels, form_maps):
            others = ((form_map > 0)[None] & (labels == 0)).to(logits.device, logits.dtype)
            shares = torch.nn.functional.interpolate(others[None], size=tuple(logits.shape[-2:]), mode="area")[0]
            total = shares.flatten(1).sum(1)
            kept = total > 0
            bce = (shares * torch.nn.functional.softplus(logits)).flatten(1).sum(1)
            losses += list(bce[kept] / total[kept])
        if not losses:
            return sum(logits.sum() * 0 for logits in pred_masks)
        loss = torch.stack(losses).mean()
        self._other_totals += torch.tensor([loss.item() * len(losses), len(losses)])
        return loss

    def form_loss(self, model, features: list, form_maps: list, tile_grid: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of `model.form_classifier` over the cells inside one shape; `features` come in
        `predict_masks`' order (tile grids sorted, images in batch order within each)."""
        grids = [tuple(grid) for grid in tile_grid.tolist()]
        if len(grids) != len(form_maps) or len(features) != len(set(grids)):
            raise ValueError(f"FormLossTrainer needs one image with [SEG] per sample; got {len(form_maps)} samples, "
                             f"{len(grids)} images and pixel features for {len(features)} tile grids.")
        classifier = self.accelerator.unwrap_model(model).form_classifier
        logits, labels = [], []
        for grid, pixels in zip(sorted(set(grids)), features):
            maps = [form_map for form_map, image_grid in zip(form_maps, grids) if image_grid == grid]
            labels.append(torch.stack([cell_forms(m, tuple(pixels.shape[1:3])) for m in maps]).flatten())
            logits.append(classifier(pixels.float()).flatten(0, 2))
        logits, labels = torch.cat(logits), torch.cat(labels).to(logits[0].device)
        kept = labels != -100
        if not kept.any():
            return logits.sum() * 0
        loss = torch.nn.functional.cross_entropy(logits[kept], labels[kept])
        cells = int(kept.sum())
        right = int((logits[kept].argmax(-1) == labels[kept]).sum())
        self._form_totals += torch.tensor([loss.item() * cells, right, cells])
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # every process logs at the same steps: the totals are summed over them
            totals = self.accelerator.reduce(self._form_totals.to(self.accelerator.device), reduction="sum")
            self._form_totals.zero_()
            loss, right, cells = totals.tolist()
            if cells:
                logs = {**logs, "form_loss": loss / cells, "form_accuracy": right / cells}
            other, masks = self.accelerator.reduce(self._other_totals.to(self.accelerator.device), "sum").tolist()
            self._other_totals.zero_()
            if masks:
                logs = {**logs, "other_shape_loss": other / masks}
        super().log(logs, start_time)


def add_form_classifier(model) -> None:
    """Give `model` the linear `form_classifier` (seg_hidden_size -> len(FORMS)) that `FormLossTrainer` trains."""
    model.form_classifier = torch.nn.Linear(model.config.seg_hidden_size, len(FORMS))


def results_by_kind(metrics: dict) -> dict:
    """The computed metrics of "overall" and then of each expression kind present, in `EXPRESSION_KINDS` order."""
    return {key: metrics[key].compute() for key in ["overall", *[k for k in EXPRESSION_KINDS if k in metrics]]}


def named_colour_present(dataset, index: int) -> bool:
    """Whether the scene of item `index` holds a shape of the colour its expression names."""
    example = dataset.example(index)
    colour = colour_named(example.expression.text)
    return any(shape.colour == colour for shape in example.scene.shapes)


def colour_named(text: str) -> str | None:
    """The first colour word of an expression, or `None`."""
    return next((word for word in split_words(text) if word in COLOURS), None)


@torch.inference_mode()
def evaluate_by_kind(model, processor, dataset, batch_size: int = 32) -> dict:
    """cIoU / gIoU overall and per expression kind; the rate of empty masks on no-target expressions, overall and
    on those whose named colour is in the scene (where colour alone cannot tell that nothing is meant)."""
    model.eval()
    metrics = defaultdict(ReferringMetrics)
    empty = defaultdict(list)  # "all" / "colour_present" -> [answered empty?]
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = [s["image"] for s in samples]
        queries = [s["query"] for s in samples]
        kinds = [s["query_kind"] for s in samples]
        predictions = []
        for kind in ("phrase", "instruction"):
            index = [i for i, k in enumerate(kinds) if k == kind]
            if index:
                masks = model.segment(processor, [images[i] for i in index], [queries[i] for i in index], kind)
                predictions += list(zip(index, masks))
        for i, mask in sorted(predictions, key=lambda item: item[0]):
            mask = mask.cpu()
            target = torch.from_numpy(samples[i]["masks"][0].astype(bool))
            for key in ("overall", samples[i]["expression_kind"]):
                metrics[key].update(mask, target)
            if samples[i]["expression_kind"] == "no_target":
                empty["all"].append(not mask.any())
                if named_colour_present(dataset, start + i):
                    empty["colour_present"].append(not mask.any())
    results = results_by_kind(metrics)
    results["no_target_empty_rate"] = float(np.mean(empty["all"])) if empty["all"] else 0.0
    results["no_target_colour_present_empty_rate"] = (
        float(np.mean(empty["colour_present"])) if empty["colour_present"] else 0.0
    )
    results["no_target_colour_present_count"] = len(empty["colour_present"])
    return results


@torch.inference_mode()
def opposite_pairs(dataset) -> dict[str, list]:
    """`{kind: [(image, expression, opposite expression), ...]}` for each position and relation expression of
    `dataset` whose scene also holds the opposite one ("rightmost red circle" for "leftmost red circle",
    `opposite_expression`)."""
    pairs = defaultdict(list)
    for i in range(len(dataset)):
        example = dataset.example(i)
        if example.expression.kind in ("position", "relation"):
            opposite = opposite_expression(example.scene, example.expression, dataset.directions)
            if opposite is not None:
                pairs[example.expression.kind].append((example.scene.image, example.expression, opposite))
    return dict(pairs)


def opposite_answer_iou(model, processor, pairs: dict[str, list], batch_size: int = 32) -> dict[str, float]:
    """The direction check: the IoU of the model's masks for each of `opposite_pairs`' two expressions, averaged
    per kind. 1.0 means the model does not read the direction word; answers that both hit their targets score 0."""
    model.eval()
    results = {}
    for kind, items in pairs.items():
        ious = []
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            images = [image for image, _, _ in batch]
            first = model.segment(processor, images, [e.text for _, e, _ in batch], "phrase")
            second = model.segment(processor, images, [o.text for _, _, o in batch], "phrase")
            ious += [float((a & b).sum() / max(1, (a | b).sum())) for a, b in zip(first, second)]
        results[kind] = float(np.mean(ious))
    return results


def colour_match_baseline(dataset) -> dict:
    """cIoU / gIoU overall and per kind of the colour-match baseline, scored as `evaluate_by_kind` scores the
    model: the union of every shape of the colour the expression names (its first colour word), or of every shape
    when it names none. What reading the colour word alone achieves."""
    metrics = defaultdict(ReferringMetrics)
    for i in range(len(dataset)):
        example = dataset.example(i)
        colour = colour_named(example.expression.text)
        chosen = [k for k, shape in enumerate(example.scene.shapes) if colour in (None, shape.colour)]
        guess = torch.from_numpy(example.scene.masks[chosen].any(0))
        target = torch.from_numpy(example.target_mask().astype(bool))
        for key in ("overall", example.expression.kind):
            metrics[key].update(guess, target)
    return results_by_kind(metrics)


@torch.inference_mode()
def mask_grid_ceiling(model, processor, dataset) -> dict:
    """cIoU / gIoU overall and per kind of the best masks the model's output grid can carry: each target averaged
    over the grid cells (the model's tiles, 4x the LLM token grid each) and brought back to the image size as the
    model's logits are (bilinear, probability 0.5). Shows how much of the gap to 1.0 is resolution alone."""
    image_processor = processor.image_processor
    tile = image_processor.size["height"]
    inputs = processor(images=[np.zeros((tile, tile, 3), np.uint8)], queries=["shape"]).to(model.device)
    probe = model(**inputs, logits_to_keep=1)
    cells = probe.pred_masks[0].shape[-1]  # mask cells per tile side
    metrics = defaultdict(ReferringMetrics)
    for i in range(len(dataset)):
        sample = dataset[i]
        target = torch.from_numpy(sample["masks"][:1].astype(np.float32))
        height, width = target.shape[-2:]
        rows, cols = select_tile_grid(width, height, tile, image_processor.min_patches, image_processor.max_patches)
        grid = torch.nn.functional.interpolate(target[None], size=(rows * cells, cols * cells), mode="area")[0]
        best = post_process_masks([grid - 0.5], [(height, width)])[0][0]
        for key in ("overall", sample["expression_kind"]):
            metrics[key].update(best, target[0].bool())
    return results_by_kind(metrics)


def format_kind_weights(weights: dict) -> str:
    """The inverse of `parse_kind_weights`: `"colour_shape=2,multi_target=1"`."""
    return ",".join(f"{kind}={weight:g}" for kind, weight in weights.items() if weight)


def command_line(args) -> str:
    """The command that repeats this run's training (the run settings, no paths)."""
    warmup_kinds, train_kinds = format_kind_weights(args.warmup_kinds), format_kind_weights(args.train_kinds)
    return (
        f"python examples/train_refshapes.py --max-steps {args.max_steps} --batch-size {args.batch_size} "
        f"--seed {args.seed} --learning-rate {args.learning_rate} --warmup-steps {args.warmup_steps} "
        + (f"--vision-learning-rate {args.vision_learning_rate:g} " if args.vision_learning_rate else "")
        + f"--warmup-kinds {warmup_kinds} --warmup-fraction {args.warmup_fraction} --train-kinds {train_kinds} "
        f"--max-turns {args.max_turns} --patch-size {args.patch_size} --downsample-ratio {args.downsample_ratio:g} "
        f"--vision-layers {args.vision_layers} --llm-layers {args.llm_layers} --vision-width {args.vision_width} "
        f"--llm-width {args.llm_width} "
        + (f"--tile-size {args.tile_size} " if args.tile_size != TILE else "")
        + (f"--sincos-positions {args.sincos_positions:g} " if args.sincos_positions else "")
        + (f"--max-tiles {args.max_tiles} " if args.max_tiles != 2 else "")
        + (f"--bce-loss-weight {args.bce_loss_weight:g} --dice-loss-weight {args.dice_loss_weight:g} "
           if (args.bce_loss_weight, args.dice_loss_weight) != (0.5, 2.0) else "")
        + (f"--backgrounds {','.join(args.backgrounds)} " if args.backgrounds != ("pale",) else "")
        + ("--tiny-shapes " if args.tiny_shapes else "")
        + (f"--directions {','.join(args.directions)} " if args.directions != ALL_DIRECTIONS else "")
        + ("--opposite-pairs " if args.opposite_pairs else "")
        + (f"--form-loss-weight {args.form_loss_weight:g} " if args.form_loss_weight else "")
        + (f"--other-shape-weight {args.other_shape_weight:g} " if args.other_shape_weight else "")
        + ("--device cuda" if args.device == "cuda" else f"--threads {args.threads}")
        + (" --init-from MODEL_OF_THE_STAGE_BEFORE" if args.init_from else "")
    )


def model_card(
    results: dict, baseline: dict, ceiling: dict, args, stages: list[dict], direction: dict[str, float]
) -> str:
    """The model card; `stages` are the training runs that made the model, each `{"command", "steps", "minutes"}`,
    each after the first starting from the weights of the one before (`--init-from`); `direction` is the direction
    check (`opposite_answer_iou`) per kind."""
    steps, minutes = sum(stage["steps"] for stage in stages), sum(stage["minutes"] for stage in stages)
    commands = "\n".join(stage["command"] for stage in stages)
    staged = (
        f" in {len(stages)} stages of {' + '.join(str(stage['steps']) for stage in stages)} steps, each starting from "
        "the weights of the one before (with a fresh optimizer and schedule)"
        if len(stages) > 1 else ""
    )
    rows = [
        "| expressions | count | cIoU | gIoU | colour-match baseline cIoU | grid ceiling cIoU / gIoU |",
        "|---|---|---|---|---|---|",
    ]
    for key, values in results.items():
        if isinstance(values, dict):
            best = ceiling[key]
            rows.append(
                f"| {key} | {values['count']} | {values['cIoU']:.3f} | {values['gIoU']:.3f} "
                f"| {baseline[key]['cIoU']:.3f} | {best['cIoU']:.3f} / {best['gIoU']:.3f} |"
            )
    cells = args.tile_size // args.patch_size * round(1 / args.downsample_ratio)
    checks = ", ".join(f"{kind} {value:.3f}" for kind, value in direction.items())
    direction_line = (
        f"\n\nDirection words: the IoU of the answers to an expression and to its opposite direction on the same scene"
        f" (1.0: the word is not read): {checks}." if checks else ""
    )
    scenes = f" ({', '.join(args.backgrounds)} backgrounds{'; shapes down to about one ViT patch' * args.tiny_shapes})"
    tokens = round(args.tile_size // args.patch_size * args.downsample_ratio) ** 2
    tiles = f"{args.max_tiles} tile{'s' * (args.max_tiles != 1)}"
    form_loss = (
        f" The last stage added {args.form_loss_weight:g} x a training-only form loss (`--form-loss-weight`): a linear"
        " classifier, dropped before saving, read the form of the shape under each mask cell from the features the"
        " `[SEG]` vector is dotted with." if args.form_loss_weight else ""
    ) + (
        f" The last stage added {args.other_shape_weight:g} x a training-only BCE on the pixels of the shapes an"
        " expression does not name, averaged over those pixels alone (`--other-shape-weight`)."
        if args.other_shape_weight else ""
    )
    return f"""---
library_name: transformers
pipeline_tag: image-segmentation
license: apache-2.0
datasets:
- refshapes
tags:
- selfie
- referring-segmentation
---

# selfie-refshapes

A small SELFIE model (InternVL-shaped: {args.vision_layers}-layer ViT of width {args.vision_width} with
{args.patch_size} px patches on {args.tile_size} px tiles, up to {tiles} per image, {tokens} LLM tokens per tile,
{args.llm_layers}-layer Qwen2 LLM of width {args.llm_width},
{args.param_count / 1e6:.1f} M parameters) trained **from scratch on CPU** on RefShapes{scenes}, the package's synthetic
referring-segmentation set (coloured shapes; expressions by colour and shape, position, size, relation, several
targets, no target, and reasoning-style questions). It is the default model of `selfie-segment` and exists to show
the whole pipeline working out of the box; it knows nothing but shapes.

## How it was made

```
{commands}
```

`SelfieTrainer`, AdamW (warmup, then cosine decay), batch {args.batch_size}, fp32: {steps} steps{staged}, in
{minutes:.1f} minutes of training (the last stage on {args.trained_on}; a resumed run sums
the minutes of every invocation). Training images are generated on the fly, each asked up to {args.max_turns}
expressions, one `[SEG]` turn each (as SELF1E's RefCOCO samples hold several sentences of an image). The pixel
shuffle keeps 1/{round(1 / args.downsample_ratio)} of each ViT side for the LLM, and RFA unshuffles each ViT patch
back into {round(1 / args.downsample_ratio)}x{round(1 / args.downsample_ratio)} mask cells: {cells}x{cells} mask
cells per {args.tile_size} px tile. The SELFIE loss (text CE + {args.bce_loss_weight:g} BCE +
{args.dice_loss_weight:g} DICE, each with the auxiliary low-resolution term; the released model uses 2 BCE + 0.5
DICE; from scratch, DICE-heavy weights learn small targets faster), dual-pathway attention. Curriculum: a run with
`--warmup-fraction F` gives the first F of its images only `--warmup-kinds` expressions, the rest the full
mix.{form_loss}

## Held-out results (RefShapes test split, {results['overall']['count']} expressions, seed {TEST_SEED})

{chr(10).join(rows)}

No-target expressions answered with an empty mask: {100 * results['no_target_empty_rate']:.1f}%; of the
{results['no_target_colour_present_count']} whose named colour is in the scene:
{100 * results['no_target_colour_present_empty_rate']:.1f}%.{direction_line}

cIoU is total intersection over total union; gIoU the mean per-expression IoU (an empty target with an empty
prediction counts 1). The colour-match baseline answers every expression with all shapes of the colour it names
(its first colour word), or all shapes when it names none: what reading the colour word alone achieves. The grid
ceiling is the score of the ground truth itself, averaged over the cells of the model's mask grid and upsampled as
the model's logits are: about the best a model of this resolution can do. Numbers are measured by the training
script right after training.
"""


def learning_curve_section(path: Path, size: int, backgrounds: tuple[str, ...] = ("pale",), tiny: bool = False) -> str:
    """A "## Learning curve" card section with the entries `LearningCurve` wrote to `path` (cIoU per kind on the
    first `size` test expressions, drawn on `backgrounds` (and tiny shapes), against training minutes), or "" when
    there is no such file."""
    if not path.exists():
        return ""
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    kinds = [key for key in ("overall", *EXPRESSION_KINDS) if key != "no_target" and key in entries[0]]
    checks = [key for key in ("position_opposite_iou", "relation_opposite_iou") if any(key in e for e in entries)]
    rows = [
        "| step | minutes | " + " | ".join(kinds) + " | no-target empty |"
        + "".join(f" {key.split('_')[0]} opposite IoU |" for key in checks),
        "|---" * (len(kinds) + 3 + len(checks)) + "|",
    ]
    for entry in entries:
        scores = " | ".join(f"{entry[kind]:.3f}" for kind in kinds)
        empty = 100 * entry["no_target_empty_rate"]
        direction = "".join(f" {entry[key]:.3f} |" if key in entry else " - |" for key in checks)
        rows.append(f"| {entry['step']} | {entry['minutes']:.1f} | {scores} | {empty:.0f}% |{direction}")
    explained = (
        "; the opposite IoU columns are the direction check (the IoU of the answers to an expression and to its"
        " opposite direction on the same scene; 1.0: the direction word is not read)"
    ) * bool(checks)
    return f"""
## Learning curve

cIoU on the first {size} test expressions ({", ".join(backgrounds)} backgrounds{"; tiny shapes too" * tiny}) during
the last stage of training (`--curve-every`), against minutes of training{explained}:

{chr(10).join(rows)}
"""


CARD_SECTIONS = ("How it was made", "Held-out results", "Learning curve")  # the "## " sections the script writes
DROPPED_SECTIONS = ("Held-out shapes on any background",)  # measured on the model before: stale after training


def kept_sections(card: str) -> str:
    """The "## " sections of an existing model card that `model_card` does not write (e.g. a "Chat" paragraph added
    by hand), to carry over when the card is rewritten, less the `DROPPED_SECTIONS` (figures of the model before,
    e.g. `examples/score_heldout.py`'s table: rerun it); "" when there are none."""
    sections = re.split(r"^(?=## )", card, flags=re.MULTILINE)[1:]
    kept = [section for section in sections if not section[3:].startswith(CARD_SECTIONS + DROPPED_SECTIONS)]
    return "".join("\n" + section.strip() + "\n" for section in kept)


def drop_remote_code(folder: Path) -> None:
    """The shipped model lives inside the package, which registers its classes: remove the remote-code copies of
    the module files (and the `auto_map` entries pointing at them) that `save_pretrained` writes."""
    for module in folder.glob("*.py"):  # the model files and the package modules they import (compat.py)
        module.unlink()
    for name in ("config.json", "processor_config.json", "tokenizer_config.json"):
        settings = json.loads((folder / name).read_text())
        settings.pop("auto_map", None)
        settings.get("image_processor", {}).pop("auto_map", None)
        (folder / name).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_model_folder(
    model, processor, output: Path, files: dict[str, str] | None = None, copy_from: Path | None = None,
    copy: tuple[str, ...] = (), overwrite: bool = True,
) -> None:
    """Replace `output` atomically (a failed write leaves it as it was) with the model and processor, less their
    remote-code copies (`drop_remote_code`); then copy the `copy` files that `copy_from` has (e.g. its
    `TOKENIZER_FILES`: a loaded tokenizer would save its loading options too) and write `files` (name -> text)."""
    with atomic_output_dir(output, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        drop_remote_code(staging)
        for name in copy:
            if (copy_from / name).exists():
                shutil.copy(copy_from / name, staging / name)
        for name, text in (files or {}).items():
            (staging / name).write_text(text)


RUN_SETTINGS = (  # what defines a training run: a resumed run keeps the values it was started with
    "max_steps", "batch_size", "learning_rate", "warmup_steps", "warmup_kinds", "warmup_fraction", "max_turns",
    "seed", "patch_size", "downsample_ratio", "vision_layers", "llm_layers", "vision_width", "llm_width", "init_from",
    "train_kinds", "backgrounds", "tiny_shapes", "max_tiles", "bce_loss_weight", "dice_loss_weight", "tile_size",
    "sincos_positions", "directions", "opposite_pairs", "form_loss_weight", "vision_learning_rate",
    "other_shape_weight",
)  # fmt: skip
KIND_SETTINGS = ("warmup_kinds", "train_kinds")  # run settings stored as "KIND=WEIGHT,..." text


def resume_settings(args, parser, run_dir: Path) -> str | None:
    """The checkpoint to resume from (`None` for a fresh run), after taking the run's saved settings into `args`.

    Exits with an error when `--resume` finds no checkpoint, when a fresh run would mix its checkpoints with an
    earlier run's, or when the command line sets a run setting to another value than the run was started with."""
    checkpoint = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    if not args.resume:
        if checkpoint is not None:
            parser.error(f"{run_dir} holds checkpoints of an earlier run: pass --resume or another --run-dir")
        return None
    if checkpoint is None:
        parser.error(f"--resume: no checkpoint in {run_dir}")
    saved = json.loads((run_dir / "run_settings.json").read_text())
    saved.setdefault("backgrounds", "pale")  # runs started before the background families existed
    saved["backgrounds"] = check_backgrounds(saved["backgrounds"])
    saved["directions"] = check_directions(saved.get("directions", "all"))  # "all" for runs before the option
    newer = ("tiny_shapes", "max_tiles", "bce_loss_weight", "dice_loss_weight", "tile_size", "sincos_positions",
             "opposite_pairs", "form_loss_weight", "vision_learning_rate", "other_shape_weight")
    for name in newer:  # settings newer than some runs
        saved.setdefault(name, parser.get_default(name))
    for name in KIND_SETTINGS:
        saved[name] = parse_kind_weights(saved[name])
    saved["init_from"] = Path(saved["init_from"]) if saved["init_from"] else None
    for name in RUN_SETTINGS:
        given, default = getattr(args, name), parser.get_default(name)
        if name in KIND_SETTINGS:  # argparse parses a string default, so `given` is a dict even when not given
            default = parse_kind_weights(default)
        if given != default and given != saved[name]:
            parser.error(f"--resume: --{name.replace('_', '-')} {given} differs from the run's {saved[name]}")
        setattr(args, name, saved[name])
    return checkpoint


def regrid_state(state: dict, old_factor: int, new_factor: int) -> dict:
    """Weights of a model with an `old_factor` pixel shuffle side (4 for `--downsample-ratio 0.25`) re-laid for a
    finer LLM token grid of `new_factor` (2 for 0.5), so that a stage can give the LLM more tokens per tile without
    starting from scratch. Only the weights whose shapes follow the factor change:

    * the projector's layer norm and first linear layer read `new_factor**2` patch features instead of
      `old_factor**2`: the norm's scale and shift are folded into the linear layer, whose blocks become equal, each
      the sum of the old blocks over `new_factor**2`; F_V1^HQ (one patch replicated) is then exactly what it was;
    * the RFR / RFA heads' last layers (`pus_llm`, `pus_vision`) write `new_factor**2` chunks: chunk (i, j) is the
      mean of the old chunks of the cells it covers, so the `[SEG]` vector (the mean of all chunks) is unchanged.
    """
    if old_factor % new_factor:
        raise ValueError(f"a pixel shuffle side of {old_factor} cannot be re-laid as {new_factor}")
    state = dict(state)
    prefix = "model.multi_modal_projector."
    scale, shift = state.pop(prefix + "layer_norm.weight"), state.pop(prefix + "layer_norm.bias")
    weight, bias = state[prefix + "linear_1.weight"], state[prefix + "linear_1.bias"]
    blocks = (weight * scale).unflatten(1, (old_factor**2, -1)).sum(1) / new_factor**2
    state[prefix + "linear_1.bias"] = bias + weight @ shift
    state[prefix + "linear_1.weight"] = blocks.repeat(1, new_factor**2)
    width = blocks.shape[1]
    state[prefix + "layer_norm.weight"] = torch.ones(new_factor**2 * width)
    state[prefix + "layer_norm.bias"] = torch.zeros(new_factor**2 * width)
    step = old_factor // new_factor
    for head in ("seg_head.pus_llm.fc2.", "seg_head.pus_vision.fc2."):
        for name in ("weight", "bias"):
            chunks = state[head + name].unflatten(0, (new_factor, step, new_factor, step, -1))
            state[head + name] = chunks.mean((1, 3)).flatten(0, 2)
    return state


def resize_position_embeddings(state: dict, side: int) -> dict:
    """The ViT's absolute position embeddings (`[1, 1 + g*g, C]`, the class token's first) resized bicubically to a
    `side` x `side` patch grid, for a larger `--tile-size`: each patch keeps the embedding of where it lies in the
    tile."""
    key = "model.vision_tower.embeddings.position_embeddings"
    embeddings = state[key]
    old_side = math.isqrt(embeddings.shape[1] - 1)
    grid = embeddings[:, 1:].reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return {**state, key: torch.cat([embeddings[:, :1], grid.permute(0, 2, 3, 1).reshape(1, side * side, -1)], 1)}


def sincos_position_embeddings_(model, scale: float) -> None:
    """Replace the ViT's absolute position embeddings (not the class token's) by 2D sine-cosine ones (half the
    channels for the row, half for the column; frequencies 1 / 10000**(k / (width / 4))), times `scale`.

    Trained from transformers' initialisation, the demo model's position embeddings stayed about 75x smaller than its
    patch embeddings: its ViT saw a bag of patches, with no say where each lies, so neither a shape's outline across
    patches nor its place in the image reached the mask. `scale` 3 gives them about half the patch embeddings' norm.
    """
    embeddings = model.model.vision_tower.embeddings.position_embeddings  # [1, 1 + g*g, C]
    side, width = math.isqrt(embeddings.shape[1] - 1), embeddings.shape[2]
    frequencies = 1.0 / 10000 ** (torch.arange(width // 4) / (width // 4))
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                                indexing="ij")  # fmt: skip
    angles = [axis.reshape(-1, 1) * frequencies for axis in (rows, cols)]
    table = torch.cat([torch.cat([a.sin(), a.cos()], 1) for a in angles], 1)  # [g*g, C]
    with torch.no_grad():
        embeddings[0, 1:] = scale * table


def init_from(model, folder: Path, parser) -> list[dict]:
    """Load the weights of a model folder written by this script into `model`; returns its training stages. The
    presence and IoU heads are left out: they read the trained model's states, so they are fitted again after
    training (`examples/fit_presence_head.py`). A folder with a coarser pixel shuffle (a smaller
    `downsample_ratio`) is re-laid for the model's (`regrid_state`), and one with smaller tiles has its position
    embeddings resized (`resize_position_embeddings`)."""
    try:
        state = load_file(folder / "model.safetensors")
        old_config, new_config = SelfieConfig.from_pretrained(folder), model.config
        if old_config.unshuffle_factor != new_config.unshuffle_factor:
            state = regrid_state(state, old_config.unshuffle_factor, new_config.unshuffle_factor)
        vision = new_config.vision_config
        if old_config.vision_config.image_size != vision.image_size:
            state = resize_position_embeddings(state, vision.image_size[0] // vision.patch_size[0])
        fitted_after = ("seg_head.presence.", "seg_head.iou.")  # heads that read the trained model's states
        model.load_state_dict({key: value for key, value in state.items() if not key.startswith(fitted_after)})
        stages = json.loads((folder / "eval_results.json").read_text())["training"]
    except (OSError, KeyError, RuntimeError, ValueError) as error:
        parser.error(f"--init-from {folder}: not a model of this script with the same design ({error})".split("\n")[0])
    return stages


def save_settings(args, run_dir: Path) -> None:
    settings = {name: getattr(args, name) for name in RUN_SETTINGS}
    for name in KIND_SETTINGS:
        settings[name] = format_kind_weights(getattr(args, name))
    settings["init_from"] = str(args.init_from) if args.init_from else None
    settings["backgrounds"] = ",".join(args.backgrounds)
    settings["directions"] = ",".join(args.directions)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run_settings.json").write_text(json.dumps(settings, indent=1) + "\n")


def argument_type(check):
    """An argparse `type` of `check`, whose ValueError becomes argparse's one-line error with the same message."""

    def parse(text: str):
        try:
            return check(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad arguments end in one `error:` line and exit code 2."""
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def training_device(name: str, parser) -> str:
    """`--device` checked: "cpu", or "cuda" when torch has a GPU ("auto": the GPU if there is one)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        parser.error(f"--device cuda: no GPU is visible to torch {torch.__version__} ({build})")
    return name


def main(argv=None):
    parser = _Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                        help="checkpoints, run settings and learning curve (keep it out of git)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from the weights of a model this script wrote (same design, or a coarser pixel "
                             "shuffle re-laid for --downsample-ratio), not from scratch")
    parser.add_argument("--max-steps", type=int, default=3400, help="length of the learning-rate schedule")
    parser.add_argument("--minutes", type=float, default=90.0,
                        help="time budget of this invocation's training loop; a checkpoint is saved when it ends")
    parser.add_argument("--save-steps", type=int, default=200, help="checkpoint every N steps")
    parser.add_argument("--save-minutes", type=float, default=None,
                        help="also checkpoint whenever this many minutes passed since the last checkpoint")
    parser.add_argument("--keep-checkpoints", type=int, default=2,
                        help="checkpoints kept in --run-dir (1 for a run state small enough to commit)")
    parser.add_argument("--curve-every", type=int, default=0, help="score --curve-size test items every N steps")
    parser.add_argument("--curve-size", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-4, help="2e-3 keeps the model on the plateau")
    parser.add_argument("--vision-learning-rate", type=float, default=None, help=VISION_LEARNING_RATE_HELP)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to train (default auto: the GPU if there is one)")
    parser.add_argument("--data-workers", type=int, default=1, help="processes drawing training images")
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--warmup-kinds", type=parse_kind_weights, default="colour_shape=2,multi_target=1",
                        help="expression kinds of the first samples, KIND=WEIGHT,...")
    parser.add_argument("--train-kinds", type=parse_kind_weights, default=format_kind_weights(DEFAULT_KIND_WEIGHTS),
                        help="expression kinds after the warm-up, KIND=WEIGHT,...")
    parser.add_argument("--warmup-fraction", type=float, default=0.2, help="share of samples from --warmup-kinds")
    parser.add_argument("--backgrounds", type=argument_type(check_backgrounds), default=("pale",),
                        help=f"background families of the training images: 'all' or some of {BACKGROUND_FAMILIES}")
    parser.add_argument("--directions", type=argument_type(check_directions), default=ALL_DIRECTIONS,
                        help="directions position and relation expressions may name: 'all' or some of "
                             f"{ALL_DIRECTIONS}; 'left,top' (one per axis) is the first stage of a direction "
                             "curriculum, where the loss falls by where shapes lie before the word is read")
    parser.add_argument("--opposite-pairs", action="store_true",
                        help="each position or relation expression is followed in its batch by the opposite one "
                             "on the same scene ('rightmost red shape' after 'leftmost red shape') where there is one")
    parser.add_argument("--form-loss-weight", type=float, default=0.0,
                        help="weight of a training-only loss that asks each mask cell's features for the form of "
                             "the shape under it (FormLossTrainer; 0: off)")
    parser.add_argument("--other-shape-weight", type=float, default=0.0,
                        help="weight of a training-only BCE on the pixels of the shapes an expression does not "
                             "name, averaged over those pixels alone (FormLossTrainer; 0: off)")
    parser.add_argument("--tiny-shapes", action="store_true",
                        help="also draw shapes about one ViT patch across (a third of the shapes)")
    parser.add_argument("--max-turns", type=int, default=6, help="expressions ([SEG] turns) per training image")
    parser.add_argument("--patch-size", type=int, default=14, help="ViT patch side in pixels")
    parser.add_argument("--sincos-positions", type=float, default=0.0,
                        help="start with 2D sine-cosine ViT position embeddings times this scale (3: about half the "
                             "patch embeddings' norm; 0 keeps the initial or --init-from ones)")
    parser.add_argument("--tile-size", type=int, default=TILE,
                        help="tile side in pixels (the ViT's image size); with --max-tiles 1 the whole image is one "
                             "tile, so the LLM's token grid is the image's own layout")
    parser.add_argument("--downsample-ratio", type=float, default=0.25,
                        help="pixel shuffle: the LLM sees this fraction of each ViT grid side")
    parser.add_argument("--max-tiles", type=int, default=2,
                        help="tiles an image is resized to at most (the processor's max_patches): shapes span more "
                             "ViT patches with more tiles")
    parser.add_argument("--bce-loss-weight", type=float, default=0.5, help="weight of the mask BCE term")
    parser.add_argument("--dice-loss-weight", type=float, default=2.0, help="weight of the mask DICE term")
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--vision-width", type=int, default=192, help="ViT width (a multiple of 32)")
    parser.add_argument("--llm-width", type=int, default=128, help="LLM width (a multiple of 4)")
    parser.add_argument("--eval-size", type=int, default=700)
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the training data stream")
    parser.add_argument("--overwrite", action="store_true", default=True)
    args = parser.parse_args(argv)
    if args.tile_size % args.patch_size or (args.tile_size // args.patch_size * args.downsample_ratio) % 1:
        parser.error(f"--patch-size must divide --tile-size {args.tile_size} and --downsample-ratio the patch grid")
    for name in ("form_loss_weight", "other_shape_weight"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be non-negative, got {getattr(args, name)}")
    if args.vision_learning_rate is not None and args.vision_learning_rate < 0:
        parser.error(f"--vision-learning-rate must be non-negative, got {args.vision_learning_rate}")
    if args.opposite_pairs and args.batch_size % 2:
        parser.error(f"--opposite-pairs needs an even --batch-size (each pair is two items of one batch), got "
                     f"{args.batch_size}")
    device = training_device(args.device, parser)
    checkpoint = resume_settings(args, parser, args.run_dir)

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = device
    args.trained_on = torch.cuda.get_device_name(0) if device == "cuda" else f"{torch.get_num_threads()} CPU thread(s)"
    random.seed(args.seed)
    np.random.seed(args.seed)
    model, processor = build_model_and_processor(
        args.seed, args.patch_size, args.downsample_ratio, args.vision_layers, args.llm_layers, args.vision_width,
        args.llm_width, args.max_tiles, args.bce_loss_weight, args.dice_loss_weight, args.tile_size,
    )
    args.param_count = sum(p.numel() for p in model.parameters())
    stages = []
    if args.init_from:
        stages = init_from(model, args.init_from, parser)
    if args.sincos_positions:
        sincos_position_embeddings_(model, args.sincos_positions)
    if args.form_loss_weight:
        add_form_classifier(model)
    train = curriculum_dataset(
        args.max_steps * args.batch_size, args.warmup_fraction, args.warmup_kinds, args.seed, args.max_turns,
        args.train_kinds, args.backgrounds, args.tiny_shapes, args.directions, args.opposite_pairs,
    )
    save_settings(args, args.run_dir)
    training_args = SelfieTrainingArguments(
        output_dir=str(args.run_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        vision_learning_rate=args.vision_learning_rate,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=0.01,
        logging_steps=50,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.keep_checkpoints,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=args.data_workers,
        train_sampling_strategy="sequential",  # the curriculum's order; every item is drawn from its own seed
        seed=args.seed,
        use_cpu=device == "cpu",
    )
    clock = TrainingClock(TrainingClock.saved_seconds(checkpoint) if checkpoint else 0.0)
    callbacks = [TimeBudget(args.minutes), clock]
    if args.save_minutes:
        callbacks.append(SaveEvery(args.save_minutes))
    if args.curve_every:
        curve_set = RefShapesDataset("test", size=args.curve_size, seed=TEST_SEED, backgrounds=args.backgrounds,
                                     tiny_shapes=args.tiny_shapes)
        callbacks.append(LearningCurve(args.run_dir / "curve.jsonl", args.curve_every, curve_set, processor, clock))
    scene_losses = {"form_loss_weight": args.form_loss_weight, "other_shape_weight": args.other_shape_weight}
    trainer_class, collator, extra = (
        (FormLossTrainer, FormCollator(processor), scene_losses)
        if any(scene_losses.values()) else (SelfieTrainer, SelfieDataCollator(processor), {})
    )
    trainer = trainer_class(model=model, args=training_args, train_dataset=train, data_collator=collator,
                            callbacks=callbacks, **extra)  # fmt: skip
    trainer.train(resume_from_checkpoint=checkpoint)
    if args.form_loss_weight:
        del model.form_classifier  # training only: the saved model is a plain SelfieForSegmentation
    minutes, steps = clock.seconds / 60, trainer.state.global_step
    stages.append({"command": command_line(args), "steps": steps, "minutes": round(minutes, 2)})
    if steps < args.max_steps:
        print(f"stopped at step {steps} of {args.max_steps} ({minutes:.1f} min of training so far); continue with "
              f"--resume --run-dir {args.run_dir}. Scoring and writing {args.output} as it is now.")

    test = RefShapesDataset("test", size=args.eval_size, seed=TEST_SEED)
    results = evaluate_by_kind(model.eval(), processor, test)
    direction = opposite_answer_iou(model, processor, opposite_pairs(test))
    baseline = colour_match_baseline(test)
    ceiling = mask_grid_ceiling(model, processor, test)
    evaluation = {**results, "opposite_iou": direction, "colour_match_baseline": baseline, "grid_ceiling": ceiling}
    print(json.dumps(evaluation, indent=1))
    old_card = args.output / "README.md"
    kept = kept_sections(old_card.read_text()) if old_card.exists() else ""
    curve = learning_curve_section(args.run_dir / "curve.jsonl", args.curve_size, args.backgrounds, args.tiny_shapes)
    card = model_card(results, baseline, ceiling, args, stages, direction)
    files = {"README.md": card + curve + kept,
             "eval_results.json": json.dumps({**evaluation, "training": stages}, indent=1) + "\n"}
    write_model_folder(model, processor, args.output, files, overwrite=args.overwrite)
    print(f"wrote {args.output} ({steps} steps, {minutes:.1f} min, overall cIoU {results['overall']['cIoU']:.3f})")


if __name__ == "__main__":
    main()
