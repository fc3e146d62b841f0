"""Evaluation of SELFIE: referring / reasoning segmentation and open-vocabulary semantic segmentation.

* [`ReferringMetrics`]: cIoU, gIoU and, on splits with no-target samples (gRefCOCO), N-acc / T-acc;
* [`SemanticMetrics`]: confusion matrix -> mIoU, per-class IoU, pixel accuracy;
* [`evaluate_referring`], [`evaluate_open_vocab`]: batched inference loops returning the metrics dict;
* [`build_benchmark`]: a benchmark's evaluation samples under a protocol;
* [`run`]: the work of the `python -m modeling_selfie.evaluate` command line, whose arguments `main` (in
  `modeling_selfie.evaluate`) parses and checks without torch.

Both loops share a split between the processes of `torch.distributed` (`torchrun` / `accelerate launch`, see
`modeling_selfie.distributed`): each process runs a contiguous share of the forward passes that one process would
run, and rank 0 puts what they computed together in split order, so the metrics equal one process's to the last
digit under both protocols (the `self1e` float32 meters are summed in one process's order).

The scoring protocols ([`EvaluationProtocol`], `PROTOCOLS`, `--protocol`) and the benchmark names are defined in
`modeling_selfie.protocols` and importable from here; docs/evaluation.md lists the differences between protocols.
"""

import argparse
import json
import math
import pickle
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from . import distributed
from .errors import UsageError
from .io_utils import atomic_output_file
from .loading import load_model_and_processor
from .processing_selfie import image_size_of
from .protocols import (
    CUSTOM_DATASETS,
    DEFAULT_BATCH_SIZE,
    OPEN_VOCAB_DATASETS,
    PROTOCOLS,
    REFERRING_DATASETS,
    EvaluationProtocol,
    evaluation_protocol,
)


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


class _SummableState:
    """Accumulators whose whole state is one 1-D tensor of sums, so they merge by addition."""

    def _state(self) -> torch.Tensor:
        raise NotImplementedError

    def _set_state(self, state: torch.Tensor) -> None:
        raise NotImplementedError

    def merge(self, other: "_SummableState") -> "_SummableState":
        """Add the counts of `other` (same kind, same settings) to this accumulator; returns `self`."""
        self._set_state(self._state() + other._state())
        return self


def _flat_masks(pred, *others) -> list[torch.Tensor]:
    """Masks of one shape, `[H, W]` or `[N, H, W]` (numpy or torch), as bool `[N, H * W]` on `pred`'s device."""
    pred = torch.as_tensor(pred)
    others = [torch.as_tensor(mask) for mask in others]
    if pred.dim() not in (2, 3) or any(mask.shape != pred.shape for mask in others):
        shapes = ", ".join(str(tuple(mask.shape)) for mask in (pred, *others))
        raise ValueError(f"Masks must be [H, W] or [N, H, W], all of one shape; got {shapes}.")
    flat = (-1 if pred.dim() == 3 else 1, pred.shape[-2] * pred.shape[-1])
    return [mask.to(pred.device).reshape(flat).bool() for mask in (pred, *others)]


def _float32_sum(values) -> np.float32:
    """Left-to-right sum in float32, as a float32 tensor accumulates it with `+=`."""
    total = np.float32(0)
    for value in values:
        total = np.float32(total + np.float32(value))
    return total


def authors_batch_sums(intersection: torch.Tensor, union: torch.Tensor, iou: torch.Tensor) -> tuple[float, ...]:
    """What the SELF1E authors' `evaluate` adds to its three float32 meters for one batch (one image's
    expressions): the intersection sum, the union sum and the IoU sum `(sum_i IoU_i / n) * n`, each summed in
    float32 in batch order.

    Args:
        intersection, union: int `[n]` pixel counts of the batch's expressions.
        iou: `[n]` their per-expression IoU (float32 values: I / (U + 1e-5), 1.0 when U = 0).
    """
    n = np.float32(len(iou))
    iou_sum = np.float32(np.float32(_float32_sum(iou.tolist()) / n) * n)
    return float(_float32_sum(intersection.tolist())), float(_float32_sum(union.tolist())), float(iou_sum)


