"""The work behind `python -m modeling_selfie.evaluate_vqa` (see `modeling_selfie.evaluate_vqa` for the
benchmarks, the prompts and the `--data` format): read the questions, answer them, score the answers."""

import argparse
import time
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from . import distributed
from .data.vqa import read_json_line
from .errors import UsageError
from .io_utils import read_image
from .loading import load_model_and_processor, resolve_device, resolve_dtype
from .vqa_benchmarks import BENCHMARKS, Benchmark, mmbench_prompt, with_suffix
from .vqa_metrics import (
    binary_scores,
    circular_options,
    gqa_correct,
    mmbench_letter,
    mme_answer,
    mme_scores,
    pope_answer,
    vqa_accuracy,
)


def human_answers(record: dict) -> list[str]:
    """The `answers` of a VQA record as strings."""
    return [answer["answer"] if isinstance(answer, dict) else str(answer) for answer in record["answers"]]


def read_records(path: Path, benchmark: Benchmark) -> list[dict]:
    """The records of a `--data` file, each with its `line`; a `UsageError` names the first bad line."""
    if not path.is_file():
        raise UsageError(f"--data {path}: no such file")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = read_json_line(line, where)
        except ValueError as error:
            raise UsageError(str(error)) from None
        missing = [key for key in benchmark.keys if key not in record]
        if missing:
            raise UsageError(f"{where} lacks {', '.join(map(repr, missing))} (needs {', '.join(benchmark.keys)})")
        if benchmark.metric == "mmbench" and record["answer"] not in record["options"]:
            options = list(record["options"])
            raise UsageError(f"{where}: answer {record['answer']!r} is not one of the options {options}")
        if benchmark.metric == "vqa" and not record["answers"]:
            raise UsageError(f"{where} has an empty 'answers' list")
        records.append({**record, "line": number})
    if not records:
        raise UsageError(f"--data {path} holds no questions")
    return records


