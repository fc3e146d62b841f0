"""The work behind `selfie-segment` (see `selfie_segment.py` for its arguments and `--help`).

    selfie-segment examples/assets/shapes.png "red circle"
    selfie-segment photo.jpg "red circle" "blue star" --json masks.json
    selfie-segment --batch jobs.jsonl --output out/ --json masks.json

Every output file is written atomically (`io_utils.atomic_output_file`), so an interrupted run never leaves a
half-written mask, overlay or JSON file in place of a good one.
"""

import sys

if __name__ == "__main__":  # `python -m modeling_selfie.cli` is `selfie-segment`: arguments checked before torch loads
    from selfie_segment import main

    sys.exit(main())

import json
import os
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from selfie_segment import batch_problem, image_problem, model_problem, names_a_folder, prompt_problem
from tqdm.auto import tqdm

from . import io_utils
from .io_utils import atomic_output_file
from .overlay import render_overlay

DEFAULT_MODEL = "selfie-refshapes"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CLIError(Exception):
    """A user-facing error: printed as one `error:` line, exit code 2."""


@dataclass
class Job:
    """One image + prompt to segment; `line` is its line in a `--batch` file (`None` on the command line)."""

    image: Path
    prompt: str
    line: int | None = None
    name: str | None = None  # the image as the user wrote it


def default_model_dir() -> Path:
    """Folder of the model shipped in the package."""
    return Path(str(resources.files("modeling_selfie").joinpath("pretrained", DEFAULT_MODEL)))


def resolve_device(name: str) -> torch.device:
    """`"auto"`: the accelerator torch sees (CUDA, ...), else the CPU. Any other name must work on this machine."""
    if name == "auto":
        return torch.accelerator.current_accelerator(check_available=True) or torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise CLIError(f"--device {name} is not a device name (try auto, cpu, cuda or cuda:1)") from error
    if device.type == "meta":
        raise CLIError("--device meta holds no data: use auto, cpu or cuda")
    if device.type != "cpu":
        accelerator = torch.accelerator.current_accelerator(check_available=True)
        if accelerator is None or accelerator.type != device.type:
            seen = f"only {accelerator.type} and cpu" if accelerator is not None else "only the cpu"
            raise CLIError(f"--device {name} cannot be used here: torch sees {seen} (try --device auto or cpu)")
        if (device.index or 0) >= torch.accelerator.device_count():
            raise CLIError(f"--device {name} cannot be used here: torch sees {torch.accelerator.device_count()} "
                           f"{device.type} device(s), numbered from 0 (try --device auto)")
    try:
        torch.empty(1, device=device)
    except (AssertionError, RuntimeError, NotImplementedError) as error:
        reason = str(error).strip().split("\n")[0].split(". ")[0][:120] or type(error).__name__
        raise CLIError(f"--device {name} cannot be used here: {reason} (try --device auto or cpu)") from error
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`"auto"`: bfloat16 on a CUDA GPU that supports it, float32 elsewhere; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def load_model(name_or_path: str | None = None, device: str = "cpu", dtype: str = "auto"):
    """(model, processor) from a folder or Hub id (the shipped RefShapes model when `None`), on `device` in `dtype`
    (names as `selfie-segment --device/--dtype` takes them)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from . import register_auto_classes

    register_auto_classes()  # `python -m modeling_selfie.cli` imports the package without registering

    torch_device = resolve_device(device)
    source = str(name_or_path or default_model_dir())
    if name_or_path is None and not (default_model_dir() / "config.json").exists():
        raise CLIError(f"the shipped model is missing from {default_model_dir()}; reinstall modeling-selfie")
    if problem := model_problem(source):
        raise CLIError(problem)
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=resolve_dtype(dtype, torch_device))
        processor = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError, KeyError) as error:
        raise CLIError(f"cannot load the model from {source}: {error}") from error
    return model.to(torch_device).eval(), processor


def read_image(path: str | Path) -> Image.Image:
    """The RGB PIL image as it is shown (`io_utils.read_image`), or a `CLIError` that says why the file cannot be
    used."""
    path = Path(path)
    if problem := image_problem(path):
        raise CLIError(problem)
    try:
        return io_utils.read_image(path)
    except (UnidentifiedImageError, OSError) as error:
        raise CLIError(f"cannot read image {path}: {error}") from error


def clean_prompt(prompt) -> str:
    """The prompt without surrounding whitespace; a `CLIError` when there is nothing left."""
    if problem := prompt_problem(prompt):
        raise CLIError(problem)
    return prompt.strip()


def segment_with_scores(model, processor, images, prompts: list[str], query_kind: str = "phrase"):
    """`model.segment` for one image per prompt (or one image for all) in a single forward pass, with each mask's
    presence score and predicted IoU.

    Returns:
        One `(mask, score, iou_score)` per prompt: bool numpy `[H, W]` at its image's size,
        `sigmoid(presence_logit)` (the mask is empty exactly when it is below 0.5) and the IoU head's predicted IoU
        (`None` for a model without `config.iou_head`).
    """
    masks, scores, ious = model.segment(
        processor, images, prompts, query_kind=query_kind, return_scores=True, return_iou_scores=True
    )
    return [(mask.cpu().numpy(), score, iou) for mask, score, iou in zip(masks, scores, ious)]


def output_prefix(output: str | None, image: Path) -> Path:
    """Where `IMAGE` PROMPT's files go: `--output` as a prefix, or inside it when it names a folder (an existing
    one, or any path ending in a separator); the image's name in this folder without `--output`."""
    if not output:
        return Path(image.stem)
    return Path(output) / image.stem if names_a_folder(output) else Path(output)