class ReferringMetrics(_SummableState):
    r"""
    Referring / reasoning segmentation metrics over a split, one binary mask per sample.

    Pixels marked in `ignore` (ReasonSeg's "ignore" regions) are left out of both masks.

    * `cIoU`: cumulative IoU, total intersection / total union over the split (`default`: 1.0 if every union is
      empty; `self1e`: the authors' sum I / (sum U + 1e-10), 0.0 then);
    * `gIoU`: mean per-sample IoU (`default`: I / U, 1.0 when target and prediction are both empty; `self1e`: the
      authors' I / (U + 1e-5), 1.0 when U = 0, summed and divided by count + 1e-5, so a split of three
      expressions predicted exactly gives 3 / 3.00001 = 0.9999967);
    * `count`: number of samples;
    * on splits with no-target samples (gRefCOCO) also `N-acc`, the fraction of no-target samples predicted empty,
      and `T-acc`, the fraction of samples with a target predicted non-empty (when there are such samples).

    Under `self1e` ([`EvaluationProtocol.authors_arithmetic`]) the sums are float32 meters updated once per
    [`update`] call, as the authors' meters are once per batch ([`authors_batch_sums`]): call it once per image
    with all its expressions (`[N, H, W]`) to reproduce their rounding; `default` sums in float64 and does not
    depend on how samples are grouped.

    Args:
        protocol: `"default"` or `"self1e"` (or an [`EvaluationProtocol`]).
    """

    _COUNTERS = (
        "intersection", "union", "iou_sum", "count", "no_target_count", "no_target_correct", "target_correct",
    )  # fmt: skip

    def __init__(self, protocol: "str | EvaluationProtocol" = "default"):
        self.protocol = evaluation_protocol(protocol)
        self.reset()

    def reset(self) -> None:
        for name in self._COUNTERS:
            setattr(self, name, 0)
        self.iou_sum = 0.0

    def per_sample(self, pred, target, ignore=None) -> dict[str, torch.Tensor]:
        """`{"intersection", "union", "iou", "target_empty", "pred_empty"}`, one `[N]` tensor each, of bool `[H, W]`
        or `[N, H, W]` masks (ignored pixels left out), IoU as this protocol computes it."""
        if ignore is None:
            pred, target = _flat_masks(pred, target)
        else:
            pred, target, ignore = _flat_masks(pred, target, ignore)
            pred, target = pred & ~ignore, target & ~ignore
        intersection, union = (pred & target).sum(-1), (pred | target).sum(-1)
        if self.protocol.authors_arithmetic:
            iou = (intersection.cpu() / (union.cpu() + 1e-5)).double()
        else:
            iou = intersection.double() / union.clamp(min=1)
        return {
            "intersection": intersection, "union": union, "iou": torch.where(union > 0, iou.to(union.device), 1.0),
            "target_empty": ~target.any(-1), "pred_empty": ~pred.any(-1),
        }  # fmt: skip

    def update(self, pred, target, ignore=None) -> dict[str, torch.Tensor]:
        """Add samples. `pred`, `target` and the optional `ignore`: bool (or 0/1) `[H, W]` masks of one sample, or
        `[N, H, W]` for N samples (under `self1e`: one batch of the authors). Returns [`per_sample`]'s dict."""
        scores = self.per_sample(pred, target, ignore)
        self.add(scores)
        return scores

    def add(self, scores: dict[str, torch.Tensor]) -> None:
        """Add the samples of one [`per_sample`] dict, as [`update`] adds them (under `self1e`: one batch of the
        authors' meters)."""
        intersection, union = scores["intersection"], scores["union"]
        has_target, pred_empty = ~scores["target_empty"], scores["pred_empty"]
        counts = torch.stack(
            [(~has_target).sum(), (~has_target & pred_empty).sum(), (has_target & ~pred_empty).sum()]
        ).tolist()
        self.no_target_count += counts[0]
        self.no_target_correct += counts[1]
        self.target_correct += counts[2]
        self.count += len(intersection)
        if self.protocol.authors_arithmetic:
            sums = authors_batch_sums(intersection, union, scores["iou"])
            self.intersection, self.union, self.iou_sum = (
                float(np.float32(np.float32(total) + np.float32(value)))
                for total, value in zip((self.intersection, self.union, self.iou_sum), sums)
            )
        else:
            self.intersection += int(intersection.sum())
            self.union += int(union.sum())
            self.iou_sum += float(scores["iou"].sum())

    def compute(self) -> dict:
        """`{"cIoU", "gIoU", "count"}` plus `"N-acc"` / `"T-acc"` on splits with no-target samples."""
        if self.count == 0:
            raise ValueError("ReferringMetrics.compute() needs at least one sample: call update() first.")
        if self.protocol.authors_arithmetic:  # float32 numpy, as their meters
            ciou = float(np.float32(self.intersection) / (np.float32(self.union) + np.float32(1e-10)))
            giou = float(np.float32(self.iou_sum) / np.float32(self.count + 1e-5))
        else:
            ciou = self.intersection / self.union if self.union else 1.0
            giou = self.iou_sum / self.count
        metrics = {"cIoU": ciou, "gIoU": giou, "count": self.count}
        if self.no_target_count:
            metrics["N-acc"] = self.no_target_correct / self.no_target_count
            if self.count > self.no_target_count:
                metrics["T-acc"] = self.target_correct / (self.count - self.no_target_count)
        return metrics

    def _state(self) -> torch.Tensor:
        return torch.tensor([getattr(self, name) for name in self._COUNTERS], dtype=torch.float64)

    def _set_state(self, state: torch.Tensor) -> None:
        for name, value in zip(self._COUNTERS, state.tolist()):
            if self.protocol.authors_arithmetic and name in ("intersection", "union", "iou_sum"):
                setattr(self, name, float(np.float32(value)))  # float32 meters, as theirs
            else:
                setattr(self, name, value if name == "iou_sum" else round(value))


