"""Where colour + shape answers go when the named colour is on another shape too: the model's own `[SEG]` vectors
against two probes fitted on the same pixel features.

    python examples/probe_seg_vector.py --model runs/refshapes-v11c
    python examples/probe_seg_vector.py --json probe.json     # the shipped model, the numbers kept as JSON

The mask is the dot product of the pixel features F'_IMG `[H, W, C]` and the `[SEG]` vector `[C]` over sqrt(C) (paper
Eq. 1). On `--size` RefShapes test colour + shape expressions (every background family, tiny shapes) the script
reads each scene's pixel features once, then scores three kinds of vector on them at the mask grid:

* `model`: the model's own `[SEG]` vectors;
* `colour + form`: one fitted vector per colour plus one per form (and one shared), on the first half of the
  expressions, scored on the second half: the best a `[SEG]` vector can do that names the colour and the form the
  same way in every scene. Where it still covers the other shape of the named colour, form is not in the pixel
  features in a way any phrase can point at;
* `per expression`: a free vector fitted to each expression's own target, starting from the model's. It may use
  anything in the features, the target's position included, so it bounds what the features hold, not what a phrase
  can reach.

For each: cIoU on the expressions whose named colour is on another shape as well (`shared`: colour alone cannot be
right) and on the others (`own`), and the share of the other same-colour shape's cells the mask covers (`other
shape covered`). The fits minimise the training mask loss (BCE + DICE) with Adam, the model frozen.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from modeling_selfie import SelfieForSegmentation, SelfieProcessor
from modeling_selfie.cli import default_model_dir
from modeling_selfie.data.refshapes import BACKGROUND_FAMILIES, COLOURS, EXPRESSION_KINDS, FORMS, RefShapesDataset
from modeling_selfie.io_utils import atomic_output_file

SEED = 11  # not the held-out, validation or curve seeds


def colour_shape_expressions(size: int, seed: int = SEED) -> RefShapesDataset:
    """RefShapes test colour + shape expressions on every background family, with tiny shapes."""
    kinds = {kind: float(kind == "colour_shape") for kind in EXPRESSION_KINDS}
    return RefShapesDataset("test", size=size, seed=seed, kind_weights=kinds, backgrounds=BACKGROUND_FAMILIES,
                            tiny_shapes=True)  # fmt: skip


def cell_shares(mask, size: tuple[int, int]) -> torch.Tensor:
    """float `[h, w]`: the share of each mask cell that a bool `[H, W]` pixel mask covers."""
    pixels = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    return torch.nn.functional.interpolate(pixels, size=size, mode="area")[0, 0]


@torch.no_grad()
def read_scenes(model, processor, dataset) -> list[dict]:
    """Per expression: the pixel features `pixels` `[H, W, C]` and `[SEG]` vector `seg` `[C]` the model computes,
    the target's and the other same-colour shapes' cell shares (`target`, `other` `[H, W]`), whether the named
    colour is `shared`, and the target's `colour` and `form`."""
    read = {}

    def keep(module, args, output):
        read["pixels" if output.dim() == 4 else "seg"] = output.detach().float()

    hook = model.seg_head.proj_out.register_forward_hook(keep)
    items = []
    try:
        for index in range(len(dataset)):
            example = dataset.example(index)
            scene, expression = example.scene, example.expression
            model.segment(processor, [scene.image], [expression.text])
            pixels, seg = read["pixels"][0].clone(), read["seg"][0].clone()  # outside inference mode: fit on them
            grid = tuple(pixels.shape[:2])
            target = scene.shapes[expression.targets[0]]
            others = [i for i, shape in enumerate(scene.shapes) if shape.colour == target.colour and i not in
                      expression.targets]  # fmt: skip
            other = cell_shares(scene.masks[others].any(0), grid) if others else torch.zeros(grid)
            items.append({"pixels": pixels, "seg": seg, "target": cell_shares(example.target_mask(), grid),
                          "other": other, "shared": bool(others), "colour": target.colour, "form": target.form})
    finally:
        hook.remove()
    return items


