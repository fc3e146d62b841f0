"""The README's "Fine-tune on your own data" section, run as a new user would: its annotation examples saved as the
files it names, the images and masks they point to drawn with PIL, then its first command block run in a shell."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from modeling_selfie import SelfieForSegmentation

REPO = Path(__file__).resolve().parent.parent
SIZE = 64


def readme_section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("### Fine-tune on your own data")
    return text[start : text.index("\n## ", start)]


def code_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def draw_files(root: Path, records: list[dict], scenes: dict) -> None:
    """The images, PNG masks and label maps the examples name (64 x 64)."""
    for path in {r["image"] for r in records} | {s["image"] for s in scenes["samples"]}:
        pixels = np.full((SIZE, SIZE, 3), 180, np.uint8)
        pixels[8:28, 4:24] = (220, 20, 20)  # the red mug
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / path)
    masks = {m for r in records for m in ([r.get("mask")] + r.get("masks", [])) if isinstance(m, str)}
    for path in masks:
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[8:28, 4:24] = 255
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / path)
    for sample in scenes["samples"]:
        labels = np.ones((SIZE, SIZE), np.uint8)  # floor
        labels[30:, 10:50] = 2  # table
        (root / sample["label"]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(labels).save(root / sample["label"])


def test_readme_fine_tune_on_your_own_data(tmp_path):
    section = readme_section()
    (refs,) = code_blocks(section, "jsonl")
    scenes_text, recipe_text = code_blocks(section, "json")
    commands = code_blocks(section, "bash")[0]
    data = tmp_path / "my_data"
    data.mkdir()
    records = [json.loads(line) for line in refs.splitlines() if line.strip()]
    scenes = json.loads(scenes_text)
    (data / "refs.jsonl").write_text(refs)
    (data / "scenes.json").write_text(scenes_text)
    (tmp_path / "my_recipe.json").write_text(recipe_text)
    draw_files(data, records, scenes)
    (tmp_path / "processing").symlink_to(REPO / "processing")

    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    run = subprocess.run(["bash", "-e", "-c", commands], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ok_lines = [line for line in run.stdout.splitlines() if line.startswith("ok ")]
    assert len(ok_lines) == 2 and "5 records, 6 expressions, 1 no-target records" in ok_lines[0]
    assert "| sample_rates " in run.stdout and "| lora_rank " in run.stdout  # the settings table
    final = tmp_path / "runs" / "try" / "final"
    assert SelfieForSegmentation.from_pretrained(final) is not None
    assert {"settings.json", "settings.md", "README.md"} <= {p.name for p in final.iterdir()}
    settings = json.loads((final / "settings.json").read_text())["settings"]
    assert settings["lora_rank"] == {"value": 64, "from": "recipe"}
    assert settings["model_max_length"] == {"value": 512, "from": "recipe"}  # from self1e-seg, which it extends
    assert settings["activation_checkpointing"] == {"value": True, "from": "recipe"}
    assert "resume_from_checkpoint" not in settings and "data_root" not in settings
    assert settings["per_device_train_batch_size"] == {"value": 2, "from": "flag"}
    assert settings["datasets"]["value"] == ["custom_referring", "custom_semantic"]
    written = [p.name for p in (tmp_path / "runs" / "try").iterdir() if p.name.startswith("mug")]
    assert any(name.endswith(".png") for name in written), written


def test_readme_evaluate_on_your_own_data(tmp_path):
    """The section's evaluate commands on its own annotation examples, with a tiny random model as the fine-tune."""
    from modeling_selfie.presets import tiny_model_and_processor

    section = readme_section()
    (refs,) = code_blocks(section, "jsonl")
    scenes_text = code_blocks(section, "json")[0]
    (commands,) = [block for block in code_blocks(section, "bash") if "modeling_selfie.evaluate" in block]
    data = tmp_path / "my_data"
    data.mkdir()
    records = [json.loads(line) for line in refs.splitlines() if line.strip()]
    (data / "refs.jsonl").write_text(refs)
    (data / "scenes.json").write_text(scenes_text)
    draw_files(data, records, json.loads(scenes_text))
    model, processor = tiny_model_and_processor(("mug", "plate", "dog", "floor", "table", "red", "right", "half"))
    model.save_pretrained(tmp_path / "runs" / "try" / "final")
    processor.save_pretrained(tmp_path / "runs" / "try" / "final")

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    commands = commands.replace("python ", f"{sys.executable} ")
    run = subprocess.run(["bash", "-e", "-c", commands], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    scores = json.loads((tmp_path / "runs" / "try" / "refs_scores.json").read_text())
    expressions = scores["expressions"]
    assert scores["count"] == len(expressions) == 6 and set(scores["metrics"]) == {"cIoU", "gIoU", "count", "N-acc",
                                                                                   "T-acc"}  # fmt: skip
    assert [e["query"] for e in expressions] == [text for r in records for text in r["expressions"]]
    assert [e["target_empty"] for e in expressions] == [False] * 5 + [True]  # "a dog": "mask": null
    union = sum(e["union"] for e in expressions)
    assert scores["metrics"]["cIoU"] == (sum(e["intersection"] for e in expressions) / union if union else 1.0)
    assert abs(scores["metrics"]["gIoU"] - sum(e["iou"] for e in expressions) / 6) < 1e-12
    assert scores["metrics"]["N-acc"] == float(expressions[5]["pred_empty"])
    assert scores["metrics"]["T-acc"] == sum(not e["pred_empty"] for e in expressions[:5]) / 5
    semantic = json.loads((tmp_path / "runs" / "try" / "scenes_scores.json").read_text())
    assert semantic["count"] == 1 and set(semantic["metrics"]["per_class_IoU"]) == {"floor", "table"}
    assert 0.0 <= semantic["metrics"]["mIoU"] <= 1.0 and "expressions" not in semantic