def mask_boundary(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Pixels of `mask` ([H, W] bool) within `width` pixels of its contour (the mask minus its erosion)."""
    inverted = (~mask).float()[None, None]
    near_outside = F.max_pool2d(F.pad(inverted, [width] * 4, value=1.0), 2 * width + 1, stride=1)[0, 0] > 0
    return mask & near_outside


def boundary_iou(pred, target, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU (Cheng et al., 2021): IoU of the contour bands of prediction and target, band width
    `dilation_ratio` x image diagonal (at least 1 px). Sensitive to boundary quality where mask IoU is not; 1.0 when
    both masks are empty."""
    pred, target = (torch.as_tensor(np.asarray(m)).bool() for m in (pred, target))
    width = max(1, round(dilation_ratio * math.hypot(*target.shape)))
    pred_band, target_band = mask_boundary(pred, width), mask_boundary(target, width)
    union = (pred_band | target_band).sum().item()
    return 1.0 if union == 0 else (pred_band & target_band).sum().item() / union


class SemanticMetrics(_SummableState):
    r"""
    Semantic segmentation metrics from one `[num_classes, num_classes]` confusion matrix (rows: target class,
    columns: predicted class) accumulated over the labelled pixels (`target != ignore_index`) of the whole split,
    not averaged per image.

    * `mIoU`: mean IoU over the classes present in the target or the prediction of the split, so a class that is
      only predicted counts as 0: detectron2's `SemSegEvaluator` mIoU in its earlier form (sum of the IoUs of
      the classes present in the target / number of classes with a non-empty union), the common
      open-vocabulary evaluator; later detectron2 versions leave classes that are only predicted out instead;
    * `per_class_IoU`: IoU per class (`None` for a class absent from both), keyed by name if `class_names` given;
    * `pixel_accuracy`: correctly classified labelled pixels / labelled pixels (detectron2's pACC);
    * `count`: number of label maps.

    Values are fractions in [0, 1] (detectron2 reports percentages).

    Args:
        num_classes: number of classes; target and prediction values must lie in `[0, num_classes)` (or equal
            `ignore_index` in the target).
        ignore_index: target value of pixels left out.
        class_names: optional names, `num_classes` of them.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None):
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}.")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = tuple(class_names) if class_names is not None else None
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self.count = 0

    def _check_range(self, values: torch.Tensor, name: str) -> None:
        if values.numel() and (values.min() < 0 or values.max() >= self.num_classes):
            bad = values[(values < 0) | (values >= self.num_classes)][0]
            raise ValueError(
                f"{name} holds class {int(bad)}, outside [0, {self.num_classes}) "
                f"(ignore_index={self.ignore_index} applies to the target only)."
            )

    def update(self, pred, target) -> None:
        """Add label maps. `pred`, `target`: integer `[H, W]` (one map) or `[N, H, W]` (numpy or torch)."""
        pred = torch.as_tensor(pred).long()
        target = torch.as_tensor(target).to(pred.device).long()
        if pred.shape != target.shape or pred.dim() not in (2, 3):
            raise ValueError(
                f"pred and target must be [H, W] or [N, H, W] of one shape, got {tuple(pred.shape)} and "
                f"{tuple(target.shape)}."
            )
        labelled = target != self.ignore_index
        target_values, pred_values = target[labelled], pred[labelled]
        self._check_range(target_values, "target")
        self._check_range(pred_values, "pred")
        pairs = torch.bincount(target_values * self.num_classes + pred_values, minlength=self.num_classes**2)
        self.confusion += pairs.view(self.num_classes, self.num_classes).cpu()
        self.count += 1 if pred.dim() == 2 else pred.shape[0]

    def compute(self) -> dict:
        """`{"mIoU", "pixel_accuracy", "per_class_IoU", "count"}`."""
        confusion = self.confusion.double()
        labelled = confusion.sum()
        if labelled == 0:
            raise ValueError("SemanticMetrics.compute() needs labelled pixels: call update() first.")
        intersection = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - intersection
        present = union > 0
        iou = intersection / union.clamp(min=1)
        per_class = [value if seen else None for value, seen in zip(iou.tolist(), present.tolist())]
        return {
            "mIoU": float(iou[present].mean()),
            "pixel_accuracy": float(intersection.sum() / labelled),
            "per_class_IoU": dict(zip(self.class_names, per_class)) if self.class_names else per_class,
            "count": self.count,
        }

    def _state(self) -> torch.Tensor:
        return torch.cat([self.confusion.flatten(), torch.tensor([self.count])])

    def _set_state(self, state: torch.Tensor) -> None:
        self.confusion = state[:-1].view(self.num_classes, self.num_classes).clone()
        self.count = int(state[-1])


# ----------------------------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------------------------


def _identity(batch):
    """`collate_fn` that keeps samples as they are (a list of sample dicts, or one sample)."""
    return batch


def _prepare_model(model, processor, device: str | torch.device | None) -> None:
    """Check that `processor` matches `model`, move `model` to `device` (when given) and put it in eval mode: the
    first step of both evaluation loops."""
    processor.check_model(model.config)
    if device is not None:
        model.to(device)
    model.eval()


def authors_collate(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch as the SELF1E authors' `collate_fn` lays it out: each sequence's tokens right-padded with id 0, and
    `attention_mask = input_ids != 0`, so a token of id 0 inside a prompt ("!" in Qwen2's vocabulary) is masked out
    of attention as padding is (it keeps its position: positions count every token, as theirs do).

    Args:
        input_ids, attention_mask: `[B, L]`, padded on either side.
    Returns:
        `{"input_ids", "attention_mask"}`, `[B, L]`.
    """
    keep = attention_mask.bool()
    lengths = keep.sum(1)
    ids = torch.zeros_like(input_ids)
    ids[torch.arange(input_ids.shape[1], device=ids.device)[None] < lengths[:, None]] = input_ids[keep]
    return {"input_ids": ids, "attention_mask": (ids != 0).to(attention_mask.dtype)}


@torch.inference_mode()
def segment_images(
    model, processor, images: Sequence, binarize: bool = True, zero_id_is_padding: bool = False, **text_inputs
) -> list[torch.Tensor]:
    """One forward pass; the masks of every sample at its image's size.

    Args:
        images: one image per sample.
        binarize: bool masks (logit > 0) or, with `False`, the float logits.
        zero_id_is_padding: lay the batch out as the authors' `collate_fn` ([`authors_collate`]).
        text_inputs: the prompts, as the processor takes them (`queries=` and `query_kind=`, or `conversations=`).
    Returns:
        One `[n_seg, H, W]` tensor per sample, on the model's device.
    """
    inputs = processor(images=list(images), **text_inputs)
    if zero_id_is_padding:
        inputs.update(authors_collate(inputs["input_ids"], inputs["attention_mask"]))
    inputs = inputs.to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    outputs = model(**inputs, logits_to_keep=1)
    sizes = [image_size_of(image) for image in images]
    return processor.post_process_masks(outputs.pred_masks, sizes, binarize=binarize)


def _union_mask(sample: dict, key: str, index: int) -> torch.Tensor:
    """bool `[H, W]` union of the `[n, H, W]` masks `sample[key]` (gRefCOCO targets may be several objects or
    none)."""
    masks = torch.as_tensor(np.asarray(sample[key]))
    masks = masks[None] if masks.dim() == 2 else masks
    size = tuple(image_size_of(sample["image"]))
    if masks.dim() != 3 or tuple(masks.shape[1:]) != size:
        raise ValueError(
            f"Sample {index}: {key} of shape {tuple(masks.shape)} do not match its image of (height, width) {size}."
        )
    return masks.bool().any(0)


def _check_referring_sample(sample: dict, index: int) -> None:
    missing = [key for key in ("image", "masks", "query") if sample.get(key) is None]
    if missing:
        raise ValueError(f"Evaluation sample {index} lacks {missing}: referring evaluation needs image, masks, query.")


def _base_dataset(dataset):
    """`dataset` without the `Subset`s around it (where its attributes, e.g. `ignore_index`, are)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def _sample_image_ids(dataset) -> list:
    """The `image_id` of every sample of `dataset`, through `Subset`s: from the dataset's `image_ids()` (the loaders
    of this project read them without loading a sample), else from the samples themselves (a dataset without that
    method is read once more for them); `("sample", index)` for a sample without one."""
    if isinstance(dataset, Subset):
        image_ids = _sample_image_ids(dataset.dataset)
        return [image_ids[index] for index in dataset.indices]
    if hasattr(dataset, "image_ids"):
        return list(dataset.image_ids())
    return [dataset[index].get("image_id", ("sample", index)) for index in range(len(dataset))]


def referring_batches(dataset, batch_size: int | None) -> list[list[int]]:
    """The forward passes over `dataset` as lists of sample indices: `batch_size` consecutive samples each, or
    (`None`) the consecutive samples that share an `image_id` (a sample without one is a batch of its own)."""
    if batch_size is not None:
        starts = range(0, len(dataset), batch_size)
        return [list(range(start, min(start + batch_size, len(dataset)))) for start in starts]
    batches, previous = [], object()
    for index, image_id in enumerate(_sample_image_ids(dataset)):
        if batches and image_id == previous:
            batches[-1].append(index)
        else:
            batches.append([index])
        previous = image_id
    return batches


def _load_batches(dataset, batches: list[list[int]], num_workers: int):
    """The samples of `batches` (lists of indices into `dataset`), loaded in order: one list of `(index, sample)`
    per batch."""
    indices = [index for batch in batches for index in batch]
    samples = iter(DataLoader(Subset(dataset, indices), batch_size=None, collate_fn=_identity, num_workers=num_workers))
    for batch in batches:
        yield [(index, next(samples)) for index in batch]


def evaluate_referring(
    model,
    processor,
    dataset,
    batch_size: int | None = None,
    device=None,
    progress: bool = True,
    num_workers: int = 0,
    protocol: "str | EvaluationProtocol" = "default",
    records: list | None = None,
) -> dict:
    """Referring / reasoning segmentation of every sample of `dataset`, scored by [`ReferringMetrics`].

    Each sample (a dict with `image`, `masks` `[1, H, W]`, `query` and `query_kind`, `"phrase"` by default) gets
    the paper's validation prompt answered "[SEG]."; its predicted mask (logit > 0 at image size) is compared with
    the union of its `masks`, leaving out the pixels of its `ignore_masks` if it has them (ReasonSeg). Under
    `torch.distributed` every process calls this with the whole `dataset` and runs a contiguous share of the
    forward passes ([`referring_batches`]: under `self1e` whole images); rank 0 adds the per-sample scores of all
    shares to the metrics in split order, as one process adds them, and every process returns the metrics.

    Args:
        model: a [`SelfieForSegmentation`] (put in eval mode, moved to `device` when given).
        processor: its [`SelfieProcessor`].
        dataset: a map-style dataset or a list of sample dicts; [`build_benchmark`] gives a benchmark's samples
            under a protocol (which samples and which targets are the protocol's: this loop scores what it gets).
        batch_size: samples per forward pass; `None` gives the protocol's (8 under `default`; under `self1e` the
            consecutive samples of one `image_id`, and no other size is allowed).
        progress: show a tqdm bar (on rank 0, over its share).
        num_workers: `DataLoader` workers that load samples.
        protocol: `"default"` or `"self1e"`: batches, token layout and metric arithmetic (module docstring).
        records: a list that receives one dict per sample, in order: `index`, `image_id`, `query`,
            `intersection`, `union`, `iou`, `target_empty`, `pred_empty` (under `torch.distributed`: on rank 0,
            the samples of every process).
    Returns:
        [`ReferringMetrics.compute`]'s dict.
    """
    protocol = evaluation_protocol(protocol)
    batch_size = protocol.batch_size(batch_size)
    _prepare_model(model, processor, device)  # a processor that does not match the model is refused first
    if len(dataset) == 0:
        raise ValueError("evaluate_referring got an empty dataset.")
    metrics = ReferringMetrics(protocol)
    batches = distributed.shard(referring_batches(dataset, batch_size))
    updates, shard_records = [], []  # this process's per-sample scores, one dict per metrics update
    bar = tqdm(total=sum(map(len, batches)), desc="referring", unit="sample",
               disable=not progress or not distributed.is_main_process())  # fmt: skip
    with torch.inference_mode(), bar:
        for batch in _load_batches(dataset, batches, num_workers):
            for index, sample in batch:
                _check_referring_sample(sample, index)
            conversations = [
                processor.segmentation_conversation(sample["query"], sample.get("query_kind", "phrase"))
                for _, sample in batch
            ]
            preds = segment_images(
                model, processor, [sample["image"] for _, sample in batch], conversations=conversations,
                zero_id_is_padding=protocol.zero_id_is_padding,
            )  # fmt: skip
            targets = [_union_mask(sample, "masks", index) for index, sample in batch]
            ignores = [
                _union_mask(sample, "ignore_masks", index) if "ignore_masks" in sample else torch.zeros_like(target)
                for (index, sample), target in zip(batch, targets)
            ]
            if len({tuple(target.shape) for target in targets}) == 1:  # one image: one update, as the authors
                batch_updates = [metrics.per_sample(torch.stack([pred[0] for pred in preds]), torch.stack(targets),
                                                    torch.stack(ignores))]  # fmt: skip
            else:
                batch_updates = [
                    metrics.per_sample(pred[0], target, ignore) for pred, target, ignore in zip(preds, targets, ignores)
                ]
            batch_updates = [{key: value.cpu() for key, value in scores.items()} for scores in batch_updates]
            updates += batch_updates
            if records is not None:
                scores = [{key: value[i].item() for key, value in group.items()}
                          for group in batch_updates for i in range(len(group["iou"]))]  # fmt: skip
                for (index, sample), score in zip(batch, scores):
                    shard_records.append({"index": index, "image_id": sample.get("image_id"),
                                          "query": sample["query"], **score})  # fmt: skip
            bar.update(len(batch))
    result = None
    shares = distributed.gather_to_main((updates, shard_records))
    if shares is not None:  # rank 0: every share, in split order
        for share_updates, share_records in shares:
            for scores in share_updates:
                metrics.add(scores)
            if records is not None:
                records += share_records
        result = metrics.compute()
    return distributed.broadcast_from_main(result)


def chunked_argmax(class_scores: Iterable[torch.Tensor]) -> torch.Tensor:
    """Per-pixel argmax over classes whose scores arrive in chunks, without holding them all.

    Args:
        class_scores: `[n_k, H, W]` score maps of consecutive classes (chunk k holds the next `n_k` classes).
    Returns:
        int64 `[H, W]` index of the best class; ties go to the lowest index, as `torch.argmax` over all classes.
    """
    best_score = best_class = None
    offset = 0
    for scores in class_scores:
        score, label = scores.max(0)
        label = label + offset
        if best_score is None:
            best_score, best_class = score, label
        else:
            better = score > best_score
            best_score = torch.where(better, score, best_score)
            best_class = torch.where(better, label, best_class)
        offset += scores.shape[0]
    if best_class is None:
        raise ValueError("chunked_argmax needs at least one chunk of class scores.")
    return best_class


def predict_open_vocab(model, processor, image, class_names: Sequence[str], query_batch_size: int = 8) -> torch.Tensor:
    """Open-vocabulary semantic segmentation of one image (paper Sec. 4.2.4).

    Every class is asked for with one query, "What is {class} in this image? Please output segmentation mask.",
    `query_batch_size` queries per forward pass; each pixel takes the class whose mask logit (upsampled to the
    image size) is highest. There is no "no class" outcome: every pixel is assigned one of `class_names`; pixels the
    benchmark leaves unlabelled are dropped by the metric's `ignore_index` instead.

    Returns:
        int64 `[H, W]` class indices into `class_names`, on the model's device.
    """
    if not class_names:
        raise ValueError("predict_open_vocab needs at least one class name.")
    chunks = (list(class_names[s : s + query_batch_size]) for s in range(0, len(class_names), query_batch_size))
    scores = (
        torch.cat(segment_images(model, processor, [image] * len(chunk), binarize=False, queries=chunk))
        for chunk in chunks
    )
    return chunked_argmax(scores)


def evaluate_open_vocab(
    model,
    processor,
    dataset,
    query_batch_size: int = 8,
    device=None,
    progress: bool = True,
    ignore_index: int | None = None,
    num_workers: int = 0,
) -> dict:
    """Open-vocabulary semantic segmentation of every sample of `dataset` ([`predict_open_vocab`]), scored by
    [`SemanticMetrics`] over the class list of the samples. Under `torch.distributed` every process calls this with
    the whole `dataset` and predicts a contiguous share of its images; rank 0 sums the confusion matrices (exact
    integer counts) and every process returns the metrics.

    Args:
        dataset: yields `{"image", "label" int64 [H, W], "class_names"}` (see `modeling_selfie.data.open_vocab`).
        query_batch_size: class queries per forward pass.
        ignore_index: label value left out; defaults to the `ignore_index` of `dataset` (seen through `Subset`s),
            else 255.
        Others as in [`evaluate_referring`].
    Returns:
        [`SemanticMetrics.compute`]'s dict.
    """
    _prepare_model(model, processor, device)  # a processor that does not match the model is refused first
    if len(dataset) == 0:
        raise ValueError("evaluate_open_vocab got an empty dataset.")
    ignore_index = getattr(_base_dataset(dataset), "ignore_index", 255) if ignore_index is None else ignore_index
    metrics = None
    share = distributed.shard(range(len(dataset)))
    loader = DataLoader(Subset(dataset, share), batch_size=None, collate_fn=_identity, num_workers=num_workers)
    progress = progress and distributed.is_main_process()
    with torch.inference_mode():
        for sample in tqdm(loader, total=len(share), desc="open-vocab", unit="image", disable=not progress):
            class_names = tuple(sample["class_names"])
            if metrics is None:
                metrics = SemanticMetrics(len(class_names), ignore_index=ignore_index, class_names=class_names)
            elif class_names != metrics.class_names:
                raise ValueError("All samples of an open-vocabulary dataset must share one class list.")
            pred = predict_open_vocab(model, processor, sample["image"], class_names, query_batch_size)
            metrics.update(pred, torch.as_tensor(sample["label"]))
    result = None
    shares = distributed.gather_to_main(metrics)
    if shares is not None:  # rank 0: the processes' confusion matrices (none from a process without an image)
        total = None
        for share_metrics in filter(None, shares):
            if total is not None and share_metrics.class_names != total.class_names:
                raise ValueError("All samples of an open-vocabulary dataset must share one class list.")
            total = share_metrics if total is None else total.merge(share_metrics)
        result = total.compute()
    return distributed.broadcast_from_main(result)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"bad --device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for CUDA, which is not available here")
    return device


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def build_benchmark(
    dataset: str,
    split: str = "val",
    data_root: str | Path | None = None,
    protocol: "str | EvaluationProtocol" = "default",
    annotations: str | Path | None = None,
):
    """The evaluation samples of benchmark `dataset` (one of `REFERRING_DATASETS` or `OPEN_VOCAB_DATASETS`) under
    `data_root`, or of your own data (`custom_referring`, `custom_semantic`) in the file `annotations`, as
    `protocol` selects them and builds their targets; see docs/evaluation.md."""
    protocol = evaluation_protocol(protocol)
    if dataset not in REFERRING_DATASETS + OPEN_VOCAB_DATASETS:
        choices = ", ".join(REFERRING_DATASETS + OPEN_VOCAB_DATASETS)
        raise ValueError(f"Unknown benchmark {dataset!r}; choose one of {choices}.")
    if dataset in CUSTOM_DATASETS:
        from .data.custom import CustomReferringDataset, CustomSemanticDataset

        if annotations is None:
            raise ValueError(f"{dataset} reads your own data: give the annotation file.")
        if dataset == "custom_referring":
            return CustomReferringDataset(annotations, train=False)
        return LabelMapBenchmark(CustomSemanticDataset(annotations, train=False))
    if dataset in OPEN_VOCAB_DATASETS:
        from .data.open_vocab import build_open_vocab_dataset

        return build_open_vocab_dataset(dataset, data_root, split)
    from .data.registry import build_dataset

    return build_dataset(dataset, split, data_root, train=False, **protocol.dataset_options(dataset))


class LabelMapBenchmark(torch.utils.data.Dataset):
    """A label-map dataset (`modeling_selfie.data.semantic.LabelMapDataset`, e.g. your own `custom_semantic`) as
    an open-vocabulary benchmark: `{"image", "label", "class_names"}` samples whose label holds the index of each
    pixel's class among the named ones (in label-value order), `ignore_index` (-1) where the value has no name."""

    ignore_index = -1

    def __init__(self, dataset):
        self.dataset = dataset
        values = sorted(dataset.class_names)
        self.class_names = tuple(dataset.class_names[value] for value in values)
        self.lookup = dict(zip(values, range(len(values))))

    def __len__(self) -> int:
        return len(self.dataset.items)

    def __getitem__(self, index: int) -> dict:
        from .data.common import load_image

        image_path, label_path = self.dataset.items[index]
        labels = self.dataset.read_label_map(label_path)
        image = load_image(image_path, self.dataset.check_script)
        if labels.shape != (image.height, image.width):
            size = (image.height, image.width)
            raise ValueError(f"{label_path} has size {labels.shape} but {image_path} has {size}.")
        classes = np.full(labels.shape, self.ignore_index, dtype=np.int64)
        for value, class_index in self.lookup.items():
            classes[labels == value] = class_index
        return {"image": image, "label": classes, "class_names": self.class_names}


