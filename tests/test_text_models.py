"""Every text model transformers' InternVL carries: Qwen2 (InternVL3), Qwen3 (InternVL3.5) and Llama (InternVL2.5,
whose InternLM2 LLM transformers' conversion stores as Llama). Each starts from a tiny checkpoint written by
transformers' own `InternVLForConditionalGeneration.save_pretrained` (`tests/internvl_artifacts.py`), and the
presets of each base build the published sizes."""

import json

import pytest
import torch

from modeling_selfie import SelfieForSegmentation, SelfieProcessor
from modeling_selfie.presets import preset_config, tiny_model_and_processor, variance_preserving_init_
from modeling_selfie.training import SelfieDataCollator, apply_lora

from .helpers import random_image
from .internvl_artifacts import TEXT_MODELS, write_internvl3_hf_folder
from .test_distributed import toy_sample
from .test_hub import assert_remote_code_segments_as

pytestmark = pytest.mark.usefixtures("one_thread")

DECODER_LAYERS = {"qwen2": "Qwen2DecoderLayer", "qwen3": "Qwen3DecoderLayer", "llama": "LlamaDecoderLayer"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved InternVL folder (and the model that wrote it) per text model."""
    root = tmp_path_factory.mktemp("internvl")
    return {
        name: (root / name, write_internvl3_hf_folder(root / name, layout="saved", text_model=name))
        for name in TEXT_MODELS
    }


@pytest.mark.parametrize("text_model", TEXT_MODELS)
def test_loads_every_base_tensor_and_splits_on_the_text_models_layers(checkpoints, text_model):
    folder, plain = checkpoints[text_model]
    model, info = SelfieForSegmentation.from_pretrained(folder, output_loading_info=True)
    assert [k for k in info["missing_keys"] if not k.startswith("seg_head.")] == []
    assert not info["unexpected_keys"]
    assert model.config.text_config.model_type == text_model
    assert type(model.model.language_model) is type(plain.model.language_model)
    assert set(model._no_split_modules) == {"InternVLVisionLayer", DECODER_LAYERS[text_model]}
    vocab = plain.config.text_config.vocab_size
    ours = model.state_dict()
    for name, tensor in plain.state_dict().items():
        rows = slice(0, vocab) if name.endswith("embed_tokens.weight") or name == "lm_head.weight" else slice(None)
        assert torch.equal(ours[name][rows], tensor), name


@pytest.mark.parametrize("text_model", TEXT_MODELS)
def test_logits_of_a_padded_batch_without_seg_equal_internvl(checkpoints, text_model):
    folder, plain = checkpoints[text_model]
    model = SelfieForSegmentation.from_pretrained(folder).eval()
    processor = SelfieProcessor.from_pretrained(folder)
    prompts = [
        processor.render_conversation([{"role": "user", "content": text}], add_generation_prompt=True)
        for text in ("describe the image", "what colour is the shape on the left of it")
    ]
    inputs = processor(images=[random_image(80, 64), random_image(56, 56, seed=1)], text=prompts)
    tile_grid = inputs.pop("tile_grid")
    real = inputs["attention_mask"].bool()
    assert not real.all()  # the batch is padded
    with torch.no_grad():
        expected = plain(**inputs).logits
        got = model(**inputs, tile_grid=tile_grid).logits
    vocab = plain.config.text_config.vocab_size
    torch.testing.assert_close(got[..., :vocab][real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("text_model", TEXT_MODELS)
def test_segment_returns_masks_made_with_the_dual_pathway(checkpoints, text_model):
    folder, _ = checkpoints[text_model]
    model = SelfieForSegmentation.from_pretrained(folder).eval()
    torch.manual_seed(0)
    variance_preserving_init_(model.seg_head)  # mask logits of order 1 (the untrained head gives ~1e-8)
    processor = SelfieProcessor.from_pretrained(folder)
    image = random_image(80, 64)
    masks = model.segment(processor, image, "the red block")
    assert masks[0].shape == (64, 80) and masks[0].dtype == torch.bool

    inputs = processor(images=[image], queries=["the red block"])
    eager = SelfieForSegmentation.from_pretrained(folder, attn_implementation="eager").eval()
    eager.seg_head.load_state_dict(model.seg_head.state_dict())
    with torch.no_grad():
        dual = model(**inputs).pred_masks[0]
        torch.testing.assert_close(eager(**inputs).pred_masks[0], dual)
        model.config.seg_attention = "causal"  # image tokens no longer see [SEG]: the text model got the pattern
        causal = model(**inputs).pred_masks[0]
    assert (dual - causal).abs().max() > 1e-3 * dual.abs().max()  # float noise is ~1e-6 of it


@pytest.mark.parametrize("text_model", TEXT_MODELS)
def test_one_lora_step_trains_the_text_models_adapters(checkpoints, text_model):
    folder, _ = checkpoints[text_model]
    torch.manual_seed(0)
    model = SelfieForSegmentation.from_pretrained(folder)
    processor = SelfieProcessor.from_pretrained(folder)
    peft_model = apply_lora(model.train(), rank=4, alpha=8, dropout=0.0)
    batch = SelfieDataCollator(processor, max_tiles=1)([toy_sample(0), toy_sample(1)])
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    adapters = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n and "language_model" in n}
    before = {n: p.detach().clone() for n, p in adapters.items()}
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)

    out = peft_model(**batch)
    out.loss.backward()
    optimizer.step()

    assert torch.isfinite(out.loss) and out.mask_bce_loss > 0 and out.text_loss > 0
    assert len(adapters) == 7 * model.config.text_config.num_hidden_layers  # q, k, v, o, gate, up, down
    assert all(adapters[n].grad.abs().sum() > 0 for n in adapters)
    assert all(not torch.equal(adapters[n], before[n]) for n in adapters)


@pytest.mark.parametrize("text_model", TEXT_MODELS)
def test_save_then_load_is_exact(checkpoints, text_model, tmp_path):
    folder, _ = checkpoints[text_model]
    model = SelfieForSegmentation.from_pretrained(folder).eval()
    model.save_pretrained(tmp_path)
    again, info = SelfieForSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert json.loads((tmp_path / "config.json").read_text())["text_config"]["model_type"] == text_model
    theirs = again.state_dict()
    assert theirs.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(theirs[name], tensor), name


@pytest.mark.parametrize("text_model", TEXT_MODELS)
def test_saved_folder_loads_as_remote_code(checkpoints, text_model, tmp_path):
    folder, _ = checkpoints[text_model]
    model = SelfieForSegmentation.from_pretrained(folder).eval()
    processor = SelfieProcessor.from_pretrained(folder)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    assert_remote_code_segments_as(model, processor, tmp_path / "ckpt", tmp_path)


# InternVL3.5 / InternVL2.5 model cards: total parameters, to 0.1 B.
PUBLISHED = {
    "selfie-internvl3.5-2b": ("qwen3", 2.3e9),
    "selfie-internvl3.5-8b": ("qwen3", 8.5e9),
    "selfie-internvl2.5-2b": ("llama", 2.2e9),
    "selfie-internvl2.5-8b": ("llama", 8.1e9),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_presets_of_other_bases_build_their_text_model_at_the_published_size(name):
    text_model, size = PUBLISHED[name]
    config = preset_config(name)
    assert config.text_config.model_type == text_model
    assert config.seg_token_id < config.text_config.vocab_size and config.image_token_id < config.seg_token_id
    with torch.device("meta"):
        model = SelfieForSegmentation(config)
    assert set(model._no_split_modules) == {"InternVLVisionLayer", DECODER_LAYERS[text_model]}
    total = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.seg_head.parameters())
    assert abs(total - size) <= 0.05e9, f"{name}: {total:,} parameters without the head"


def test_sliding_window_layers_are_refused_when_segmenting():
    """The dual-pathway mask is built for full attention: a text model with sliding-window layers (Qwen2's
    `use_sliding_window`) says so instead of silently dropping its window; chat without [SEG] is unaffected."""
    text_config = {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}
    model, processor = tiny_model_and_processor(("red", "circle"), text_config=text_config)
    assert model.config.text_config.layer_types == ["full_attention", "sliding_attention"]
    image = random_image(80, 64)
    with pytest.raises(ValueError, match=r"full-attention layers; this text model also has \['sliding_attention'\]"):
        model.segment(processor, image, "red circle")
    prompt = processor.render_conversation([{"role": "user", "content": "red circle"}], add_generation_prompt=True)
    with torch.no_grad():
        assert model(**processor(images=[image], text=[prompt])).pred_masks is None
