"""The evaluation command line, `python -m modeling_selfie.evaluate` (or `selfie-evaluate`), and the benchmark
names and scoring protocols it offers.

    python -m modeling_selfie.evaluate --model HF_DIR --dataset refcoco --split val --data-root DATA --output out.json

This module imports no torch: the arguments are parsed and checked here, so that `--help` and bad arguments answer
at once, then [`modeling_selfie.evaluation.run`] loads the data and the model and scores. Bad input is one `error:`
line on stderr and exit code 2.

On several GPUs, `torchrun --nproc_per_node N -m modeling_selfie.evaluate ...` (or `accelerate launch`) shares the
split between the processes and gives one process's metrics (`modeling_selfie.distributed`).

Protocols ([`EvaluationProtocol`], `--protocol`). `default` is this project's scoring; `self1e` computes what the
SELF1E authors' evaluation computes (their loaders, batches, prompt and metric arithmetic); docs/evaluation.md lists
every difference and its effect.
"""

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REFERRING_DATASETS = ("refcoco", "refcoco+", "refcocog", "refclef", "grefcoco", "reasonseg", "custom_referring")
OPEN_VOCAB_DATASETS = ("ade150", "pc59", "pc459", "voc20", "custom_semantic")
REFER_DATASETS = ("refcoco", "refcoco+", "refcocog", "refclef", "grefcoco")  # the RefCOCO family
CUSTOM_DATASETS = ("custom_referring", "custom_semantic")  # your own data, read from `--annotations FILE`
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class EvaluationProtocol:
    """How a benchmark is scored: the settings that differ between protocols (docs/evaluation.md).

    Attributes:
        name: `"default"` or `"self1e"`.
        authors_arithmetic: score as the authors' `evaluate` does, in float32 meters updated once per batch: per
            expression IoU = I / (U + 1e-5) (1.0 when U = 0), gIoU = sum / (count + 1e-5), cIoU = sum I /
            (sum U + 1e-10); else float64 sums, IoU = I / U, gIoU = mean, cIoU = sum I / sum U (1.0 when 0 / 0).
        batch_by_image: one forward pass per image with all its expressions (the authors' validation batches);
            else `batch_size` expressions.
        zero_id_is_padding: rebuild each batch as the authors' `collate_fn` does: right-padded with id 0 and every
            id-0 token masked out of attention (in Qwen2's vocabulary id 0 is "!").
        reasonseg_first_query_only: ReasonSeg is scored on the first query of each image only.
        dropped_polygon_overlaps: datasets whose targets leave out the pixels covered by two or more polygons of one
            annotation (the authors' RefCOCO branch sums them; their gRefCOCO branch ORs them).
        lowercase_sentences: lowercase the RefCOCO-family sentences (the authors' loader).
        opencv_polygons: draw ReasonSeg polygons as the authors' loader (OpenCV on int32 points).
    """

    name: str
    authors_arithmetic: bool
    batch_by_image: bool
    zero_id_is_padding: bool
    reasonseg_first_query_only: bool
    dropped_polygon_overlaps: tuple[str, ...]
    lowercase_sentences: bool
    opencv_polygons: bool

    def dataset_options(self, dataset: str) -> dict:
        """Keyword arguments of the evaluation loader of `dataset` under this protocol."""
        if dataset == "reasonseg":
            return {"first_query_only": self.reasonseg_first_query_only, "opencv_polygons": self.opencv_polygons}
        if dataset in REFER_DATASETS:
            overlaps = "drop" if dataset in self.dropped_polygon_overlaps else "keep"
            return {"overlapping_polygons": overlaps, "lowercase": self.lowercase_sentences,
                    "by_image": self.batch_by_image}  # fmt: skip
        return {}

    def batch_size(self, requested: int | None) -> int | None:
        """Expressions per forward pass: `requested` (default `DEFAULT_BATCH_SIZE`), or `None` (one image's
        expressions) under a protocol that batches by image, which refuses a requested size (`ValueError`)."""
        if not self.batch_by_image:
            return DEFAULT_BATCH_SIZE if requested is None else requested
        if requested is not None:
            raise ValueError(
                f"protocol {self.name} scores the expressions of one image per forward pass, as the authors do; "
                f"batch size {requested} was asked for"
            )
        return None


PROTOCOLS = {
    "default": EvaluationProtocol(
        name="default", authors_arithmetic=False, batch_by_image=False, zero_id_is_padding=False,
        reasonseg_first_query_only=False, dropped_polygon_overlaps=(), lowercase_sentences=False,
        opencv_polygons=False,
    ),
    "self1e": EvaluationProtocol(
        name="self1e", authors_arithmetic=True, batch_by_image=True, zero_id_is_padding=True,
        reasonseg_first_query_only=True, dropped_polygon_overlaps=("refcoco", "refcoco+", "refcocog", "refclef"),
        lowercase_sentences=True, opencv_polygons=True,
    ),
}  # fmt: skip


def evaluation_protocol(protocol: "str | EvaluationProtocol") -> EvaluationProtocol:
    """The [`EvaluationProtocol`] named `protocol` (one of `PROTOCOLS`), or `protocol` itself."""
    if isinstance(protocol, EvaluationProtocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown evaluation protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}.")
    return PROTOCOLS[protocol]


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


class UsageError(Exception):
    """Bad input on the command line: reported as one line on stderr, exit code 2."""


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


if __name__ == "__main__":
    # Run this module as `modeling_selfie.evaluate`, the one `evaluation` imports, not as its `__main__` copy: both
    # must raise and catch the same `UsageError`.
    from modeling_selfie.evaluate import main

    raise SystemExit(main())