def _load_dataset(args: argparse.Namespace):
    """The evaluation dataset named on the command line, cut to `--limit`."""
    where = args.annotations if args.dataset in CUSTOM_DATASETS else f"{args.data_root} ({args.split})"
    try:
        dataset = build_benchmark(args.dataset, args.split, args.data_root, args.protocol, args.annotations)
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as error:
        raise UsageError(f"cannot read {args.dataset} from {where}: {_one_line(error)}") from None
    if args.limit is not None and args.limit < len(dataset):
        dataset = Subset(dataset, range(args.limit))
    return dataset


def _load_model(args: argparse.Namespace, device: torch.device):
    """Model and processor from `--model`, the processor set to `--max-tiles`."""
    model, processor = load_model_and_processor(args.model, device, args.dtype)
    processor.image_processor.max_patches = args.max_tiles
    return model, processor


def _summary(args: argparse.Namespace, metrics: dict, seconds: float) -> str:
    scores = ", ".join(
        f"{name} {value:.4f}" for name, value in metrics.items() if isinstance(value, float)
    )
    details = f"count {metrics['count']}, protocol {args.protocol}, {seconds:.1f} s"
    where = args.annotations if args.dataset in CUSTOM_DATASETS else args.split
    return f"{args.dataset} {where}: {scores} ({details})"


