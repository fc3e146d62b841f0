"""Fit the IoU head of a SELFIE shapes model (its mask-quality score) and measure how well it tells right masks
from wrong ones.

    python examples/fit_iou_head.py                 # fit the shipped model's head, write it, measure
    python examples/fit_iou_head.py --no-fit        # measure the model as it is

The head (`SelfieConfig.iou_head`) calibrates the mask's own quality `q` (`modeling_selfie.mask_quality`: SAM's
stability score x the mean probability of the mask's cells x the share of the mask in its largest connected part):
`sigmoid(w * log(q) + b)` is the mask's predicted IoU. `w` and `b` are fitted with the model frozen, as a logistic
regression with soft targets (binary cross entropy against each mask's IoU), on the first
expressions of `--fit-size` RefShapes validation scenes with every background family and tiny shapes (no-target
expressions left out: their masks are the presence score's business). Fitting writes the head into `--model` (one
atomic folder swap).

The measurement uses the held-out scenes of `examples/score_heldout.py` (another renderer; present targets only) and
prints the AUROC of the predicted IoU, of the presence score and of the mask's most confident pixel for
(IoU >= 0.5) against (IoU < 0.5).
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from modeling_selfie import SelfieForSegmentation, SelfieProcessor
from modeling_selfie.data.refshapes import RefShapesDataset
from modeling_selfie.modeling_selfie import log_mask_quality
from modeling_selfie.processing_selfie import image_size_of, post_process_masks

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the scripts beside this one
from fit_presence_head import auroc, fit_logistic, head_fit_parser, write_model  # noqa: E402
from score_heldout import build_items  # noqa: E402

FIT_SEED = 23


@torch.inference_mode()
def run_queries(model, processor, images, queries, targets, query_kind: str, batch_size: int = 16) -> dict:
    """Forward every (image, query); returns per query the mask's `iou` with its target, the `presence`,
    `max_pixel` and (with an IoU head) `iou_logit` logits, and the head's input `features` `[N, 1]` (log quality)."""
    rows = {"iou": [], "presence": [], "max_pixel": [], "iou_logit": [], "features": []}
    for start in range(0, len(images), batch_size):
        batch = slice(start, start + batch_size)
        inputs = processor(images=images[batch], queries=queries[batch], query_kind=query_kind)
        out = model(**inputs, logits_to_keep=1)
        sizes = [image_size_of(image) for image in images[batch]]
        masks = post_process_masks(out.pred_masks, sizes, presence_logits=out.presence_logits)
        for k, target in enumerate(targets[batch]):
            mask = masks[k][0].numpy()
            union = (mask | target).sum()
            rows["iou"].append(float((mask & target).sum() / union) if union else 1.0)
            rows["presence"].append(float(out.presence_logits[k][0]))
            rows["max_pixel"].append(float(out.pred_masks[k][0].amax()))
            rows["iou_logit"].append(float(out.iou_logits[k][0]))
            rows["features"].append(log_mask_quality(out.pred_masks[k][:1])[0].numpy())
    return {name: np.array(values) for name, values in rows.items()}


def fit_set(size: int, seed: int) -> dict:
    """The first expressions of `size` RefShapes validation scenes (any background, tiny shapes), no-target ones
    left out, grouped by query kind: `{query_kind: (images, queries, targets)}`."""
    dataset = RefShapesDataset("validation", size=size, seed=seed, backgrounds="all", tiny_shapes=True)
    groups = {"phrase": ([], [], []), "instruction": ([], [], [])}
    for index in range(size):
        sample = dataset[index]
        if sample["expression_kind"] == "no_target":
            continue
        images, queries, targets = groups[sample["query_kind"]]
        images.append(sample["image"])
        queries.append(sample["query"])
        targets.append(sample["masks"][0].astype(bool))
    return groups


def measure(model, processor, seed: int = 0) -> dict:
    """AUROC of each score for (IoU >= 0.5) against (IoU < 0.5) on `score_heldout`'s scenes."""
    items = build_items(seed, 192, 32)
    targets = [item.masks[list(item.targets)].any(0) for item in items]
    scores = run_queries(model, processor, [i.image for i in items], [i.text for i in items], targets, "phrase")
    right = scores["iou"] >= 0.5
    report = {"count": len(items), "right": int(right.sum())}
    for name in ("iou_logit", "presence", "max_pixel"):
        report[f"auroc_{name}"] = auroc(scores[name][right], scores[name][~right])
    return report


def main(argv=None):
    parser = head_fit_parser(__doc__, FIT_SEED)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    processor = SelfieProcessor.from_pretrained(args.model)
    model = SelfieForSegmentation.from_pretrained(args.model, iou_head=True).eval()
    if not args.no_fit:
        features, labels = [], []
        for query_kind, (images, queries, targets) in fit_set(args.fit_size, args.fit_seed).items():
            if images:
                scores = run_queries(model, processor, images, queries, targets, query_kind)
                features.append(scores["features"])
                labels.append(scores["iou"])
        weight, bias = fit_logistic(np.concatenate(features), np.concatenate(labels), keep=None)
        with torch.no_grad():
            model.seg_head.iou.weight.copy_(weight)
            model.seg_head.iou.bias.copy_(bias)
        write_model(model, processor, args.model)
        print(f"fitted the IoU head on {sum(len(f) for f in features)} validation queries; wrote {args.model}",
              file=sys.stderr)
    report = measure(model, processor)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
