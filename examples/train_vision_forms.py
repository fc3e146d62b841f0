"""Train the vision tower of a RefShapes SELFIE model to tell each patch's form, and measure how well it does.

    python examples/train_vision_forms.py --init-from runs/refshapes-v9a --output outputs/models/vit-forms \
        --steps 3000 --minutes 40 --threads 1          # train the tower, write the model for the next stage
    python examples/train_vision_forms.py --init-from modeling_selfie/pretrained/selfie-refshapes --frozen \
        --steps 600                                     # the per-patch check alone: how readable form is now

A linear classifier reads the form of each ViT patch (`FORMS`; the label is the visible form covering at least 60%
of the patch, `cell_forms`, and other patches are left out) from the vision tower's last hidden state, on fresh
RefShapes scenes (every background family and tiny shapes by default) shown as one tile. The classifier and the
tower train together (`--frozen`: the classifier alone, which measures the tower as it is). Every `--check-every`
steps and at the end the classifier is scored on `--check-size` test scenes; the figures are printed next to the
share of the commonest form, what always guessing it would score.

With `--output`, the model of `--init-from` is written there with the trained tower (the classifier is dropped;
atomically: a failed run never replaces a good folder), its training stages in `eval_results.json` extended by this
one, for `examples/train_refshapes.py --init-from`. Its LLM and heads still read the old tower's features, so it is
a starting point for a SELFIE stage, not a segmenter to use as it is.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from modeling_selfie import SelfieForSegmentation, SelfieProcessor
from modeling_selfie.data.refshapes import FORMS, RefShapesDataset, check_backgrounds

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the script beside this one
from train_refshapes import TEST_SEED, TOKENIZER_FILES, argument_type, cell_forms, write_model_folder  # noqa: E402


def patch_batch(processor, dataset, indices, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile per scene and its patches' form labels: (`[B, 3, H, W]` pixels, `[B, grid * grid]` labels in
    0..len(FORMS)-1, -100 for patches not inside one shape)."""
    items = [dataset[index] for index in indices]
    pixels = processor.image_processor(images=[item["image"] for item in items], max_patches=1,
                                       return_tensors="pt")["pixel_values"]  # fmt: skip
    labels = [cell_forms(torch.from_numpy(item["form_map"]), (grid, grid)).flatten() for item in items]
    return pixels, torch.stack(labels)


def patch_features(vision_tower, pixels: torch.Tensor) -> torch.Tensor:
    """The tower's last hidden state of each patch, class token left out: `[B, grid * grid, C]`."""
    return vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]


