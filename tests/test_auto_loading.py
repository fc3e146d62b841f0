"""What users load and run: every kind of SELFIE folder - converted from a release by `selfie-convert`, written by
`selfie-train`, by `save_pretrained`, in the layout `hub.push_to_hub` uploads - loads with `AutoModel` as the model
that segments, with the package and as remote code in a process that cannot import it; and every documented command
runs on the converted and the trained folder as a user runs it, in a fresh process.

The release folder and the base tokenizer are written by hand (tests/release_artifacts.py,
tests/internvl_artifacts.py); the images, masks and questions by PIL and json."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

from modeling_selfie import SelfieForSegmentation, SelfieModel
from modeling_selfie.hub import push_to_hub
from modeling_selfie.presets import tiny_model_and_processor

from .helpers import WORDS
from .internvl_artifacts import write_original_internvl3_folder
from .release_artifacts import write_release_folder
from .test_hub import WITHOUT_PACKAGE

REPO = Path(__file__).resolve().parent.parent
SIZE = 48
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
KINDS = ("converted", "trained", "saved", "pushed")


def script(name: str) -> str:
    """The installed console script `name` next to this Python (`pip install -e .`)."""
    path = shutil.which(name, path=str(Path(sys.executable).parent))
    assert path is not None, f"{name} is not installed next to this Python"
    return path


def run(command: list, cwd: Path) -> subprocess.CompletedProcess:
    """`command` in a fresh process from `cwd` (a folder outside the repository); it must succeed."""
    done = subprocess.run([str(part) for part in command], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def write_data(root: Path) -> dict:
    """A picture with a red square (PIL), its mask, a referring annotation file, a training recipe on it and a
    VQA question file."""
    pixels = np.full((SIZE, SIZE, 3), 200, np.uint8)
    pixels[8:28, 10:30] = (220, 20, 20)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:28, 10:30] = 255
    (root / "images").mkdir(parents=True)
    Image.fromarray(pixels).save(root / "images" / "square.png")
    Image.fromarray(mask).save(root / "images" / "square_mask.png")
    records = [{"image": "images/square.png", "expressions": ["red square", "the square"],
                "mask": "images/square_mask.png"}]  # fmt: skip
    (root / "refs.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    recipe = {"name": "tiny", "extends": "self1e-seg",
              "datasets": [{"name": "custom_referring", "annotations": "refs.jsonl", "rate": 2}],
              "training": {"lora_rank": 4, "lora_alpha": 8, "vision_lora_rank": 0,
                           "activation_checkpointing": False}}  # fmt: skip
    (root / "recipe.json").write_text(json.dumps(recipe))
    question = {"image": "images/square.png", "question": "What colour is the square?", "answer": "red"}
    (root / "questions.jsonl").write_text(json.dumps(question) + "\n")
    return {"root": root, "image": root / "images" / "square.png", "refs": root / "refs.jsonl",
            "recipe": root / "recipe.json", "questions": root / "questions.jsonl"}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{kind: folder} of the four kinds, and the data; the converted folder by `selfie-convert` from a release
    folder, the trained one by `selfie-train` from the converted one (as the README trains from a checkpoint)."""
    root = tmp_path_factory.mktemp("folders")
    data = write_data(root / "data")
    ids = write_original_internvl3_folder(root / "InternVL3-base")
    write_release_folder(root / "SELF1E-release", ids)
    run([script("selfie-convert"), "--input", "SELF1E-release", "--output", "converted", "--base-tokenizer",
         "InternVL3-base"], root)  # fmt: skip
    run([script("selfie-train"), "--model", "converted", "--recipe", data["recipe"], "--data-root", data["root"],
         "--output-dir", "run", "--max-steps", "1", "--per-device-train-batch-size", "1",
         "--gradient-accumulation-steps", "1"], root)  # fmt: skip
    model, processor = tiny_model_and_processor(WORDS)
    model.save_pretrained(root / "saved")
    processor.save_pretrained(root / "saved")
    with pytest.MonkeyPatch.context() as patch:  # what push_to_hub uploads, caught before it leaves
        patch.setattr("huggingface_hub.HfApi.create_repo", lambda self, repo_id, **kwargs: None)
        patch.setattr("huggingface_hub.HfApi.upload_folder",
                      lambda self, repo_id, folder_path, **kwargs: shutil.copytree(folder_path, root / "pushed"))
        push_to_hub(model, processor, "team/selfie-tiny")
    kinds = {"converted": root / "converted", "trained": root / "run" / "final", "saved": root / "saved",
             "pushed": root / "pushed"}  # fmt: skip
    return {"root": root, "data": data, **kinds}


def segment(model, processor, image_path: Path) -> torch.Tensor:
    image = Image.open(image_path).convert("RGB")
    return model.segment(processor, image, ["red square"])[0]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_folder_loads_with_automodel_and_segments(folders, kind):
    folder = folders[kind]
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == auto_map["AutoModelForImageTextToText"] == "modeling_selfie.SelfieForSegmentation"
    model = AutoModel.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert type(model) is SelfieForSegmentation
    assert type(AutoModelForImageTextToText.from_pretrained(folder)) is SelfieForSegmentation
    mask = segment(model, processor, folders["data"]["image"])
    assert mask.dtype == torch.bool and mask.shape == (SIZE, SIZE)


