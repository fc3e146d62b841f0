"""The evaluation command line, `python -m modeling_selfie.evaluate` (or `selfie-evaluate`).

    python -m modeling_selfie.evaluate --model HF_DIR --dataset refcoco --split val --data-root DATA --output out.json

This module imports no torch: the arguments are parsed and checked here, so that `--help` and bad arguments answer
at once, then [`modeling_selfie.evaluation.run`] loads the data and the model and scores. Bad input is one `error:`
line on stderr and exit code 2.

On several GPUs, `torchrun --nproc_per_node N -m modeling_selfie.evaluate ...` (or `accelerate launch`) shares the
split between the processes and gives one process's metrics (`modeling_selfie.distributed`).

The benchmark names and the scoring protocols (`--protocol`) are defined in `modeling_selfie.protocols` and
importable from here; docs/evaluation.md lists every difference between the protocols.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import UsageError
from .protocols import (
    CUSTOM_DATASETS,
    DEFAULT_BATCH_SIZE,
    OPEN_VOCAB_DATASETS,
    PROTOCOLS,
    REFER_DATASETS,
    REFERRING_DATASETS,
    EvaluationProtocol,
    evaluation_protocol,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_selfie.evaluate",
        description="Evaluate a SELFIE checkpoint on a referring / reasoning or open-vocabulary benchmark.",
    )
    parser.add_argument("--model", required=True, help="folder of a SELFIE checkpoint (model and processor)")
    parser.add_argument(
        "--dataset", required=True, help=f"one of {', '.join(REFERRING_DATASETS + OPEN_VOCAB_DATASETS)}"
    )
    parser.add_argument("--split", default="val", help="split to evaluate (default: val)")
    parser.add_argument("--data-root", help="folder holding the dataset (the paper's datasets)")
    parser.add_argument(
        "--annotations",
        help="your own data (custom_referring, custom_semantic): the JSON / JSONL file, formats in "
        "modeling_selfie/data/custom.py; image and mask paths are relative to it",
    )
    parser.add_argument(
        "--protocol", default="default", choices=tuple(PROTOCOLS),
        help="scoring: this project's (default) or the SELF1E authors' (self1e); see docs/evaluation.md",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=int,
        help=f"samples (referring; default {DEFAULT_BATCH_SIZE}; protocol self1e: the expressions of one image, "
        f"not settable) or class queries (open-vocab; default {DEFAULT_BATCH_SIZE}) per forward",
    )  # fmt: skip
    parser.add_argument(
        "--output", help="write the results as JSON here (referring: with one record per expression)"
    )
    parser.add_argument(
        "--device", help="torch device (default: cuda if available, else cpu; under torchrun / accelerate launch: "
        "cpu or cuda, each process on its own, see docs/evaluation.md)",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
        help="weights dtype (default: auto, the checkpoint's)",
    )  # fmt: skip
    parser.add_argument("--limit", type=int, help="evaluate the first N samples only")
    parser.add_argument("--max-tiles", type=int, default=1, help="most 448 px tiles per image (default: 1)")
    parser.add_argument("--num-workers", type=int, default=0, help="data loading workers (default: 0)")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """The checks that need no torch, made before it loads: the dataset name, the paths it reads, the numbers, and
    the batch size under the protocol; `UsageError` at the first problem."""
    if args.dataset not in REFERRING_DATASETS + OPEN_VOCAB_DATASETS:
        choices = ", ".join(REFERRING_DATASETS + OPEN_VOCAB_DATASETS)
        raise UsageError(f"unknown dataset {args.dataset!r}; choose one of {choices}")
    if not Path(args.model).is_dir():
        raise UsageError(f"model directory {args.model} does not exist")
    if args.dataset in CUSTOM_DATASETS:
        if args.annotations is None:
            raise UsageError(f"--dataset {args.dataset} reads your own data: give --annotations FILE")
        if not Path(args.annotations).is_file():
            raise UsageError(f"annotation file {args.annotations} does not exist")
    elif args.annotations is not None:
        raise UsageError(f"--annotations is for custom_referring and custom_semantic, not {args.dataset}")
    elif args.data_root is None:
        raise UsageError(f"--dataset {args.dataset} needs --data-root, the folder holding it")
    elif not Path(args.data_root).is_dir():
        raise UsageError(f"data root {args.data_root} does not exist")
    for name in ("batch_size", "max_tiles", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be at least 0, got {args.num_workers}")
    if args.dataset in REFERRING_DATASETS:
        try:
            PROTOCOLS[args.protocol].batch_size(args.batch_size)
        except ValueError as error:
            raise UsageError(f"--batch-size: {error}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m modeling_selfie.evaluate`: evaluate, print a one-line summary, optionally write JSON."""
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        from .evaluation import run  # torch loads here, once the arguments are valid

        return run(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


__all__ = [
    "CUSTOM_DATASETS", "DEFAULT_BATCH_SIZE", "OPEN_VOCAB_DATASETS", "PROTOCOLS", "REFER_DATASETS", "REFERRING_DATASETS",
    "EvaluationProtocol", "UsageError", "build_parser", "check_arguments", "evaluation_protocol", "main",
]  # fmt: skip

if __name__ == "__main__":
    raise SystemExit(main())
