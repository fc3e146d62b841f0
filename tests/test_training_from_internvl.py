"""`python -m modeling_selfie.training --model INTERNVL3_HF_DIR`: a fine-tuning that starts from a plain InternVL3
folder in the Hub's `-hf` layout (written by transformers' `InternVLForConditionalGeneration`, see
`tests/internvl_artifacts.py`), on hand-written own data, ends in a folder that loads and segments."""

import json
import logging
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_selfie import SelfieForSegmentation, SelfieProcessor
from modeling_selfie.training import main

from .internvl_artifacts import write_internvl3_hf_folder

QUIET = ["--save-strategy", "no", "--report-to", "none", "--disable-tqdm", "true"]


def write_own_data(root):
    """Two images with a PNG mask each, in the `custom_referring` JSONL format."""
    (root / "images").mkdir(parents=True)
    records = []
    for i, colour in enumerate([(220, 30, 30), (30, 30, 220)]):
        image = np.full((48, 64, 3), 128, np.uint8)
        image[8:30, 10 + 20 * i : 34 + 20 * i] = colour
        mask = np.zeros((48, 64), np.uint8)
        mask[8:30, 10 + 20 * i : 34 + 20 * i] = 255
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "images" / f"{i}_mask.png")
        records.append({"image": f"images/{i}.png", "expressions": ["the block"], "mask": f"images/{i}_mask.png"})
    (root / "refs.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


class Records(logging.Handler):
    """Collects the records of a logger (transformers' loggers do not propagate to the root logger)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    records = Records()
    logging.getLogger("transformers").addHandler(records)
    yield records.messages
    logging.getLogger("transformers").removeHandler(records)


OWN_WARNINGS = ("LOAD REPORT", "You are using a model of type", "`gradient_checkpointing` is deprecated",
                "`use_cache=True` is incompatible with gradient checkpointing")


def test_fine_tuning_from_an_internvl3_hf_folder_ends_in_a_model_that_segments(tmp_path, caplog,
                                                                                transformers_warnings):
    """Also: the run warns of nothing of this project's making (the recipe's checkpointing key, loading InternVL
    into SELFIE, the new head's keys); the new head is logged once."""
    plain = write_internvl3_hf_folder(tmp_path / "InternVL3-hf", layout="hub")
    write_own_data(tmp_path / "data")
    recipe = {
        "datasets": [{"name": "custom_referring", "annotations": "refs.jsonl", "rate": 1}],
        "training": {"lora_rank": 4, "lora_alpha": 8, "max_steps": 2, "per_device_train_batch_size": 2,
                     "learning_rate": 1e-3, "activation_checkpointing": True},
    }  # fmt: skip
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = main(["--model", str(tmp_path / "InternVL3-hf"), "--recipe", str(tmp_path / "recipe.json"),
                       "--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"), *QUIET])
    assert status == 0
    said = [str(w.message) for w in caught] + transformers_warnings + [r.getMessage() for r in caplog.records]
    assert [text for text in said if any(own in text for own in OWN_WARNINGS)] == []
    assert sum("SELFIE modules initialised from scratch" in text for text in said) == 1

    final = tmp_path / "run" / "final"
    model = SelfieForSegmentation.from_pretrained(final).eval()
    processor = SelfieProcessor.from_pretrained(final)
    assert processor.seg_token_id == model.config.seg_token_id
    vocab = plain.config.text_config.vocab_size
    # LoRA merged into the LLM: its weights moved; the vision tower (no vision LoRA here) did not
    assert not torch.equal(model.model.language_model.layers[0].self_attn.q_proj.weight,
                           plain.model.language_model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(model.model.vision_tower.embeddings.cls_token, plain.model.vision_tower.embeddings.cls_token)
    assert model.lm_head.weight.shape[0] > vocab
    mask = model.segment(processor, Image.open(tmp_path / "data" / "images" / "0.png"), "the block")[0]
    assert mask.shape == (48, 64) and mask.dtype == torch.bool


def test_real_missing_keys_are_still_reported(tmp_path, transformers_warnings):
    """A checkpoint without a base weight: an error naming it, and transformers' LOAD REPORT is shown."""
    from safetensors.torch import load_file, save_file

    write_internvl3_hf_folder(tmp_path / "plain", layout="hub")
    weights = load_file(tmp_path / "plain" / "model.safetensors")
    dropped = next(key for key in weights if key.endswith("mlp.down_proj.weight"))
    kept = {key: value for key, value in weights.items() if key != dropped}
    save_file(kept, tmp_path / "plain" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 weight"):
        SelfieForSegmentation.from_pretrained(tmp_path / "plain")
    assert any("LOAD REPORT" in text and "down_proj" in text for text in transformers_warnings)
