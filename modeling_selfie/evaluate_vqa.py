"""`python -m modeling_selfie.evaluate_vqa`: the VQA and multimodal benchmarks of the paper's Tab. 9 and Tab. 13
(VQAv2, OK-VQA, VizWiz, GQA, TextVQA, POPE, MMBench, MME), answered by greedy generation and scored with their
standard metrics (`modeling_selfie.vqa_metrics`).

    python -m modeling_selfie.evaluate_vqa --benchmark pope --data pope.jsonl --model HF_DIR --output pope.json

Each question is asked as InternVL's own evaluation asks it: one user turn after the image, in the processor's
chat format (the checkpoint's system message and template), with InternVL's suffix ("Answer the question using a
single word or phrase."; VizWiz first says "When the provided information is insufficient, respond with
'Unanswerable'."; MMBench lists the options and asks "Answer with the option's letter from the given choices
directly.", in Chinese for MMBench-CN), answered by `model.chat` (causal attention, no `[SEG]` asked for) greedily
with at least 1 and at most InternVL's number of new tokens (VQA sets and GQA 10, MME 20, POPE and MMBench 100).
A plain InternVL3 folder gets SELF1E's system turn unless `--system-message` gives InternVL3's own. Images are
tiled as the processor saved it (one 448 px tile for the released SELF1E; InternVL's own evaluations
tile dynamically, up to 6 tiles plus a thumbnail: `--max-tiles 6` comes close, without the thumbnail).

`--data` is a JSON Lines file, one question per line; `image` is a path relative to the file's folder (or to
`--image-root`). Keys per benchmark:

| benchmark | keys |
|---|---|
| `vqav2`, `okvqa`, `textvqa`, `vizwiz` | `image`, `question`, `answers` (human answers: strings or `{"answer": str}`) |
| `gqa` | `image`, `question`, `answer` |
| `pope` | `image`, `question`, `answer` ("yes"/"no"), `category` (optional: adversarial, popular, random) |
| `mme` | `image`, `question`, `answer` ("Yes"/"No"), `category` (the subtask: existence, count, ..., code_reasoning) |
| `mmbench` | `image`, `question`, `options` (`{"A": text, "B": text, ...}`), `answer` (a letter), `hint` (optional) |

A question that already ends with its benchmark's suffix is asked as written. The output JSON holds the metrics
and one record per question (prompt, prediction, ground truth, score); a bad line or image is one `error:` line
(exit code 2) and nothing is written.
"""

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .cli import CLIError, read_image, resolve_device, resolve_dtype
from .data.vqa import SHORT_ANSWER_PROMPT, read_json_line
from .io_utils import atomic_output_file
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

VIZWIZ_PROMPT = "When the provided information is insufficient, respond with 'Unanswerable'. " + SHORT_ANSWER_PROMPT
MMBENCH_PROMPT = "Answer with the option's letter from the given choices directly."
MMBENCH_PROMPT_CN = "请直接回答选项字母。"  # MMBench-CN: asked in Chinese
CJK = re.compile(r"[\u4e00-\u9fff]")


@dataclass(frozen=True)
class Benchmark:
    """How one benchmark is asked and scored: its `metric` (a key of `SCORERS`), the prompt suffix, the most new
    tokens, and the keys each record must have."""

    metric: str
    suffix: str
    max_new_tokens: int
    keys: tuple[str, ...] = ("image", "question", "answer")


BENCHMARKS = {
    "vqav2": Benchmark("vqa", SHORT_ANSWER_PROMPT, 10, ("image", "question", "answers")),
    "okvqa": Benchmark("vqa", SHORT_ANSWER_PROMPT, 10, ("image", "question", "answers")),
    "textvqa": Benchmark("vqa", SHORT_ANSWER_PROMPT, 10, ("image", "question", "answers")),
    "vizwiz": Benchmark("vqa", VIZWIZ_PROMPT, 10, ("image", "question", "answers")),
    "gqa": Benchmark("gqa", SHORT_ANSWER_PROMPT, 10),
    "pope": Benchmark("pope", SHORT_ANSWER_PROMPT, 100),
    "mme": Benchmark("mme", SHORT_ANSWER_PROMPT, 20, ("image", "question", "answer", "category")),
    "mmbench": Benchmark("mmbench", MMBENCH_PROMPT, 100, ("image", "question", "options", "answer")),
}


def with_suffix(question: str, suffix: str) -> str:
    """`question` followed by `suffix` after a space, unless it already ends with it."""
    question = question.strip()
    return question if question.endswith(suffix) else f"{question} {suffix}"


def mmbench_prompt(record: dict, options: dict[str, str]) -> str:
    """MMBench as InternVL asks it: the hint, the question, one "X. option" line per option, the instruction (in
    Chinese when the rest has Chinese characters)."""
    lines = [record["hint"]] if record.get("hint") else []
    body = "\n".join([*lines, record["question"].strip(), *(f"{letter}. {text}" for letter, text in options.items())])
    return f"{body}\n{MMBENCH_PROMPT_CN if CJK.search(body) else MMBENCH_PROMPT}"


