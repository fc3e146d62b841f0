"""The converter: original SELF1E layout in, transformers checkpoint out; anything else refused clearly."""

import json
import shutil
import subprocess
import sys

import pytest

from modeling_selfie import SelfieForSegmentation
from modeling_selfie.convert import ConversionError, convert_checkpoint

from .helpers import REFERENCE


def test_cli_converts_and_the_output_loads(tmp_path):
    out = tmp_path / "hf"
    result = subprocess.run(
        [sys.executable, "-m", "modeling_selfie.convert", "--input", str(REFERENCE / "checkpoint"), "--output", str(out)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    model = SelfieForSegmentation.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "selfie" and config["seg_token_id"] == 245 and config["image_token_id"] == 244
    assert config["tie_word_embeddings"] is False and model.config.bce_loss_weight == 2.0
    assert sum(p.numel() for p in model.parameters()) == 194016


def copy_checkpoint(tmp_path):
    folder = tmp_path / "original"
    shutil.copytree(REFERENCE / "checkpoint", folder)
    return folder


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda f: (f / "config.json").unlink(), "has no config.json"),
        (lambda f: (f / "model.safetensors").unlink(), "holds no model.safetensors"),
        (lambda f: (f / "meta.json").unlink(), "seg_token_id is unknown"),
        (lambda f: (f / "config.json").write_text(json.dumps({"model_type": "llava"})), "model_type='llava'"),
    ],
)
def test_wrong_inputs_are_refused_with_a_reason(tmp_path, breakage, message):
    folder = copy_checkpoint(tmp_path)
    breakage(folder)
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_flags_supply_missing_token_ids(tmp_path):
    folder = copy_checkpoint(tmp_path)
    (folder / "meta.json").unlink()
    model = convert_checkpoint(folder, tmp_path / "out", seg_token_id=245, image_token_id=244)
    assert model.config.seg_token_id == 245


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("good")
    result = subprocess.run(
        [sys.executable, "-m", "modeling_selfie.convert", "--input", str(REFERENCE / "checkpoint"), "--output", str(out)],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and "already exists" in result.stderr and "Traceback" not in result.stderr
    assert (out / "keep.txt").read_text() == "good"
    convert_checkpoint(REFERENCE / "checkpoint", out, overwrite=True)
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left behind