def answer(model, processor, image, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy answer to one prompt about `image`."""
    reply = model.chat(
        processor, image, [{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens, min_new_tokens=1
    )
    return reply["text"].strip()


def score_vqa(records: list[dict]) -> dict:
    for record in records:
        record["score"] = vqa_accuracy(record["prediction"], human_answers(record))
    return {"accuracy": sum(r["score"] for r in records) / len(records), "count": len(records)}


def score_gqa(records: list[dict]) -> dict:
    for record in records:
        record["score"] = float(gqa_correct(record["prediction"], record["answer"]))
    return {"accuracy": sum(r["score"] for r in records) / len(records), "count": len(records)}


def score_pope(records: list[dict]) -> dict:
    """Scores per category and their mean (POPE's headline number is the mean F1 over its three categories)."""
    categories = {}
    for record in records:
        record["parsed"] = pope_answer(record["prediction"])
        record["score"] = float(record["parsed"] == record["answer"].strip().lower())
        categories.setdefault(record.get("category", "all"), []).append(record)
    per_category = {
        name: binary_scores([r["parsed"] for r in group], [r["answer"].strip().lower() for r in group])
        for name, group in sorted(categories.items())
    }
    names = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    means = {name: sum(s[name] for s in per_category.values()) / len(per_category) for name in names}
    return {**means, "count": len(records), "categories": per_category}


def score_mme(records: list[dict]) -> dict:
    for record in records:
        record["parsed"] = mme_answer(record["prediction"])
        record["score"] = float(record["parsed"] == record["answer"].strip().lower())
    items = [{**record, "prediction": record["parsed"]} for record in records]
    return {**mme_scores(items), "count": len(records)}


def score_mmbench(records: list[dict]) -> dict:
    """`accuracy`: the options in their given order answered right; `circular_accuracy` (CircularEval, MMBench's
    headline number, each record's `score`): the answers to all its option rotations right."""
    for record in records:
        record["score"] = float(all(p["letter"] == p["correct"] for p in record["rotations"]))
    first = [r["rotations"][0]["letter"] == r["rotations"][0]["correct"] for r in records]
    return {
        "accuracy": sum(first) / len(records),
        "circular_accuracy": sum(r["score"] for r in records) / len(records),
        "count": len(records),
    }


SCORERS = {"vqa": score_vqa, "gqa": score_gqa, "pope": score_pope, "mme": score_mme, "mmbench": score_mmbench}


def read_record_image(image_root: Path, record: dict) -> Image.Image:
    """The image of a record as it is shown (`io_utils.read_image`); a `UsageError` names the line it cannot be read
    for."""
    path = image_root / record["image"]
    try:
        return read_image(path)
    except (OSError, Image.DecompressionBombError) as error:
        raise UsageError(f"line {record['line']}: cannot read image {path}: {error}") from None


def predict(model, processor, records: list[dict], benchmark: Benchmark, image_root: Path, progress: bool = True):
    """Fill each record's `prompt` and `prediction` (MMBench: `rotations`, one answer per option order)."""
    for record in tqdm(records, desc="vqa", unit="question", disable=not progress):
        image = read_record_image(image_root, record)
        if benchmark.metric != "mmbench":
            record["prompt"] = with_suffix(record["question"], benchmark.suffix)
            record["prediction"] = answer(model, processor, image, record["prompt"], benchmark.max_new_tokens)
            continue
        record["rotations"] = []
        for options, correct in circular_options(record["options"], record["answer"]):
            prompt = mmbench_prompt(record, options)
            prediction = answer(model, processor, image, prompt, benchmark.max_new_tokens)
            letter = mmbench_letter(prediction, options)
            record["rotations"].append(
                {"prompt": prompt, "prediction": prediction, "letter": letter, "correct": correct}
            )


def load_model(path: str, device: str, dtype: str, max_tiles: int | None, system_message: str | None = None):
    """Model and processor from a SELFIE folder or a plain InternVL3 one (`[SEG]` added as for fine-tuning), the
    processor set to `max_tiles` and `system_message` where given."""
    torch_device = resolve_device(device)
    model, processor = load_model_and_processor(path, torch_device, resolve_dtype(dtype, torch_device))
    if max_tiles is not None:
        processor.image_processor.max_patches = max_tiles
    if system_message is not None:
        processor.system_message = system_message
    return model, processor


def evaluate(args: argparse.Namespace) -> dict | None:
    """Read, answer and score; the results dict `main` writes. Under a launcher (`torchrun`, `accelerate launch`;
    `modeling_selfie.distributed`) each process answers a contiguous share of the questions on its local device and
    rank 0 gathers the answers and scores them all at once: the other ranks return `None`."""
    benchmark = BENCHMARKS[args.benchmark]
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    if args.max_tiles is not None and args.max_tiles < 1:
        raise UsageError(f"--max-tiles must be at least 1, got {args.max_tiles}")
    data = Path(args.data)
    records = read_records(data, benchmark)[: args.limit]
    image_root = Path(args.image_root) if args.image_root else data.parent
    for record in records:  # every image is checked before the model loads
        if not (image_root / record["image"]).is_file():
            raise UsageError(f"{data} line {record['line']}: image not found: {image_root / record['image']}")
    device = args.device
    if distributed.launched():
        try:
            device = str(distributed.join_launched_processes(args.device))
        except ValueError as error:
            raise UsageError(f"--device: {error}") from None
    try:
        model, processor = load_model(args.model, device, args.dtype, args.max_tiles, args.system_message)
        start = time.perf_counter()
        share = distributed.shard(records)
        predict(model, processor, share, benchmark, image_root, progress=distributed.is_main_process())
        shares = distributed.gather_to_main(share)
    finally:
        distributed.leave()
    if shares is None:
        return None
    records = [record for share in shares for record in share]
    metrics = SCORERS[benchmark.metric](records)
    return {
        "model": str(args.model),
        "benchmark": args.benchmark,
        "data": str(data),
        "system_message": processor.system_message,
        "max_tiles": processor.image_processor.max_patches,
        "count": len(records),
        "processes": len(shares),
        "time_s": round(time.perf_counter() - start, 3),
        "metrics": metrics,
        "items": records,
    }


def summary(results: dict) -> str:
    metrics = results["metrics"]
    scores = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items() if isinstance(value, float))
    return f"{results['benchmark']}: {scores} (count {results['count']}, {results['time_s']:.1f} s)"
