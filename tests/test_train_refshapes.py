"""examples/train_refshapes.py, the script that makes the shipped demo model: a two-step run writes a loadable model
folder with a model card carrying measured numbers and the command that made it."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from modeling_selfie import SelfieForSegmentation, SelfieProcessor

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_refshapes.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_refshapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unknown_warmup_kind_is_refused(script):
    with pytest.raises(SystemExit):
        script.main(["--warmup-kinds", "colour=1"])


def test_a_short_run_writes_a_loadable_model_with_its_card(script, tmp_path):
    threads = torch.get_num_threads()
    output = tmp_path / "model"
    try:
        script.main(
            ["--max-steps", "2", "--warmup-steps", "1", "--eval-size", "8", "--output", str(output), "--threads", "1"]
        )
    finally:
        torch.set_num_threads(threads)
    model = SelfieForSegmentation.from_pretrained(output)
    processor = SelfieProcessor.from_pretrained(output)
    assert processor.seg_token_id == model.config.seg_token_id
    results = json.loads((output / "eval_results.json").read_text())
    assert results["overall"]["count"] == 8
    card = (output / "README.md").read_text()
    assert f"| overall | 8 | {results['overall']['cIoU']:.3f} |" in card
    assert "--warmup-kinds colour_shape=2,multi_target=1" in card and "--max-turns 6" in card
    ceiling = results["grid_ceiling"]["overall"]
    assert 0.6 < ceiling["cIoU"] < 1 and ceiling["count"] == 8  # the ground truth itself, at the mask grid's size
    assert f"| {ceiling['cIoU']:.3f} / {ceiling['gIoU']:.3f} |" in card
    assert not (output / "modeling_selfie.py").exists()  # the package's own classes load it
    assert not list(tmp_path.glob(".*"))  # no staging folder left behind