def mask_logits(pixels: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """Eq. 1: `[H, W, C]` . `[C]` / sqrt(C) -> `[H, W]`."""
    return pixels @ vector / math.sqrt(pixels.shape[-1])


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + DICE of `[H, W]` logits against cell shares."""
    probs = logits.sigmoid()
    dice = 1 - (2 * (probs * target).sum() + 1) / (probs.sum() + target.sum() + 1)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + dice


def fit_per_expression(item: dict, steps: int, learning_rate: float = 0.05) -> torch.Tensor:
    """A free vector fitted to the item's own target, from the model's `[SEG]` vector: `[H, W]` logits."""
    vector = item["seg"].clone().requires_grad_(True)
    optimizer = torch.optim.Adam([vector], lr=learning_rate)
    for _ in range(steps):
        optimizer.zero_grad()
        mask_loss(mask_logits(item["pixels"], vector), item["target"]).backward()
        optimizer.step()
    return mask_logits(item["pixels"], vector.detach())


def fit_colour_form(items: list[dict], epochs: int, learning_rate: float = 0.05):
    """One vector per colour, one per form and one shared, summed per item and fitted on `items` one at a time;
    returns the function item -> `[H, W]` logits."""
    width = items[0]["pixels"].shape[-1]
    colours, forms = sorted(COLOURS), list(FORMS)
    parts = [torch.zeros(len(colours), width), torch.zeros(len(forms), width), torch.zeros(width)]
    for part in parts:
        part.requires_grad_(True)

    def vector(item):
        return parts[0][colours.index(item["colour"])] + parts[1][forms.index(item["form"])] + parts[2]

    optimizer = torch.optim.Adam(parts, lr=learning_rate)
    for _ in range(epochs):
        for item in items:
            optimizer.zero_grad()
            mask_loss(mask_logits(item["pixels"], vector(item)), item["target"]).backward()
            optimizer.step()
    return lambda item: mask_logits(item["pixels"], vector(item).detach())


def score(items: list[dict], logits: list[torch.Tensor]) -> dict:
    """cIoU of the masks (logit > 0; a cell counts where the target covers half of it) on the `shared` and `own`
    items, and the share of the other same-colour shapes' cells (those they cover half of) that the masks cover."""
    totals = {"shared": [0.0, 0.0], "own": [0.0, 0.0]}
    covered = [0.0, 0.0]
    for item, item_logits in zip(items, logits):
        mask, target, other = item_logits > 0, item["target"] >= 0.5, item["other"] >= 0.5
        group = totals["shared" if item["shared"] else "own"]
        group[0] += float((mask & target).sum())
        group[1] += float((mask | target).sum())
        covered[0] += float((mask & other).sum())
        covered[1] += float(other.sum())
    result = {
        f"{name}_count": sum(item["shared"] == (name == "shared") for item in items) for name in totals
    }
    for name, (intersection, union) in totals.items():
        result[f"{name}_cIoU"] = intersection / union if union else None
    result["other_shape_covered"] = covered[0] / covered[1] if covered[1] else None
    return result


def probe(model, processor, size: int, fit_steps: int, epochs: int, seed: int = SEED) -> dict:
    """The three kinds of vector, scored on the second half of `size` expressions (each fitted on what it may)."""
    items = read_scenes(model, processor, colour_shape_expressions(size, seed))
    fitting, scored = items[: size // 2], items[size // 2 :]
    colour_form = fit_colour_form(fitting, epochs)
    with torch.no_grad():
        model_logits = [mask_logits(item["pixels"], item["seg"]) for item in scored]
        colour_form_logits = [colour_form(item) for item in scored]
    per_expression = [fit_per_expression(item, fit_steps) for item in scored]
    return {
        "expressions_scored": len(scored),
        "model": score(scored, model_logits),
        "colour + form": score(scored, colour_form_logits),
        "per expression": score(scored, per_expression),
    }


def markdown(results: dict) -> str:
    """The results as a table, one row per kind of vector."""
    first = results["model"]
    lines = [
        f"| vector | cIoU, shared colour ({first['shared_count']}) | cIoU, own colour ({first['own_count']}) "
        "| other shape covered |",
        "|---|---|---|---|",
    ]
    for name in ("model", "colour + form", "per expression"):
        row = results[name]
        cells = [f"{row[key]:.3f}" if row[key] is not None else "-" for key in
                 ("shared_cIoU", "own_cIoU", "other_shape_covered")]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=default_model_dir(), help="model folder (default: shipped)")
    parser.add_argument("--processor", type=Path, default=None, help="processor folder (default: --model)")
    parser.add_argument("--size", type=int, default=300, help="colour + shape expressions (half fit, half scored)")
    parser.add_argument("--fit-steps", type=int, default=150, help="Adam steps of each per-expression vector")
    parser.add_argument("--epochs", type=int, default=40, help="passes of the colour + form fit")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.size < 2:
        parser.error(f"--size must be at least 2 (half fit, half scored), got {args.size}")
    for name in ("fit_steps", "epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SelfieForSegmentation.from_pretrained(args.model).eval()
    processor = SelfieProcessor.from_pretrained(args.processor or args.model)
    results = probe(model, processor, args.size, args.fit_steps, args.epochs)
    print(markdown(results))
    if args.json:
        with atomic_output_file(args.json) as staging:
            staging.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
