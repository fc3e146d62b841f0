"""The main job: `selfie-segment IMAGE PROMPT` writes a mask and an overlay; bad input gets one clear line."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from modeling_selfie.cli import default_model_dir, main, render_overlay
from modeling_selfie.presets import tiny_model_and_processor

from .helpers import WORDS, random_image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    model, processor = tiny_model_and_processor(WORDS)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_segments_an_image_and_writes_mask_and_overlay(model_dir, tmp_path, capsys):
    image_path = tmp_path / "scene.png"
    random_image(80, 64).save(image_path)
    code = main([str(image_path), "red circle", "--model", str(model_dir), "--output", str(tmp_path / "out")])
    assert code == 0
    mask = np.array(Image.open(tmp_path / "out_mask.png"))
    overlay = Image.open(tmp_path / "out_overlay.png")
    assert mask.shape == (64, 80) and set(np.unique(mask)) <= {0, 255}
    assert overlay.size[0] == 80 and overlay.size[1] > 64  # caption band under the picture
    line = capsys.readouterr().out.strip()
    assert line.startswith("'red circle': mask of") and "out_mask.png" in line and "out_overlay.png" in line
    assert f"{int((mask > 0).sum())} px" in line


def test_overlay_tints_only_the_mask():
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:8, 5:15] = True
    picture = np.array(render_overlay(image, mask, "x"))[:10]
    assert picture[mask].any(axis=-1).all() and not picture[~mask].any()


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda d: None, ["missing.png", "red circle"], "image not found"),
        (lambda d: (d / "bad.png").write_bytes(b"not an image"), ["bad.png", "red circle"], "cannot read image"),
        (lambda d: random_image(8, 8).save(d / "ok.png"), ["ok.png", "   "], "the prompt is empty"),
        (lambda d: (d / "empty_model").mkdir(), ["ok.png", "red", "--model", "empty_model"], "not a model folder"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(tmp_path, setup, args, message):
    random_image(8, 8).save(tmp_path / "ok.png")
    setup(tmp_path)
    result = subprocess.run([sys.executable, "-m", "modeling_selfie.cli", *args], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*_mask.png"))


def test_the_shipped_model_is_in_the_package():
    folder = default_model_dir()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "README.md").read_text().count("cIoU") >= 1
    assert sum(f.stat().st_size for f in folder.iterdir()) < 40 * 2**20  # issue 13: under 40 MB
