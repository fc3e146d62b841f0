"""Evaluation shared by two processes, launched as users launch it: `torchrun --nproc_per_node 2 -m
modeling_selfie.evaluate ...` (and `accelerate launch`, and `evaluate_vqa`) on CPU processes (gloo) gives the metrics
and per-expression records of one process (`python -m modeling_selfie.evaluate ...`) to the last digit, under both
protocols, prints once and writes the output once, from rank 0.

Every split has three images (an odd number, so the shares are unequal); referring images hold 3, 1 and 2
expressions, so a share of whole images (4 + 2 expressions) differs from a share of expressions (3 + 3).
"""

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .data_fixtures import box_mask, box_polygon, coco_file_name, compressed_rle, write_coco, write_image
from .helpers import WORDS, random_image
from .test_evaluate_vqa import write_data, write_one_word_internvl

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
# Logs every os.replace (the last step of an atomic write) of the processes it is put in front of, with their rank.
REPLACE_LOGGER = """import os
_replace = os.replace
def _logged_replace(source, target, *args, **kwargs):
    with open(os.environ["REPLACE_LOG"], "a") as log:
        log.write(f"{os.environ.get('RANK', '-')} {os.fspath(target)}\\n")
    return _replace(source, target, *args, **kwargs)
os.replace = _logged_replace
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(launcher: str, module: str, args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, list]:
    """`module` with `args` as a user runs it: `python -m` (launcher "none"), or 2 CPU processes under `torchrun` or
    `accelerate launch`; the finished run and the (rank, path) of every atomic rename its processes made."""
    hooks, log = tmp_path / "hooks", tmp_path / f"replaced-{launcher}.log"
    hooks.mkdir(parents=True, exist_ok=True)
    (hooks / "sitecustomize.py").write_text(REPLACE_LOGGER)
    prefix = {
        "none": [],
        "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                     "--master_port", str(free_port())],
        "accelerate": ["-m", "accelerate.commands.launch", "--config_file", str(REPO / "configuration" / "launch" /
                       "ddp.yaml"), "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port",
                       str(free_port())],
    }[launcher]  # fmt: skip
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
           "REPLACE_LOG": str(log)}  # fmt: skip
    command = [sys.executable, *prefix, "-m", module, *args]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    replaced = [tuple(line.split(" ", 1)) for line in log.read_text().splitlines()] if log.exists() else []
    return run, replaced


# ----------------------------------------------------------------------------------------------------------------
# Data: three images per split, written by PIL / pickle / json as the published layouts have them
# ----------------------------------------------------------------------------------------------------------------


def write_refcoco(root: Path) -> None:
    """RefCOCO (REFER layout) val: image 1 with 3 expressions, image 2 with 1, image 3 with 2."""
    image_dir = root / "images" / "mscoco" / "images" / "train2014"
    sizes = {1: (30, 40), 2: (28, 36), 3: (24, 32)}
    file_names = {image_id: coco_file_name(image_id) for image_id in sizes}
    for image_id, (height, width) in sizes.items():
        write_image(image_dir / file_names[image_id], width, height, seed=image_id)
    annotations = [
        {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [box_polygon(4, 5, 20, 15)]},
        {"id": 12, "image_id": 1, "category_id": 2, "iscrowd": 1, "segmentation": compressed_rle(
            box_mask(30, 40, 25, 2, 35, 12))},
        {"id": 21, "image_id": 2, "category_id": 1, "iscrowd": 1, "segmentation": compressed_rle(
            box_mask(28, 36, 3, 3, 12, 20))},
        {"id": 31, "image_id": 3, "category_id": 2, "iscrowd": 0, "segmentation": [box_polygon(2, 2, 30, 20)]},
    ]  # fmt: skip
    write_coco(root / "refcoco" / "instances.json", file_names, sizes, annotations, {1: "person", 2: "dog"})
    sentences = {(1, 11): ["man on the left", "person in red"], (1, 12): ["dog right"], (2, 21): ["the small dog"],
                 (3, 31): ["a big dog!", "the whole dog"]}  # fmt: skip
    refs = [
        {"ref_id": ann_id, "ann_id": ann_id, "image_id": image_id, "split": "val", "category_id": 1,
         "sentences": [{"sent": text, "sent_id": 10 * ann_id + i} for i, text in enumerate(texts)]}
        for (image_id, ann_id), texts in sentences.items()
    ]  # fmt: skip
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))


def write_voc20(root: Path) -> None:
    """VOC-20 (detectron2 layout): 3 images, labels 0..19 and 255 (ignored)."""
    base = root / "VOC2012"
    (base / "JPEGImages").mkdir(parents=True)
    (base / "annotations_detectron2" / "val").mkdir(parents=True)
    for i, (width, height) in enumerate([(20, 16), (12, 18), (16, 16)]):
        random_image(width, height, seed=i).save(base / "JPEGImages" / f"2007_00000{i}.jpg")
        label = np.random.default_rng(i).integers(0, 20, (height, width), dtype=np.uint8)
        label[:2] = 255
        Image.fromarray(label).save(base / "annotations_detectron2" / "val" / f"2007_00000{i}.png")


def write_custom(root: Path) -> None:
    """Your own data: `refs.jsonl` (3 images: 3, 1 and 2 expressions; PNG masks, polygons, no target) and
    `scenes.json` (3 images with label maps; value 3 has no name)."""
    (root / "images").mkdir(parents=True)
    for i, (width, height) in enumerate([(24, 20), (18, 22), (20, 20)]):
        random_image(width, height, seed=10 + i).save(root / "images" / f"{i}.png")
        Image.fromarray(box_mask(height, width, 2, 3, 12, 15) * 255).save(root / "images" / f"{i}_mask.png")
        labels = np.random.default_rng(i).integers(0, 4, (height, width), dtype=np.uint8)
        Image.fromarray(labels).save(root / "images" / f"{i}_labels.png")
    records = [
        {"image": "images/0.png", "expressions": ["the red square", "a square"], "mask": "images/0_mask.png"},
        {"image": "images/0.png", "expressions": ["nothing here"], "mask": None},
        {"image": "images/1.png", "expressions": ["the left part"], "mask": [box_polygon(1, 1, 9, 12)]},
        {"image": "images/2.png", "expressions": ["hello square", "segment the red"], "mask": "images/2_mask.png"},
    ]
    (root / "refs.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    scenes = {"classes": [None, "red", "square", None],
              "samples": [{"image": f"images/{i}.png", "label": f"images/{i}_labels.png"} for i in range(3)]}
    (root / "scenes.json").write_text(json.dumps(scenes))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from modeling_selfie.presets import tiny_model_and_processor

    root = tmp_path_factory.mktemp("distributed_evaluation")
    model, processor = tiny_model_and_processor(WORDS, seed=0)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    write_refcoco(root / "data" / "refer_seg")
    write_voc20(root / "data")
    write_custom(root / "custom")
    return root


CASES = {
    "refcoco-default": ["--dataset", "refcoco", "--data-root", "data", "--batch-size", "2"],
    "refcoco-self1e": ["--dataset", "refcoco", "--data-root", "data", "--protocol", "self1e"],
    "voc20": ["--dataset", "voc20", "--data-root", "data", "--batch-size", "8"],
    "custom_referring-default": ["--dataset", "custom_referring", "--annotations", "custom/refs.jsonl",
                                 "--batch-size", "2"],
    "custom_referring-self1e": ["--dataset", "custom_referring", "--annotations", "custom/refs.jsonl",
                                "--protocol", "self1e"],
    "custom_semantic-self1e": ["--dataset", "custom_semantic", "--annotations", "custom/scenes.json",
                               "--protocol", "self1e"],
}  # fmt: skip
RANK0_SHARE = {"refcoco-default": "4/4", "refcoco-self1e": "4/4", "voc20": "2/2", "custom_referring-default": "4/4",
               "custom_referring-self1e": "4/4", "custom_semantic-self1e": "2/2"}  # fmt: skip


def evaluate_args(folders: Path, case: str, output: Path) -> list[str]:
    args = ["--model", str(folders / "model"), *CASES[case], "--output", str(output)]
    return [str(folders / arg) if previous in ("--data-root", "--annotations") else arg
            for previous, arg in zip(["", *args], args)]  # fmt: skip


@pytest.fixture(scope="module")
def one_process(folders):
    """The results of every case in one process, the reference: `modeling_selfie.evaluate.main` (what `python -m
    modeling_selfie.evaluate` runs) called case after case in one fresh Python with the launched processes'
    environment (one start instead of one per case)."""
    outputs = {case: folders / "one" / f"{case}.json" for case in CASES}
    script = "import sys\nfrom modeling_selfie.evaluate import main\n" + "".join(
        f"assert main({evaluate_args(folders, case, output)!r}) == 0\n" for case, output in outputs.items()
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-5000:]
    return {case: json.loads(output.read_text()) for case, output in outputs.items()}


def assert_same_results(one: dict, two: dict) -> None:
    """Everything but the timing and the process count, exactly (floats to the last digit)."""
    assert one["processes"] == 1 and two["processes"] == 2
    one, two = ({key: value for key, value in results.items() if key not in ("time_s", "processes")}
                for results in (one, two))  # fmt: skip
    assert two == one


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_under_torchrun_give_one_process_metrics_to_the_last_digit(tmp_path, folders, one_process,
                                                                                 case):  # fmt: skip
    output = tmp_path / "out" / "two.json"
    run, replaced = launch("torchrun", "modeling_selfie.evaluate", evaluate_args(folders, case, output), tmp_path)
    assert run.stdout.count("\n") == 1 and run.stdout.startswith(CASES[case][1])  # printed once
    assert replaced == [("0", str(output))]  # written once, by rank 0
    assert sorted(path.name for path in output.parent.iterdir()) == ["two.json"]
    # one progress bar (rank 0's) over its share: under self1e whole images (3 + 1 expressions of 3 + 1 + 2)
    bars = [line for line in run.stderr.splitlines() if line.startswith(("referring:", "open-vocab:"))]
    assert bars and f"| {RANK0_SHARE[case]} [" in bars[-1] and sum(" 0/" in line for line in bars) == 1
    assert run.stderr.count("Loading weights:   0%") == 1
    results = json.loads(output.read_text())
    if "expressions" in results:
        assert [record["index"] for record in results["expressions"]] == list(range(results["count"]))
    assert_same_results(one_process[case], results)


def test_two_processes_under_accelerate_launch_give_one_process_metrics(tmp_path, folders, one_process):
    output = tmp_path / "two.json"
    args = evaluate_args(folders, "custom_referring-self1e", output)
    run, replaced = launch("accelerate", "modeling_selfie.evaluate", args, tmp_path)
    assert run.stdout.count("\n") == 1 and replaced == [("0", str(output))]
    assert_same_results(one_process["custom_referring-self1e"], json.loads(output.read_text()))


def test_evaluate_vqa_under_torchrun_scores_the_gathered_answers_once(tmp_path):
    """POPE, 5 questions on 3 images, answered "yes" by a tiny InternVL3: rank 0 scores all 5 answers (3 + 2)."""
    model = tmp_path / "yes_model"
    write_one_word_internvl(model, "yes")
    records = [{"image": f"images/{i % 3}.png", "question": f"Is there a {word} in the image?",
                "answer": answer, "category": category}
               for i, (word, answer, category) in enumerate([("cat", "yes", "random"), ("dog", "no", "random"),
                                                             ("car", "no", "popular"), ("cup", "yes", "popular"),
                                                             ("hat", "no", "adversarial")])]  # fmt: skip
    data = write_data(tmp_path / "pope", records)
    runs = {}
    for launcher in ("none", "torchrun"):
        output = tmp_path / launcher / "pope.json"
        args = ["--benchmark", "pope", "--data", str(data), "--model", str(model), "--output", str(output)]
        runs[launcher] = launch(launcher, "modeling_selfie.evaluate_vqa", args, tmp_path / launcher)
        assert runs[launcher][1] == [("0" if launcher == "torchrun" else "-", str(output))]
    run = runs["torchrun"][0]
    assert run.stdout.count("\n") == 1 and run.stdout.startswith("pope: ")
    assert [line for line in run.stderr.splitlines() if line.startswith("vqa:")][-1].count("| 3/3 [") == 1
    one, two = (json.loads((tmp_path / launcher / "pope.json").read_text()) for launcher in ("none", "torchrun"))
    assert [item["prediction"] for item in two["items"]] == ["yes"] * 5
    assert [item["line"] for item in two["items"]] == [1, 2, 3, 4, 5]
    assert_same_results(one, two)
    assert two["metrics"]["categories"]["random"]["accuracy"] == 0.5


@pytest.mark.parametrize(
    "device, message",
    [("cuda:1", "each of the 2 processes takes its own local device"), ("cuda", "torch sees no CUDA device")],
)
def test_a_launched_process_refuses_a_device_it_cannot_take_as_its_own(monkeypatch, device, message):
    from modeling_selfie import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert distributed.launched()
    with pytest.raises(ValueError, match=message):
        distributed.join_launched_processes(device)
