"""The converter: the authors' release folders (written by hand, tests/release_artifacts.py) in, a complete
transformers folder out; anything else refused with one clear line."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

import modeling_selfie  # noqa: F401  (registers the Auto classes)
from modeling_selfie.convert import ConversionError, convert_checkpoint, main

from .helpers import REFERENCE, random_image
from .internvl_artifacts import (
    load_state,
    write_internvl3_hf_folder,
    write_original_internvl3_folder,
    write_qwen2_internvl_tokenizer,
)
from .release_artifacts import (
    tiny_llm,
    write_lora_checkpoint,
    write_pickled_weights,
    write_release_folder,
    write_training_args,
)

BASE_KINDS = ("original", "hf", "tokenizer")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Base InternVL3 folders the authors' tokenizer comes from, and the original tokenizer's special-token ids."""
    root = tmp_path_factory.mktemp("bases")
    ids = write_original_internvl3_folder(root / "original")
    write_internvl3_hf_folder(root / "hf")
    write_qwen2_internvl_tokenizer(root / "tokenizer")
    return {"root": root, "ids": ids, **{kind: root / kind for kind in BASE_KINDS}}


@pytest.fixture
def release(tmp_path, bases):
    """A released folder (one bf16 model.safetensors + training_args.bin) and the marker its pickle would leave."""
    folder, marker = tmp_path / "ckpt_model", tmp_path / "unpickled"
    state = write_release_folder(folder, bases["ids"], marker=marker)
    return {"folder": folder, "marker": marker, "state": state}


def run_cli(*args):
    command = [sys.executable, "-m", "modeling_selfie.convert", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True)


def test_release_folder_converts_to_a_complete_folder_that_segments(tmp_path, bases, release):
    out = tmp_path / "hf"
    result = run_cli("--input", release["folder"], "--output", out, "--base-tokenizer", bases["original"])
    assert result.returncode == 0, result.stderr

    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    image = random_image(90, 60)
    masks = model.segment(processor, image, ["Red Circle", "the square"])
    assert [tuple(m.shape) for m in masks] == [(60, 90), (60, 90)] and masks[0].dtype == torch.bool

    base_length = len(AutoTokenizer.from_pretrained(bases["original"]))  # 276: the authors' [SEG] is the next id
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "selfie" and config["dtype"] == "bfloat16"
    assert config["seg_token_id"] == base_length == processor.seg_token_id
    assert config["image_token_id"] == bases["ids"]["<IMG_CONTEXT>"] == processor.image_token_id
    assert config["text_config"]["vocab_size"] == base_length + 2 and config["tie_word_embeddings"] is False
    assert model.dtype == torch.bfloat16
    assert model.generation_config.eos_token_id == bases["ids"]["<|im_end|>"]
    assert model.generation_config.pad_token_id == bases["ids"]["<|endoftext|>"]
    assert processor.tokenizer.convert_tokens_to_ids(["[SEG]", "[SEGT]"]) == [base_length, base_length + 1]
    assert processor.system_message == "You are an helpful assistant." and processor.prompt_style == "self1e"
    assert processor.image_processor.max_patches == 1 and processor.image_processor.size.height == 56
    assert processor.image_seq_length == model.config.image_seq_length == 4
    weights = (model.config.text_loss_weight, model.config.bce_loss_weight, model.config.dice_loss_weight)
    assert weights == (1.0, 2.0, 0.5)
    # The authors' evaluation input (template internvl2_5), written out by hand; their RefCOCO loader lowercases the
    # sentence, the processor keeps the query as given.
    expected = (
        "<|im_start|>system\nYou are an helpful assistant.<|im_end|>\n<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 4
        + "</img>\n What is red circle in this image? Please output segmentation mask.<|im_end|>\n"
        "<|im_start|>assistant\n[SEG].<|im_end|>\n"
    )
    inputs = processor(images=[image], queries=[" red circle "])
    assert inputs["input_ids"][0].tolist() == processor.tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert not release["marker"].exists()  # training_args.bin was never unpickled
    assert not (out / "training_args.bin").exists()