@torch.no_grad()
def patch_form_accuracy(vision_tower, classifier, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of the labelled patches whose form the classifier names."""
    logits = classifier(patch_features(vision_tower, pixels))
    kept = labels != -100
    return (logits[kept].argmax(-1) == labels[kept]).float().mean().item()


def commonest_share(labels: torch.Tensor) -> float:
    """What always naming the commonest form of `labels` scores."""
    kept = labels[labels != -100]
    return torch.bincount(kept).max().item() / len(kept)


def write_stage(model, processor, source: Path, output: Path, stage: dict) -> None:
    """`output` := the model and processor, with `source`'s tokenizer files and training stages plus `stage`."""
    stages = json.loads((source / "eval_results.json").read_text())["training"] + [stage]
    card = (
        "# A RefShapes SELFIE model after per-patch form training of its vision tower\n\n"
        f"Written by `{stage['command']}` from `{source}`. Its LLM and heads still read the tower's features "
        "as they were, so this folder starts a SELFIE stage (`examples/train_refshapes.py --init-from`); it "
        "is not a segmenter to use as it is.\n\n"
        f"Held-out patch form accuracy: {stage['patch_form_accuracy'][-1]['accuracy']:.3f} (always naming the "
        f"commonest form: {stage['commonest_form']:.3f}).\n"
    )
    files = {"eval_results.json": json.dumps({"training": stages}, indent=1) + "\n", "README.md": card}
    write_model_folder(model, processor, output, files, copy_from=source, copy=TOKENIZER_FILES)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init-from", type=Path, required=True, help="a model folder of train_refshapes.py")
    parser.add_argument("--output", type=Path, default=None, help="where to write the model with the trained tower")
    parser.add_argument("--frozen", action="store_true", help="train the classifier alone (the check)")
    parser.add_argument("--steps", type=int, default=3000, help="length of the learning-rate schedule")
    parser.add_argument("--minutes", type=float, default=None, help="stop after this many minutes of training")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--check-every", type=int, default=250)
    parser.add_argument("--check-size", type=int, default=64, help="test scenes the classifier is scored on")
    parser.add_argument("--backgrounds", type=argument_type(check_backgrounds), default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "check_every", "check_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.frozen and args.output:
        parser.error("--frozen trains no tower weights: there is nothing to write to --output")
    if not (args.init_from / "eval_results.json").is_file():
        parser.error(f"--init-from {args.init_from}: not a model folder of train_refshapes.py (no eval_results.json)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = SelfieForSegmentation.from_pretrained(args.init_from)
    processor = SelfieProcessor.from_pretrained(args.init_from)
    tower = model.model.vision_tower.train()
    grid = tower.config.image_size[0] // tower.config.patch_size[0]
    classifier = torch.nn.Linear(tower.config.hidden_size, len(FORMS))
    tower.requires_grad_(not args.frozen)
    trained = [*classifier.parameters(), *([] if args.frozen else tower.parameters())]
    optimizer = torch.optim.AdamW(trained, lr=args.learning_rate, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.steps)
    train = RefShapesDataset("train", size=args.steps * args.batch_size, seed=args.seed + 7,
                             backgrounds=args.backgrounds, tiny_shapes=True)  # fmt: skip
    test = RefShapesDataset("test", size=args.check_size, seed=TEST_SEED, backgrounds=args.backgrounds,
                            tiny_shapes=True)  # fmt: skip
    test_pixels, test_labels = patch_batch(processor, test, range(len(test)), grid)
    commonest = commonest_share(test_labels)
    curve, start, step = [], time.monotonic(), 0

    def check():
        tower.eval()
        curve.append({"step": step, "accuracy": round(patch_form_accuracy(tower, classifier, test_pixels,
                                                                          test_labels), 4)})  # fmt: skip
        tower.train()
        tqdm.write(f"step {step}: held-out patch form accuracy {curve[-1]['accuracy']:.3f} "
                   f"(commonest form {commonest:.3f}), {(time.monotonic() - start) / 60:.1f} min")

    for step in tqdm(range(args.steps), desc="patch forms"):
        if step % args.check_every == 0:
            check()
        if args.minutes is not None and time.monotonic() - start > 60 * args.minutes:
            break
        pixels, labels = patch_batch(processor, train, range(step * args.batch_size, (step + 1) * args.batch_size),
                                     grid)  # fmt: skip
        logits, kept = classifier(patch_features(tower, pixels)), labels != -100
        loss = torch.nn.functional.cross_entropy(logits[kept], labels[kept])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    else:
        step = args.steps
    if curve[-1]["step"] != step:
        check()
    if args.output:
        command = (f"python examples/train_vision_forms.py --steps {args.steps} "
                   f"--learning-rate {args.learning_rate:g} --warmup-steps {args.warmup_steps} "
                   f"--batch-size {args.batch_size} --backgrounds {','.join(args.backgrounds)} --seed {args.seed} "
                   "--init-from MODEL_OF_THE_STAGE_BEFORE")
        stage = {"command": command, "steps": step, "minutes": round((time.monotonic() - start) / 60, 2),
                 "patch_form_accuracy": curve, "commonest_form": round(commonest, 4)}
        write_stage(model, processor, args.init_from, args.output, stage)
        print(f"wrote {args.output} ({step} steps, held-out patch form accuracy {curve[-1]['accuracy']:.3f})")


if __name__ == "__main__":
    main()
