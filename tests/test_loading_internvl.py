"""Starting SELFIE from real InternVL3 checkpoints: every layout they come in loads whole and exact.

The checkpoints are written by transformers' own `InternVLForConditionalGeneration` (model_type `internvl`) and
renamed by hand to the Hub's `-hf` key layout (`tests/internvl_artifacts.py`), never from SELFIE presets.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from transformers import AutoTokenizer

from modeling_selfie import SelfieForSegmentation, SelfieProcessor

from .internvl_artifacts import LAYOUTS, load_state, write_internvl3_hf_folder


def text_inputs(model, length: int = 9):
    vocab = model.config.text_config.vocab_size
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, min(vocab, 256), (2, length), generator=generator)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_internvl_layout_loads_every_base_tensor(tmp_path, layout, tie):
    plain = write_internvl3_hf_folder(tmp_path, layout=layout, tie_word_embeddings=tie)
    model, info = SelfieForSegmentation.from_pretrained(tmp_path, output_loading_info=True)

    assert [k for k in info["missing_keys"] if not k.startswith("seg_head.")] == []
    assert not info["unexpected_keys"]
    vocab = plain.config.text_config.vocab_size
    ours = model.state_dict()
    for name, tensor in plain.state_dict().items():
        if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            assert torch.equal(ours[name][:vocab], tensor), name  # the [SEG] row is appended after them
        else:
            assert torch.equal(ours[name], tensor), name
    assert model.config.tie_word_embeddings == tie
    assert (model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) == tie


@pytest.mark.parametrize("layout", ["hub", "saved"])
def test_without_seg_the_logits_equal_internvl(tmp_path, layout):
    plain = write_internvl3_hf_folder(tmp_path, layout=layout)
    model = SelfieForSegmentation.from_pretrained(tmp_path).eval()
    input_ids = text_inputs(plain)
    with torch.no_grad():
        expected = plain(input_ids=input_ids).logits
        got = model(input_ids=input_ids).logits
    vocab = plain.config.text_config.vocab_size
    assert torch.allclose(got[..., :vocab], expected, atol=1e-5)


def test_seg_gets_the_id_the_folders_tokenizer_gives_it(tmp_path):
    """The Hub's tokenizer may hold tokens past the model's rows (here `<video>`): [SEG] takes the tokenizer's next
    id, the rows in between are added, and the processor of the same folder agrees."""
    plain = write_internvl3_hf_folder(tmp_path, layout="hub")
    tokenizer_length = len(AutoTokenizer.from_pretrained(tmp_path))
    vocab = plain.config.text_config.vocab_size
    assert tokenizer_length == vocab + 1
    model = SelfieForSegmentation.from_pretrained(tmp_path)
    assert model.config.seg_token_id == tokenizer_length == SelfieProcessor.from_pretrained(tmp_path).seg_token_id
    rows = model.get_input_embeddings().weight
    assert rows.shape[0] == model.lm_head.weight.shape[0] == tokenizer_length + 1
    assert torch.allclose(rows[vocab:], plain.get_input_embeddings().weight.mean(0).expand(2, -1))


def test_without_a_tokenizer_seg_is_appended(tmp_path):
    plain = write_internvl3_hf_folder(tmp_path, layout="hub")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / file).unlink()
    model = SelfieForSegmentation.from_pretrained(tmp_path)
    assert model.config.seg_token_id == plain.config.text_config.vocab_size


def test_save_then_load_is_exact(tmp_path):
    write_internvl3_hf_folder(tmp_path / "hf", layout="hub")
    model = SelfieForSegmentation.from_pretrained(tmp_path / "hf")
    model.save_pretrained(tmp_path / "selfie")
    again, info = SelfieForSegmentation.from_pretrained(tmp_path / "selfie", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert again.config.seg_token_id == model.config.seg_token_id
    theirs = again.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(theirs[name], tensor), name


def test_a_missing_base_weight_is_an_error_naming_it(tmp_path):
    write_internvl3_hf_folder(tmp_path, layout="hub")
    state = load_state(tmp_path)
    dropped = "language_model.model.layers.1.mlp.down_proj.weight"
    del state[dropped]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.language_model\.layers\.1\.mlp\.down_proj\.weight"):
        SelfieForSegmentation.from_pretrained(tmp_path)


def test_an_untied_checkpoint_without_lm_head_is_an_error(tmp_path):
    write_internvl3_hf_folder(tmp_path, layout="hub", tie_word_embeddings=False)
    state = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if "lm_head" not in k}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight"):
        SelfieForSegmentation.from_pretrained(tmp_path)


def test_internvl_config_without_a_tie_flag_keeps_internvl_default(tmp_path):
    """Older `-hf` configs leave `tie_word_embeddings` out: InternVL ties then, so SELFIE must too (else the
    output embedding would be drawn at random)."""
    write_internvl3_hf_folder(tmp_path, layout="hub", tie_word_embeddings=True)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["tie_word_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = SelfieForSegmentation.from_pretrained(tmp_path)
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