def human_answers(record: dict) -> list[str]:
    """The `answers` of a VQA record as strings."""
    return [answer["answer"] if isinstance(answer, dict) else str(answer) for answer in record["answers"]]


def read_records(path: Path, benchmark: Benchmark) -> list[dict]:
    """The records of a `--data` file, each with its `line`; a `CLIError` names the first bad line."""
    if not path.is_file():
        raise CLIError(f"--data {path}: no such file")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = read_json_line(line, where)
        except ValueError as error:
            raise CLIError(str(error)) from None
        missing = [key for key in benchmark.keys if key not in record]
        if missing:
            raise CLIError(f"{where} lacks {', '.join(map(repr, missing))} (needs {', '.join(benchmark.keys)})")
        if benchmark.metric == "mmbench" and record["answer"] not in record["options"]:
            raise CLIError(f"{where}: answer {record['answer']!r} is not one of the options {list(record['options'])}")
        if benchmark.metric == "vqa" and not record["answers"]:
            raise CLIError(f"{where} has an empty 'answers' list")
        records.append({**record, "line": number})
    if not records:
        raise CLIError(f"--data {path} holds no questions")
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


def predict(model, processor, records: list[dict], benchmark: Benchmark, image_root: Path, progress: bool = True):
    """Fill each record's `prompt` and `prediction` (MMBench: `rotations`, one answer per option order)."""
    for record in tqdm(records, desc="vqa", unit="question", disable=not progress):
        image = read_image(image_root / record["image"])
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_selfie.evaluate_vqa",
        description="Score a SELFIE (or InternVL3) checkpoint on a VQA / multimodal benchmark by greedy generation.",
    )
    parser.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS), help="which benchmark --data holds")
    parser.add_argument("--data", required=True, help="JSON Lines file of questions (keys: see the module docstring)")
    parser.add_argument("--model", required=True, help="SELFIE or plain InternVL3 checkpoint (folder or Hub id)")
    parser.add_argument("--image-root", help="folder the records' image paths are relative to (default: --data's)")
    parser.add_argument("--output", help="write the metrics and one record per question as JSON here")
    parser.add_argument("--limit", type=int, help="evaluate the first N questions only")
    parser.add_argument("--max-tiles", type=int, help="most tiles per image (default: the processor's saved value)")
    parser.add_argument("--system-message", help="system turn of the chat (default: the processor's; '' for none)")
    parser.add_argument("--device", default="auto", help="auto (default: the GPU torch sees, else cpu), cpu, cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    return parser


def load_model(path: str, device: str, dtype: str, max_tiles: int | None, system_message: str | None = None):
    """Model and processor from a SELFIE folder or a plain InternVL3 one (`[SEG]` added as for fine-tuning), the
    processor set to `max_tiles` and `system_message` where given."""
    from .modeling_selfie import SelfieForSegmentation
    from .processing_selfie import SelfieProcessor

    torch_device = resolve_device(device)
    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise CLIError(f"--model {path} is not a model folder (no config.json)")
    try:
        model = SelfieForSegmentation.from_pretrained(path, dtype=resolve_dtype(dtype, torch_device))
        processor = SelfieProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:
        raise CLIError(f"cannot load a model from {path}: {' '.join(str(error).split())}") from None
    if max_tiles is not None:
        processor.image_processor.max_patches = max_tiles
    if system_message is not None:
        processor.system_message = system_message
    return model.to(torch_device).eval(), processor


def evaluate(args: argparse.Namespace) -> dict:
    """Read, answer and score; the results dict `main` writes."""
    benchmark = BENCHMARKS[args.benchmark]
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be at least 1, got {args.limit}")
    if args.max_tiles is not None and args.max_tiles < 1:
        raise CLIError(f"--max-tiles must be at least 1, got {args.max_tiles}")
    data = Path(args.data)
    records = read_records(data, benchmark)[: args.limit]
    image_root = Path(args.image_root) if args.image_root else data.parent
    for record in records:  # every image is checked before the model loads
        if not (image_root / record["image"]).is_file():
            raise CLIError(f"{data} line {record['line']}: image not found: {image_root / record['image']}")
    model, processor = load_model(args.model, args.device, args.dtype, args.max_tiles, args.system_message)
    start = time.perf_counter()
    predict(model, processor, records, benchmark, image_root)
    metrics = SCORERS[benchmark.metric](records)
    return {
        "model": str(args.model),
        "benchmark": args.benchmark,
        "data": str(data),
        "system_message": processor.system_message,
        "max_tiles": processor.image_processor.max_patches,
        "count": len(records),
        "time_s": round(time.perf_counter() - start, 3),
        "metrics": metrics,
        "items": records,
    }


def summary(results: dict) -> str:
    metrics = results["metrics"]
    scores = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items() if isinstance(value, float))
    return f"{results['benchmark']}: {scores} (count {results['count']}, {results['time_s']:.1f} s)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = evaluate(args)
    except CLIError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary(results))
    if args.output:
        with atomic_output_file(args.output) as staging:
            staging.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
