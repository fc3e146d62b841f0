"""Throughput of the main job: one `selfie-segment --batch FILE` call against one `selfie-segment IMAGE PROMPT`
process per image, with the demo model shipped in the package, measured in one run.

    nice -n 10 python benchmarks/cli_throughput.py            # 32 images in one --batch call vs 6 single calls
    python benchmarks/cli_throughput.py --images 96 --single 12 --batch-size 16 --device auto

The images are RefShapes scenes drawn here (RefShapes' own generator, a seed stream of this benchmark), one phrase
each. Both ways write the same files (a mask and an overlay PNG per image); a single call pays Python's and torch's
start and the model load every time, which is what a shell loop over images costs. The single calls are split
around the batch call so that a change in the machine's load touches both. Prints images/s for each way and the
ratio.
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from modeling_selfie.data.refshapes import generate_example


def draw_jobs(folder: Path, count: int) -> list[dict]:
    """`count` scenes saved as PNGs in `folder`, each with one phrase (no reasoning questions): the batch lines."""
    jobs = []
    for i in range(count):
        example = generate_example(random.Random(f"cli-throughput/{i}"), {"reasoning": 0})
        example.scene.image.save(folder / f"scene{i:03d}.png")
        jobs.append({"image": f"scene{i:03d}.png", "prompt": example.expression.text})
    return jobs


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="images of the --batch call")
    parser.add_argument("--single", type=int, default=6, help="one-image calls (on the first of the images)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    cli = [sys.executable, "-m", "selfie_segment", "--device", args.device]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        jobs = draw_jobs(folder, max(args.images, args.single))
        (folder / "jobs.jsonl").write_text("".join(json.dumps(job) + "\n" for job in jobs[: args.images]))
        (folder / "single").mkdir()

        def single_calls(jobs_part):
            return [timed([*cli, job["image"], job["prompt"], "--output", "single/"], folder) for job in jobs_part]

        half = args.single // 2
        single = single_calls(jobs[:half])
        batch = timed([*cli, "--batch", "jobs.jsonl", "--batch-size", str(args.batch_size), "--output", "batch/"],
                      folder)
        single += single_calls(jobs[half : args.single])
        assert len(list((folder / "batch").glob("*_mask.png"))) == args.images

    single_rate, batch_rate = len(single) / sum(single), args.images / batch
    print(f"one process per image: {len(single)} images in {sum(single):.1f} s = {single_rate:.2f} images/s "
          f"({sum(single) / len(single):.1f} s per call)")
    print(f"--batch (batch size {args.batch_size}): {args.images} images in {batch:.1f} s = {batch_rate:.2f} images/s")
    print(f"ratio --batch / one process per image: {batch_rate / single_rate:.1f}x")


if __name__ == "__main__":
    main()
