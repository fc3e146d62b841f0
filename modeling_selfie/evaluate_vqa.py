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

On several GPUs, `torchrun --nproc_per_node N -m modeling_selfie.evaluate_vqa ...` (or `accelerate launch`) answers
a share of the questions in each process; rank 0 scores all the answers once, prints and writes
(`modeling_selfie.distributed`).

A question that already ends with its benchmark's suffix is asked as written. The output JSON holds the metrics
and one record per question (prompt, prediction, ground truth, score); a bad line or image is one `error:` line
(exit code 2) and nothing is written.

This module parses the arguments without torch, so that `--help` answers at once; the benchmarks' definitions are in
`modeling_selfie.vqa_benchmarks`, and `modeling_selfie.evaluation_vqa` reads, answers and scores (torch and
transformers load there).
"""

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import UsageError
from .vqa_benchmarks import BENCHMARKS


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
    parser.add_argument(
        "--device", default="auto",
        help="auto (default: the GPU torch sees, else cpu), cpu, cuda; under torchrun / accelerate launch each "
        "process takes its own",
    )  # fmt: skip
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .evaluation_vqa import evaluate, summary  # torch loads here, once the arguments parse
    from .io_utils import atomic_output_file

    try:
        results = evaluate(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if results is None:  # not rank 0 of a launched evaluation: rank 0 prints and writes
        return 0
    print(summary(results))
    if args.output:
        with atomic_output_file(args.output) as staging:
            staging.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