REMOTE_SEGMENT = WITHOUT_PACKAGE + textwrap.dedent(
    """
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor
    image = Image.open(sys.argv[1]).convert("RGB")
    results = {}
    for folder in sys.argv[2:]:
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        other = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
        mask = model.segment(processor, image, ["red square"])[0]
        results[folder] = {"class": type(model).__name__, "other": type(other).__name__,
                           "module": type(model).__module__, "mask": mask.numpy().astype(int).tolist()}
    print(json.dumps(results))
    """
)


def test_every_kind_of_folder_segments_as_remote_code_without_the_package(folders, tmp_path):
    """AutoModel with `trust_remote_code=True` in a fresh process whose imports cannot find this package: the
    class comes from the folder, and its masks equal the package's."""
    (tmp_path / "check.py").write_text(REMOTE_SEGMENT)
    paths = [str(folders[kind]) for kind in KINDS]
    done = run([sys.executable, "check.py", folders["data"]["image"], *paths], tmp_path)
    remote = json.loads(done.stdout.strip().splitlines()[-1])
    for kind, path in zip(KINDS, paths):
        assert remote[path]["class"] == remote[path]["other"] == "SelfieForSegmentation", kind
        assert remote[path]["module"].startswith("transformers_modules."), kind
        ours = segment(AutoModel.from_pretrained(path), AutoProcessor.from_pretrained(path), folders["data"]["image"])
        assert np.array_equal(np.array(remote[path]["mask"], dtype=bool), ours.numpy()), kind


def test_base_model_checkpoints_load_both_ways(folders, tmp_path):
    """`SelfieModel` is the base model (`base_model_prefix`): a SELFIE checkpoint loads into it, and its own
    checkpoint into `SelfieForSegmentation` with the heads reported as new."""
    full = SelfieForSegmentation.from_pretrained(folders["saved"])
    base = SelfieModel.from_pretrained(folders["saved"])
    for name, value in base.state_dict().items():
        assert torch.equal(value, full.model.state_dict()[name]), name
    base.save_pretrained(tmp_path / "base")
    assert json.loads((tmp_path / "base" / "config.json").read_text())["auto_map"]["AutoModel"] == (
        "modeling_selfie.SelfieForSegmentation"
    )
    again, info = AutoModel.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert type(again) is SelfieForSegmentation
    assert {key.split(".")[0] for key in info["missing_keys"]} == {"seg_head", "lm_head"}
    for name, value in base.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[name]), name


@pytest.mark.parametrize("kind", ("converted", "trained"))
def test_documented_commands_run_on_the_folder(folders, kind, tmp_path):
    """`selfie-segment`, `python -m selfie_segment`, `python -m modeling_selfie.evaluate` / `selfie-evaluate`,
    `python -m modeling_selfie.evaluate_vqa` and `python -m modeling_selfie.training` as a user types them, each in a
    fresh process (where the package does not register its Auto classes at import)."""
    folder, data = folders[kind], folders["data"]
    segment_command = [script("selfie-segment")]
    if kind == "trained":
        segment_command = [sys.executable, "-m", "selfie_segment"]
    done = run([*segment_command, data["image"], "red square", "--model", folder, "--output", "out/",
                "--json", "masks.json"], tmp_path)  # fmt: skip
    (record,) = json.loads((tmp_path / "masks.json").read_text())
    assert record["segmentation"]["size"] == [SIZE, SIZE] and (tmp_path / "out" / "square_mask.png").is_file()
    assert "presence" in done.stdout

    evaluate_command = [sys.executable, "-m", "modeling_selfie.evaluate"] if kind == "converted" else [
        script("selfie-evaluate")]  # fmt: skip
    run([*evaluate_command, "--model", folder, "--dataset", "custom_referring", "--annotations", data["refs"],
         "--output", "scores.json", "--device", "cpu"], tmp_path)  # fmt: skip
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["count"] == 2 and 0.0 <= scores["metrics"]["cIoU"] <= 1.0

    run([sys.executable, "-m", "modeling_selfie.evaluate_vqa", "--benchmark", "gqa", "--data", data["questions"],
         "--model", folder, "--output", "vqa.json", "--device", "cpu"], tmp_path)  # fmt: skip
    results = json.loads((tmp_path / "vqa.json").read_text())
    assert results["count"] == 1 and isinstance(results["items"][0]["prediction"], str)

    if kind == "trained":  # training again from a trained folder (selfie-train made it from the converted one)
        run([sys.executable, "-m", "modeling_selfie.training", "--model", folder, "--recipe", data["recipe"],
             "--data-root", data["root"], "--output-dir", "again", "--max-steps", "1",
             "--per-device-train-batch-size", "1", "--gradient-accumulation-steps", "1"], tmp_path)  # fmt: skip
        assert type(AutoModel.from_pretrained(tmp_path / "again" / "final")) is SelfieForSegmentation