def _process_device(name: str | None) -> torch.device:
    """The device of this process: `--device` (default: cuda if available, else cpu), or under a launcher
    (torchrun, accelerate launch) its local one, once it has joined the launcher's process group."""
    if not distributed.launched():
        return _resolve_device(name)
    try:
        return distributed.join_launched_processes(name)
    except ValueError as error:
        raise UsageError(f"--device: {error}") from None


def run(args: argparse.Namespace) -> int:
    """Evaluate as the checked command-line arguments `args` ask ([`main`]), print a one-line summary, optionally
    write JSON; `UsageError` when the device, the data or the model cannot be used. Under a launcher each process
    evaluates its share and rank 0 alone prints and writes (`modeling_selfie.distributed`)."""
    device = _process_device(args.device)
    try:
        return _evaluate_and_report(args, device)
    finally:
        distributed.leave()


def _evaluate_and_report(args: argparse.Namespace, device: torch.device) -> int:
    dataset = _load_dataset(args)
    model, processor = _load_model(args, device)
    main_process = distributed.is_main_process()

    if args.protocol == "self1e" and int(PIL.__version__.split(".")[0]) >= 13 and main_process:
        print(f"warning: Pillow {PIL.__version__} resizes some images differently from the authors' Pillow 12.1.1: "
              "install pillow>=12.1.1,<13 (setup.py's range) for their tiles", file=sys.stderr)  # fmt: skip
    start = time.perf_counter()
    if args.dataset in OPEN_VOCAB_DATASETS:
        batch_size = DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
        metrics = evaluate_open_vocab(
            model, processor, dataset, query_batch_size=batch_size, num_workers=args.num_workers
        )  # fmt: skip
    else:
        batch_size, records = PROTOCOLS[args.protocol].batch_size(args.batch_size), []
        metrics = evaluate_referring(
            model, processor, dataset, batch_size=batch_size, num_workers=args.num_workers, protocol=args.protocol,
            records=records,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    if not main_process:
        return 0

    print(_summary(args, metrics, seconds))
    if args.output:
        results = {
            "model": str(args.model),
            "dataset": args.dataset,
            "split": Path(args.annotations).name if args.dataset in CUSTOM_DATASETS else args.split,
            "annotations": args.annotations,
            "protocol": args.protocol,
            "batch_size": batch_size,
            "processes": distributed.process_count(),
            "count": metrics["count"],
            "time_s": round(seconds, 3),
            "metrics": metrics,
        }
        if args.dataset in REFERRING_DATASETS:
            results["expressions"] = records
        with atomic_output_file(args.output) as staging:
            staging.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


__all__ = [
    "PROTOCOLS",
    "EvaluationProtocol",
    "ReferringMetrics",
    "LabelMapBenchmark",
    "SemanticMetrics",
    "authors_batch_sums",
    "authors_collate",
    "build_benchmark",
    "chunked_argmax",
    "evaluate_open_vocab",
    "evaluate_referring",
    "evaluation_protocol",
    "predict_open_vocab",
    "referring_batches",
    "run",
    "segment_images",
]
