"""`selfie-segment`: segment images from sentences; write a mask and an overlay picture per prompt.

    selfie-segment examples/assets/shapes.png "red circle"
    selfie-segment photo.jpg "red circle" "blue star" --json masks.json     # several prompts, one forward
    selfie-segment --batch jobs.jsonl --output out/ --json masks.json      # {"image", "prompt"} per line

This module only parses the arguments: torch and transformers are imported (by `modeling_selfie.cli`, which does
the work) once they are valid, so `--help` and argument errors answer at once. It lives outside the
`modeling_selfie` package because importing the package registers the model classes with transformers.
"""

import argparse
import os
import sys
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")


def fail(message: str):
    """Bad input ends in one `error:` line and exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(f"{message} (see selfie-segment --help)")


def image_problem(path: str | Path) -> str | None:
    """Why `path` cannot be an image to read (`None` when it is a file)."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder, not an image"
    return None if path.is_file() else f"image not found: {path}"


def model_problem(name_or_path: str | Path) -> str | None:
    """Why `name_or_path` cannot be a model when it names a local path (`None` when it can, or is a Hub id)."""
    path = Path(name_or_path)
    if path.exists() and not (path / "config.json").is_file():
        return f"{path} is not a model folder (no config.json)"
    return None


def batch_problem(path: str | Path) -> str | None:
    return None if Path(path).is_file() else f"batch file not found: {path}"


def prompt_problem(prompt) -> str | None:
    """Why `prompt` cannot be segmented (`None` when it says something)."""
    if isinstance(prompt, str) and prompt.strip():
        return None
    return f"the prompt {prompt!r} is empty: say what to segment, e.g. \"red circle\""


def folder_problem(folder: str | Path) -> str | None:
    """Why files cannot be written in `folder`, creating it when missing (`None` when they can)."""
    existing = Path(os.path.abspath(folder))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, so the folder {folder} cannot be created"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write in {existing}: permission denied"
    return None


def output_problem(option: str, path: str, folder: bool) -> str | None:
    """Why `option PATH` cannot be written: `PATH` is a folder to write in when `folder`, else a file (or prefix)."""
    if not folder and Path(path).is_dir():
        return f"{option} {path} is a folder: name the file to write, e.g. {Path(path) / 'masks.json'}"
    problem = folder_problem(path if folder else Path(os.path.abspath(path)).parent)
    return f"{option} {path}: {problem}" if problem else None


def names_a_folder(output: str) -> bool:
    """Whether `--output` names a folder: an existing one, or any path ending in a separator."""
    return output.endswith(tuple(s for s in (os.sep, os.altsep) if s)) or Path(output).is_dir()


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
        "are segmented in one forward pass, each with its own mask and overlay",
    )
    parser.add_argument(
        "--batch", metavar="FILE",
        help="JSON Lines file of {\"image\": PATH, \"prompt\": TEXT} (paths relative to the file's folder), "
        "segmented in batches with a progress bar; a bad line is reported and skipped",
    )
    parser.add_argument(
        "--batch-size", type=int, metavar="N", default=8, help="images per forward pass with --batch (default 8)"
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
    """The checks that need no torch, made before it loads: the image, prompts, batch file, model folder and output
    paths, and `--device mps` off macOS. Exits with one `error:` line at the first problem (other devices are
    checked once torch is there)."""
    problems = [image_problem(args.image)] if args.image else []
    problems += [prompt_problem(prompt) for prompt in args.prompts]
    problems += [batch_problem(args.batch)] if args.batch else []
    problems += [model_problem(args.model)] if args.model else []
    if args.device.split(":")[0] == "mps" and sys.platform != "darwin":
        problems.append(f"--device {args.device} cannot be used here: MPS is the GPU of Apple's macOS "
                        "(try --device auto or cpu)")
    if args.json:
        problems.append(output_problem("--json", args.json, folder=False))
    if args.output and not args.no_images:
        problems.append(output_problem("--output", args.output, folder=bool(args.batch) or names_a_folder(args.output)))
    for problem in filter(None, problems):
        fail(problem)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from modeling_selfie.cli import run  # torch and transformers load here, after the arguments are checked

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