def test_converted_tensors_are_the_released_ones_under_the_published_names(tmp_path, bases, release):
    out = convert_checkpoint(release["folder"], tmp_path / "hf", base_tokenizer=bases["original"])
    converted, released = load_state(out), release["state"]
    assert all(t.dtype == torch.bfloat16 for t in converted.values())
    # The mapping of shared/reference/README.md, written out by hand.
    same = {
        "language_model.model.embed_tokens.weight": "model.language_model.embed_tokens.weight",
        "language_model.lm_head.weight": "lm_head.weight",
        "language_model.model.layers.1.self_attn.k_proj.bias": "model.language_model.layers.1.self_attn.k_proj.bias",
        "vision_model.embeddings.class_embedding": "model.vision_tower.embeddings.cls_token",
        "vision_model.embeddings.patch_embedding.weight":
            "model.vision_tower.embeddings.patch_embeddings.projection.weight",
        "vision_model.encoder.layers.1.ls2": "model.vision_tower.encoder.layer.1.lambda_2",
        "vision_model.encoder.layers.0.norm1.weight": "model.vision_tower.encoder.layer.0.layernorm_before.weight",
        "vision_model.encoder.layers.0.attn.proj.weight":
            "model.vision_tower.encoder.layer.0.attention.projection_layer.weight",
        "mlp1.1.weight": "model.multi_modal_projector.linear_1.weight",
        "combine_decode_proj_all.2.weight": "seg_head.pus_llm.fc2.weight",
        "combine_decode_proj_ori.0.bias": "seg_head.pus_vision.fc1.bias",
        "combine_decode_proj.2.weight": "seg_head.proj_out.fc2.weight",
    }
    for original, name in same.items():
        assert torch.equal(converted[name], released[original]), name
    qkv = released["vision_model.encoder.layers.1.attn.qkv.weight"]
    layer = "model.vision_tower.encoder.layer.1.attention"
    split = torch.cat([converted[f"{layer}.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(split, qkv)
    assert sum(t.numel() for t in converted.values()) == sum(t.numel() for t in released.values())


@pytest.mark.parametrize("layout", ["shards", "shards-no-index", "bin", "bin-shards"])
def test_every_weight_layout_gives_the_same_folder(tmp_path, bases, layout):
    single, other = tmp_path / "single", tmp_path / layout
    marker = tmp_path / "unpickled"
    write_release_folder(single, bases["ids"], marker=marker)
    write_release_folder(other, bases["ids"], layout, marker=marker)
    expected = load_state(convert_checkpoint(single, tmp_path / "out-single", base_tokenizer=bases["tokenizer"]))
    got = load_state(convert_checkpoint(other, tmp_path / "out-other", base_tokenizer=bases["tokenizer"]))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) and got[k].dtype == torch.bfloat16 for k in expected)
    assert not marker.exists()


@pytest.mark.parametrize("kind", BASE_KINDS)
def test_seg_tokens_are_derived_as_the_authors_do_from_every_base(tmp_path, bases, release, kind):
    """[SEG] and [SEGT] follow the original InternVL3 vocabulary (rows - 2, rows - 1) whichever base is given; a
    -hf tokenizer's <video>, which the original one lacks, moves after them; every other token keeps its id."""
    out = convert_checkpoint(release["folder"], tmp_path / "hf", base_tokenizer=bases[kind])
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoTokenizer.from_pretrained(bases[kind])
    rows = release["state"]["language_model.model.embed_tokens.weight"].shape[0]
    assert tokenizer.convert_tokens_to_ids(["[SEG]", "[SEGT]"]) == [rows - 2, rows - 1]
    text = "<|im_start|>system\nYou are an helpful assistant.<|im_end|>\n<img><IMG_CONTEXT></img> the <box>x</box>."
    assert tokenizer(text)["input_ids"] == base(text)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(tokenizer("What is [SEG].")["input_ids"])[-2:] == ["[SEG]", "."]
    if "<video>" in base.get_vocab():
        assert tokenizer.convert_tokens_to_ids("<video>") == rows


def test_a_tokenizer_in_the_release_folder_is_used(tmp_path, bases, release):
    first = convert_checkpoint(release["folder"], tmp_path / "first", base_tokenizer=bases["original"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(first / name, release["folder"] / name)
    second = convert_checkpoint(release["folder"], tmp_path / "second")
    assert json.loads((second / "config.json").read_text())["seg_token_id"] == len(
        AutoTokenizer.from_pretrained(bases["original"])
    )
    assert (second / "tokenizer.json").read_text() == (first / "tokenizer.json").read_text()


@pytest.mark.parametrize(
    "with_adapter_config, float32_adapters, use_rslora",
    [(True, True, False), (False, False, False), (True, True, True)],
)
def test_unmerged_lora_checkpoint_is_merged_as_peft_merges_it(
    tmp_path, bases, with_adapter_config, float32_adapters, use_rslora
):
    """Bit for bit what PEFT's `merge_and_unload` makes of the same wrapped model (LoRA factors in float32, PEFT's
    default, or in bf16; rsLoRA scaling from adapter_config.json); alpha from adapter_config.json or the flag."""
    checkpoint = tmp_path / "run" / "checkpoint-500"
    merged = write_lora_checkpoint(
        checkpoint,
        bases["ids"],
        rank=4,
        alpha=8.0,
        adapter_config=with_adapter_config,
        float32_adapters=float32_adapters,
        use_rslora=use_rslora,
    )
    released = tmp_path / "merged"
    write_release_folder(released, bases["ids"])
    (released / "model.safetensors").unlink()
    save_file(merged, released / "model.safetensors", metadata={"format": "pt"})
    expected = load_state(convert_checkpoint(released, tmp_path / "out-merged", base_tokenizer=bases["original"]))

    alpha = None if with_adapter_config else 8.0
    out = convert_checkpoint(checkpoint, tmp_path / "out-lora", base_tokenizer=bases["original"], lora_alpha=alpha)
    got = load_state(out)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    base_layer = load_file(checkpoint / "model.safetensors")[
        "language_model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    ]
    assert not torch.equal(got["model.language_model.layers.0.self_attn.q_proj.weight"], base_layer)  # LoRA is in
    assert not (tmp_path / "run" / "training_args_was_unpickled").exists()


def test_unmerged_checkpoint_without_alpha_is_refused(tmp_path, bases, capsys):
    checkpoint = tmp_path / "checkpoint-500"
    write_lora_checkpoint(checkpoint, bases["ids"], adapter_config=False)
    code = main(
        ["--input", str(checkpoint), "--output", str(tmp_path / "out"), "--base-tokenizer", str(bases["original"])]
    )
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.count("\n") == 0 and error.startswith("error:")
    assert "unmerged checkpoint" in error and "--lora-alpha" in error
    assert not (tmp_path / "out").exists()


def test_unmerged_checkpoint_with_other_peft_tensors_is_refused(tmp_path, bases):
    checkpoint = tmp_path / "checkpoint-500"
    write_lora_checkpoint(checkpoint, bases["ids"])
    state = load_file(checkpoint / "model.safetensors")
    dora = "language_model.base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight"
    state[dora] = torch.ones(64)
    save_file(state, checkpoint / "model.safetensors")
    with pytest.raises(ConversionError, match="Unsupported PEFT tensors .*lora_magnitude_vector"):
        convert_checkpoint(checkpoint, tmp_path / "out", base_tokenizer=bases["original"])
    assert not (tmp_path / "out").exists()


def test_training_args_marker_shows_an_unpickling(tmp_path):
    """The marker the tests look for does appear when the pickle is loaded (so its absence means something)."""
    marker = tmp_path / "unpickled"
    write_training_args(tmp_path, marker)
    torch.load(tmp_path / "training_args.bin", weights_only=False)
    assert marker.exists()


def test_pickled_objects_in_pytorch_model_bin_are_refused(tmp_path, bases):
    folder, marker = tmp_path / "release", tmp_path / "unpickled"
    write_release_folder(folder, bases["ids"], layout="bin", marker=marker)
    write_pickled_weights(folder, marker)
    with pytest.raises(ConversionError, match="pytorch_model.bin holds more than tensors; refused to unpickle"):
        convert_checkpoint(folder, tmp_path / "out", base_tokenizer=bases["original"])
    assert not marker.exists() and not (tmp_path / "out").exists()


def drop_shard(folder):
    (folder / "model-00002-of-00003.safetensors").unlink()


def grow_vocabulary(folder):
    """A release trained from a tokenizer with one more token than the base tokenizer given."""
    config = json.loads((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        state[key] = torch.cat([state[key], state[key][-1:]])
    config["llm_config"]["vocab_size"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, folder / "model.safetensors")


def drop_tensor(folder):
    state = load_file(folder / "model.safetensors")
    del state["combine_decode_proj_ori.2.bias"]
    save_file(state, folder / "model.safetensors")


def edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))

    return edit


@pytest.mark.parametrize(
    "layout, breakage, base, message",
    [
        ("single", lambda f: (f / "config.json").unlink(), True, "has no config.json"),
        ("single", lambda f: (f / "model.safetensors").unlink(), True, "holds no weights"),
        ("shards", drop_shard, True, "lacks the weight file(s) ['model-00002-of-00003.safetensors']"),
        ("shards-no-index", drop_shard, True, "lacks the weight file(s) ['model-00002-of-00003.safetensors']"),
        ("single", lambda f: None, False, "pass --base-tokenizer"),
        ("single", grow_vocabulary, True, "278 with [SEG] and [SEGT], but the checkpoint's embeddings have 279 rows"),
        ("single", drop_tensor, True, "missing ['seg_head.pus_vision.fc2.bias']"),
        ("single", edit_config(model_type="llava"), True, "model_type='llava'"),
        ("single", edit_config(template="vicuna_v1"), True, "template='vicuna_v1'"),
        ("single", edit_config(eos_token_id=5), True, "eos_token_id 5 but the tokenizer's <|im_end|> is 266"),
        ("single", lambda f: (f / "config.json").write_text("{"), True, "config.json is not valid JSON"),
        ("single", lambda f: (f / "model.safetensors").write_bytes(b"\0" * 64), True, "is not a readable safetensors"),
    ],
)
def test_wrong_inputs_are_refused_with_one_line(tmp_path, bases, capsys, layout, breakage, base, message):
    folder, out = tmp_path / "release", tmp_path / "out"
    write_release_folder(folder, bases["ids"], layout)
    breakage(folder)
    argv = ["--input", str(folder), "--output", str(out)]
    argv += ["--base-tokenizer", str(bases["original"])] if base else []
    code = main(argv)
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith("error:") and "\n" not in error, error
    assert message in error, error
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_existing_output_is_kept_unless_overwrite(tmp_path, bases, release):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("good")
    result = run_cli("--input", release["folder"], "--output", out, "--base-tokenizer", bases["original"])
    assert result.returncode == 2 and "already exists" in result.stderr and "Traceback" not in result.stderr
    assert (out / "keep.txt").read_text() == "good"
    convert_checkpoint(release["folder"], out, base_tokenizer=bases["original"], overwrite=True)
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left behind


def test_parity_fixture_with_meta_json_converts_to_the_model(tmp_path):
    """The older side file (meta.json: token ids, loss weights) still works, for a folder without any tokenizer; the
    output then holds the model only, in the input's float32."""
    out = convert_checkpoint(REFERENCE / "checkpoint", tmp_path / "hf")
    model = AutoModelForImageTextToText.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["seg_token_id"] == 245 and config["image_token_id"] == 244 and config["dtype"] == "float32"
    assert model.config.bce_loss_weight == 2.0 and model.config.dice_loss_weight == 0.5
    assert sum(p.numel() for p in model.parameters()) == 194016
    assert not (out / "processor_config.json").exists()


def test_flags_supply_missing_token_ids(tmp_path):
    folder = tmp_path / "original"
    shutil.copytree(REFERENCE / "checkpoint", folder)
    (folder / "meta.json").unlink()
    with pytest.raises(ConversionError, match="seg token id is unknown: pass --base-tokenizer"):
        convert_checkpoint(folder, tmp_path / "refused")
    out = convert_checkpoint(folder, tmp_path / "out", seg_token_id=245, image_token_id=244)
    assert json.loads((out / "config.json").read_text())["seg_token_id"] == 245


def test_flags_must_agree_with_the_tokenizer(tmp_path, bases, release):
    with pytest.raises(ConversionError, match="--seg-token-id gives seg token id 5 but the tokenizer has 276"):
        convert_checkpoint(release["folder"], tmp_path / "out", base_tokenizer=bases["original"], seg_token_id=5)


def test_an_internvl35_release_with_a_qwen3_llm_converts(tmp_path, bases):
    released = write_release_folder(tmp_path / "release", bases["ids"], llm="qwen3")
    out = convert_checkpoint(tmp_path / "release", tmp_path / "hf", base_tokenizer=bases["original"])
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["model_type"] == "qwen3" and config["text_config"]["head_dim"] == 16
    converted = load_state(out)
    same = {  # original name (after "language_model.") -> transformers name
        "model.layers.1.self_attn.k_norm.weight": "model.language_model.layers.1.self_attn.k_norm.weight",
        "model.layers.0.mlp.up_proj.weight": "model.language_model.layers.0.mlp.up_proj.weight",
        "model.norm.weight": "model.language_model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    for original, name in same.items():
        assert torch.equal(converted[name], released[f"language_model.{original}"]), name
    assert sum(t.numel() for t in converted.values()) == sum(t.numel() for t in released.values())
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model.model.language_model).__name__ == "Qwen3Model"
    masks = model.segment(AutoProcessor.from_pretrained(out), random_image(90, 60), "the square")
    assert masks[0].shape == (60, 90)


def test_an_internvl25_release_with_internlm2_converts_to_llama(tmp_path, bases):
    """InternLM2 in its original layout (`tok_embeddings`, packed `attention.wqkv`, `output`) becomes the Llama it
    was written from: same tensors, same logits."""
    released = write_release_folder(tmp_path / "release", bases["ids"], llm="internlm2")
    assert "language_model.model.layers.0.attention.wqkv.weight" in released
    out = convert_checkpoint(tmp_path / "release", tmp_path / "hf", base_tokenizer=bases["original"])
    llm_config = json.loads((tmp_path / "release" / "config.json").read_text())["llm_config"]
    llama = tiny_llm(llm_config, "internlm2").to(torch.bfloat16).eval()
    text_config = json.loads((out / "config.json").read_text())["text_config"]
    assert text_config["model_type"] == "llama" and text_config["rope_parameters"]["rope_type"] == "dynamic"
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    ours = model.state_dict()
    for name, tensor in llama.state_dict().items():
        assert torch.equal(ours[name.replace("model.", "model.language_model.", 1)], tensor), name
    ids = torch.tensor([[5, 17, 200, 3, 99, 42]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, llama(input_ids=ids).logits)
    masks = model.segment(AutoProcessor.from_pretrained(out), random_image(90, 60), "the square")
    assert masks[0].shape == (60, 90)


def test_a_release_whose_llm_is_not_mapped_is_refused_with_one_line(tmp_path, bases, capsys):
    """InternVL2-4B's Phi-3 (packed `qkv_proj` and `gate_up_proj`) is not mapped."""
    write_release_folder(tmp_path / "release", bases["ids"])
    edit = json.loads((tmp_path / "release" / "config.json").read_text())
    edit["llm_config"].update(model_type="phi3", architectures=["Phi3ForCausalLM"])
    (tmp_path / "release" / "config.json").write_text(json.dumps(edit))
    out = tmp_path / "out"
    code = main(["--input", str(tmp_path / "release"), "--output", str(out),
                 "--base-tokenizer", str(bases["original"])])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith("error:") and "\n" not in error, error
    assert "model_type='phi3' ['Phi3ForCausalLM']" in error
    assert ("qwen2 (Qwen2ForCausalLM), qwen3 (Qwen3ForCausalLM), llama (LlamaForCausalLM), "
            "internlm2 (InternLM2ForCausalLM)") in error
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
