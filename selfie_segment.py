"""`selfie-segment`: segment images from sentences; write a mask and an overlay picture per prompt.

    selfie-segment examples/assets/shapes.png "red circle"
    selfie-segment photo.jpg "red circle" "blue star" --json masks.json     # several prompts, one forward
    selfie-segment --batch jobs.jsonl --output out/ --json masks.json      # {"image", "prompt"} per line

This module only parses and checks the arguments (with `modeling_selfie.cli_inputs`, which needs no torch): torch
and transformers are imported (by `modeling_selfie.cli`, which does the work) once they are valid, so `--help` and
bad input answer at once. Run it as `selfie-segment` or `python -m selfie_segment`.
"""

import argparse
import sys

from modeling_selfie.cli_inputs import (
    CLIError,
    image_problem,
    locate_model,
    names_a_folder,
    output_problem,
    prompt_problem,
    query_normalization,
    read_batch_file,
)

DTYPES = ("auto", "float32", "bfloat16", "float16")


def fail(message: str):
    """Bad input ends in one `error:` line and exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(f"{message} (see selfie-segment --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="selfie-segment",
        description="Segment images from sentences; write a mask and an overlay picture per prompt.",
        epilog="With no --model it uses the small model shipped in the package (trained on synthetic shapes, see "
        "modeling_selfie/pretrained/selfie-refshapes/README.md).",
    )
    parser.add_argument("image", nargs="?", metavar="IMAGE", help="image file to segment")
    parser.add_argument(
        "prompts", nargs="*", metavar="PROMPT",
        help="what to segment: a phrase (\"red circle\") or, with --kind instruction, a question; several prompts "
        "are segmented together (--batch-size per forward pass), each with its own mask and overlay",
    )
    parser.add_argument(
        "--batch", metavar="FILE",
        help="JSON Lines file of {\"image\": PATH, \"prompt\": TEXT} (paths relative to the file's folder), "
        "segmented in batches with a progress bar; a bad line is reported and skipped",
    )
    parser.add_argument(
        "--batch-size", type=int, metavar="N", default=8,
        help="prompts per forward pass: the lines of --batch, or the PROMPTs of one IMAGE (default 8)"
    )
    parser.add_argument(
        "--output", metavar="PATH",
        help="prefix of the written files (PREFIX_mask.png, PREFIX_overlay.png; PREFIX_K_... for the K-th of several "
        "prompts); a folder (existing, or ending in /) gets the image's name inside it. With --batch: the folder "
        "for IMAGE_LINE_mask.png files (default: this folder)",
    )
    parser.add_argument(
        "--json", metavar="OUT", help="also write every mask as COCO RLE with its prompt and presence score"
    )
    parser.add_argument("--no-images", action="store_true", help="write only the --json file, no PNGs")
    parser.add_argument("--model", help="model folder or Hub id (default: the shipped RefShapes model)")
    parser.add_argument("--kind", choices=["phrase", "instruction"], default="phrase", help="prompt template")
    parser.add_argument(
        "--device", default="auto", help="auto (default: the GPU if there is one), cpu, cuda, cuda:1, ..."
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="auto (default): bfloat16 on a GPU, else float32"
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked arguments; exits with one `error:` line when they cannot work together."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch and (args.image or args.prompts):
        parser.error("give either IMAGE PROMPT [PROMPT ...] or --batch FILE, not both")
    if not args.batch and not (args.image and args.prompts):
        parser.error("the following arguments are required: IMAGE PROMPT [PROMPT ...] (or --batch FILE)")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.no_images and not args.json:
        parser.error("--no-images without --json would write nothing")
    check_inputs(args)
    return args


def check_inputs(args: argparse.Namespace) -> None:
    """The checks that need no torch, made before it loads: the image, `--device mps` off macOS, the output paths,
    the model (a folder, or a Hub id that can be had: see `cli_inputs.locate_model`), the prompts (for a model that
    reads words: some word) and the batch file's lines. Exits with one `error:` line at the first problem; a bad
    batch line is reported and skipped (`args.jobs` holds the others, `args.bad_lines` counts the skipped ones).
    Other devices are checked once torch is there."""
    problems = [image_problem(args.image)] if args.image else []
    if args.device.split(":")[0] == "mps" and sys.platform != "darwin":
        problems.append(f"--device {args.device} cannot be used here: MPS is the GPU of Apple's macOS "
                        "(try --device auto or cpu)")
    if args.json:
        problems.append(output_problem("--json", args.json, folder=False))
    if args.output and not args.no_images:
        problems.append(output_problem("--output", args.output, folder=bool(args.batch) or names_a_folder(args.output)))
    for problem in filter(None, problems):
        fail(problem)
    try:  # after the local checks: a Hub id may ask the network
        args.model = locate_model(args.model)
    except CLIError as error:
        fail(str(error))
    normalization = query_normalization(args.model)
    for problem in filter(None, (prompt_problem(prompt, normalization, args.kind) for prompt in args.prompts)):
        fail(problem)
    if args.batch:
        try:
            args.jobs, bad_lines = read_batch_file(args.batch, normalization, args.kind)
        except CLIError as error:
            fail(str(error))
        for problem in bad_lines:
            print(f"error: {problem}", file=sys.stderr)
        if not args.jobs:
            fail(f"{args.batch} holds no usable line")
        args.bad_lines = len(bad_lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from modeling_selfie.cli import run  # torch and transformers load here, after the arguments are checked

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