def coco_rle(mask: np.ndarray) -> dict:
    """COCO run-length encoding of a bool `[H, W]` mask: `{"size": [H, W], "counts": str}` (pycocotools)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def save_result(
    job: Job, image: Image.Image, mask: np.ndarray, score: float, prefix: Path | None, iou_score: float | None = None
) -> dict:
    """Write `{prefix}_mask.png` and `{prefix}_overlay.png` (nothing when `prefix` is `None`); the JSON record (with
    `iou_score` when the model predicts one)."""
    record = {"image": job.name or str(job.image), "prompt": job.prompt}
    if job.line is not None:
        record["line"] = job.line
    record["presence_score"] = score
    if iou_score is not None:
        record["iou_score"] = iou_score
    record.update(area=int(mask.sum()), segmentation=coco_rle(mask))
    if prefix is not None:
        mask_path, overlay_path = Path(f"{prefix}_mask.png"), Path(f"{prefix}_overlay.png")
        write_file(mask_path, lambda staging: Image.fromarray(mask.astype(np.uint8) * 255).save(staging, format="PNG"))
        write_file(overlay_path, lambda staging: render_overlay(image, mask, job.prompt).save(staging, format="PNG"))
        record.update(mask=str(mask_path), overlay=str(overlay_path))
    return record


def write_file(path: str | Path, save) -> None:
    """`save(staging)` writes the file, which then replaces `path` atomically; an `OSError` (disk full, permission
    denied) becomes a `CLIError`."""
    try:
        with atomic_output_file(path) as staging:
            save(staging)
    except OSError as error:
        raise CLIError(f"cannot write {path}: {error.strerror or error}") from error


def write_json(path: str | Path, records: list[dict]) -> None:
    text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    write_file(path, lambda staging: staging.write_text(text, encoding="utf-8"))


def read_batch_file(path: str | Path) -> tuple[list[Job], list[str]]:
    """The jobs of a JSON Lines file of `{"image", "prompt"}` objects (image paths relative to the file's folder),
    and one message per line that cannot be used (blank lines are skipped)."""
    path = Path(path)
    if problem := batch_problem(path):
        raise CLIError(problem)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise CLIError(f"cannot read batch file {path}: {error}") from error
    jobs, problems = [], []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            item = json.loads(text)
        except json.JSONDecodeError as error:
            problems.append(f"{path} line {number}: not JSON ({error})")
            continue
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) or "prompt" not in item:
            problems.append(f'{path} line {number}: needs an object {{"image": PATH, "prompt": TEXT}}, got {text[:80]}')
            continue
        try:
            prompt = clean_prompt(item["prompt"])
        except CLIError as error:
            problems.append(f"{path} line {number}: {error}")
            continue
        jobs.append(Job(path.parent / item["image"], prompt, number, item["image"]))
    return jobs, problems


def report(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def show_warning(message, category, filename, lineno, file=None, line=None, _show=warnings.showwarning) -> None:
    """`warnings.showwarning` of the CLI: a model's `UnknownWordsWarning` is one `warning:` line on stderr (above
    a progress bar); every other warning is shown as Python shows it."""
    from .processing_selfie import UnknownWordsWarning

    if issubclass(category, UnknownWordsWarning):
        tqdm.write(f"warning: {message}", file=sys.stderr)
    else:
        _show(message, category, filename, lineno, file, line)


def run_single(args) -> int:
    """`selfie-segment IMAGE PROMPT [PROMPT ...]`: all prompts in one forward pass, one mask + overlay each."""
    image_path = Path(args.image)
    jobs = [Job(image_path, clean_prompt(prompt), name=args.image) for prompt in args.prompts]
    image = read_image(image_path)
    model, processor = load_model(args.model, args.device, args.dtype)
    results = segment_with_scores(model, processor, image, [job.prompt for job in jobs], args.kind)
    prefix = output_prefix(args.output, image_path)
    records = []
    for k, (job, (mask, score, iou)) in enumerate(zip(jobs, results), 1):
        if args.no_images:
            job_prefix = None
        else:
            job_prefix = prefix if len(jobs) == 1 else Path(f"{prefix}_{k}")
        record = save_result(job, image, mask, score, job_prefix, iou)
        records.append(record)
        height, width = mask.shape
        written = f" -> {record['mask']}, {record['overlay']}" if "mask" in record else ""
        predicted = "" if iou is None else f", predicted IoU {iou:.2f}"
        print(f"{job.prompt!r}: mask of {record['area']} px ({100 * record['area'] / mask.size:.1f}% of "
              f"{width}x{height}), presence {score:.2f}{predicted}{written}")
    if args.json:
        write_json(args.json, records)
        print(f"wrote {len(records)} masks (COCO RLE) to {args.json}")
    return 0


def run_batch(args) -> int:
    """`selfie-segment --batch FILE`: `--batch-size` lines per forward pass; bad lines are reported, not fatal."""
    jobs, problems = read_batch_file(args.batch)
    for problem in problems:
        report(problem)
    if not jobs:
        raise CLIError(f"{args.batch} holds no usable line")
    model, processor = load_model(args.model, args.device, args.dtype)
    folder = Path(args.output or ".")
    records, failed = [], len(problems)
    with tqdm(total=len(jobs), unit="image", desc="selfie-segment", file=sys.stderr) as progress:
        for start in range(0, len(jobs), args.batch_size):
            batch, ready = jobs[start : start + args.batch_size], []
            for job in batch:
                try:
                    ready.append((job, read_image(job.image)))
                except CLIError as error:
                    progress.write(f"error: {args.batch} line {job.line}: {error}", file=sys.stderr)
                    failed += 1
            if ready:
                results = segment_with_scores(
                    model, processor, [image for _, image in ready], [job.prompt for job, _ in ready], args.kind
                )
                for (job, image), (mask, score, iou) in zip(ready, results):
                    prefix = None if args.no_images else folder / f"{job.image.stem}_{job.line}"
                    records.append(save_result(job, image, mask, score, prefix, iou))
            progress.update(len(batch))
    if args.json:
        write_json(args.json, records)
    written = [] if args.no_images else [f"masks and overlays in {folder}{os.sep}"]
    written += [f"COCO RLE in {args.json}"] if args.json else []
    print(f"{len(records)} of {len(records) + failed} lines of {args.batch} segmented; {'; '.join(written)}")
    return 2 if failed else 0


def run(args) -> int:
    """Do what the parsed `selfie-segment` arguments say; a `CLIError` becomes one `error:` line and exit code 2."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # no "Loading weights" bar: the output is the results (and --batch's own bar)
    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            return run_batch(args) if args.batch else run_single(args)
        except CLIError as error:
            report(str(error))
            return 2

