"""The work behind `selfie-segment` (`selfie_segment.py` parses and checks its arguments; `cli_inputs` holds the
checks of its input that need no torch).

    selfie-segment examples/assets/shapes.png "red circle"
    selfie-segment photo.jpg "red circle" "blue star" --json masks.json
    selfie-segment --batch jobs.jsonl --output out/ --json masks.json

Every output file is written atomically (`io_utils.atomic_output_file`), so an interrupted run never leaves a
half-written mask, overlay or JSON file in place of a good one.
"""

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from . import io_utils
from .cli_inputs import CLIError, Job, image_problem, locate_model, names_a_folder, prompt_problem, read_error
from .cli_inputs import default_model_dir  # noqa: F401  (re-exported: the examples and tests import it from here)
from .io_utils import atomic_output_file
from .loading import load_model_and_processor, resolve_device, resolve_dtype
from .overlay import render_overlay


def load_model(name_or_path: str | None = None, device: str = "cpu", dtype: str = "auto"):
    """(model, processor) from a folder or Hub id (the shipped RefShapes model when `None`; see
    `cli_inputs.locate_model`), on `device` in `dtype` (names as `selfie-segment --device/--dtype` takes them)."""
    torch_device = resolve_device(device)
    return load_model_and_processor(locate_model(name_or_path), torch_device, resolve_dtype(dtype, torch_device))


def read_image(path: str | Path) -> Image.Image:
    """The RGB PIL image as it is shown (`io_utils.read_image`), or a `CLIError` that says why the file cannot be
    used."""
    path = Path(path)
    if problem := image_problem(path):
        raise CLIError(problem)
    try:
        return io_utils.read_image(path)
    except (io_utils.ImageTooLargeError, OSError) as error:
        raise CLIError(read_error(path, error)) from error


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
    """`selfie-segment IMAGE PROMPT [PROMPT ...]`: `--batch-size` prompts per forward pass, one mask + overlay
    each."""
    image_path = Path(args.image)
    jobs = [Job(image_path, prompt.strip(), name=args.image) for prompt in args.prompts]
    image = read_image(image_path)
    model, processor = load_model(args.model, args.device, args.dtype)
    for job in jobs:  # `selfie_segment` checked them already if the model's folder was here
        if problem := prompt_problem(job.prompt, processor.query_normalization, args.kind):
            raise CLIError(problem)
    results = []
    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start : start + args.batch_size]
        results += segment_with_scores(model, processor, image, [job.prompt for job in chunk], args.kind)
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
    """`selfie-segment --batch FILE`: `--batch-size` lines per forward pass; a bad line is reported and skipped.

    `args.jobs` are the lines `selfie_segment` found usable and `args.bad_lines` counts the others (reported
    there). A line this model cannot take is reported here and skipped: its image cannot be decoded, its prompt
    holds no word it reads, or `model.segment` refuses it (a `ValueError`; its batch is then segmented line by
    line, so that only that line is lost).
    """
    model, processor = load_model(args.model, args.device, args.dtype)
    jobs, failed = args.jobs, args.bad_lines
    folder = Path(args.output or ".")
    records = []
    with tqdm(total=len(jobs), unit="image", desc="selfie-segment", file=sys.stderr) as progress:

        def skip(job: Job, problem) -> None:
            nonlocal failed
            progress.write(f"error: {args.batch} line {job.line}: {problem}", file=sys.stderr)
            failed += 1

        for start in range(0, len(jobs), args.batch_size):
            batch, ready = jobs[start : start + args.batch_size], []
            for job in batch:
                try:
                    if problem := prompt_problem(job.prompt, processor.query_normalization, args.kind):
                        raise CLIError(problem)
                    ready.append((job, read_image(job.image)))
                except CLIError as error:
                    skip(job, error)
            for (job, image), (mask, score, iou) in segment_lines(model, processor, ready, args.kind, skip):
                prefix = None if args.no_images else folder / f"{job.image.stem}_{job.line}"
                records.append(save_result(job, image, mask, score, prefix, iou))
            progress.update(len(batch))
    if args.json:
        write_json(args.json, records)
    written = [] if args.no_images else [f"masks and overlays in {folder}{os.sep}"]
    written += [f"COCO RLE in {args.json}"] if args.json else []
    print(f"{len(records)} of {len(records) + failed} lines of {args.batch} segmented; {'; '.join(written)}")
    return 2 if failed else 0


def segment_lines(model, processor, ready: list[tuple[Job, Image.Image]], kind: str, skip) -> list:
    """`((job, image), (mask, score, iou_score))` for each of `ready`, segmented in one forward pass; when `model.segment`
    refuses them (`ValueError`), line by line, calling `skip(job, error)` for each line it refuses."""
    if not ready:
        return []
    try:
        images, prompts = [image for _, image in ready], [job.prompt for job, _ in ready]
        return list(zip(ready, segment_with_scores(model, processor, images, prompts, kind)))
    except ValueError as error:
        if len(ready) == 1:
            skip(ready[0][0], error)
            return []
    return [result for line in ready for result in segment_lines(model, processor, [line], kind, skip)]


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

