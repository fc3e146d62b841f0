"""Release folders of the authors' SELF1E training code, written by hand as that code writes them.

What the authors' `trainer.save_model(<run>/ckpt_model)` leaves after merging both LoRA adapters (see
shared/reference/README.md, "What a released SELF1E checkpoint folder holds"):

* `config.json` of their `InternVLChatConfig` (`internvl_chat` / `InternVL3SELF1E`), as transformers 4.x serialises
  it: every generic field of the nested configs included, `torch_dtype` bfloat16, the top-level eos / pad ids, no
  segmentation settings;
* bf16 weights in the original names (`vision_model.*`, `mlp1.*`, `language_model.*`, `combine_decode_proj*`): one
  `model.safetensors`, or shards with (or, as copies often lose it, without) `model.safetensors.index.json`, or the
  `pytorch_model.bin` variant;
* `training_args.bin`, a pickle; here one that leaves a marker file if anything unpickles it;
* no tokenizer: the vocabulary rows are the base tokenizer's plus `[SEG]` and `[SEGT]`.

`write_lora_checkpoint` writes an intermediate `checkpoint-N` folder: the LLM and the ViT wrapped by PEFT's own
`get_peft_model` (keys `language_model.base_model.model.*`, `*.base_layer.*`, `*.lora_A.default.weight`, ...), and
returns what PEFT's `merge_and_unload` makes of it. The tensors start from the reference fixture's tiny checkpoint.
"""

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from .helpers import REFERENCE

# Fields every transformers 4.x config carried into `to_dict()` (generation defaults among them); InternVL's
# released config.json files list them inside `llm_config` and `vision_config`.
LEGACY_CONFIG_FIELDS = {
    "add_cross_attention": False,
    "bad_words_ids": None,
    "begin_suppress_tokens": None,
    "chunk_size_feed_forward": 0,
    "cross_attention_hidden_size": None,
    "decoder_start_token_id": None,
    "diversity_penalty": 0.0,
    "do_sample": False,
    "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0,
    "exponential_decay_length_penalty": None,
    "finetuning_task": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "is_decoder": False,
    "is_encoder_decoder": False,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "length_penalty": 1.0,
    "max_length": 20,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "num_beam_groups": 1,
    "num_beams": 1,
    "num_return_sequences": 1,
    "output_attentions": False,
    "output_hidden_states": False,
    "output_scores": False,
    "prefix": None,
    "problem_type": None,
    "pruned_heads": {},
    "remove_invalid_values": False,
    "repetition_penalty": 1.0,
    "return_dict": True,
    "return_dict_in_generate": False,
    "sep_token_id": None,
    "suppress_tokens": None,
    "task_specific_params": None,
    "temperature": 1.0,
    "tf_legacy_loss": False,
    "tie_encoder_decoder": False,
    "tokenizer_class": None,
    "top_k": 50,
    "top_p": 1.0,
    "torchscript": False,
    "typical_p": 1.0,
    "use_bfloat16": True,
}
LLM_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VIT_LORA_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
SEG_TOKENS = 2  # [SEG] and [SEGT]


def fixture_tensors() -> dict[str, torch.Tensor]:
    """The 77 float32 tensors of the reference fixture's tiny SELF1E checkpoint (original names, vocabulary 256)."""
    return load_file(REFERENCE / "checkpoint" / "model.safetensors")


def released_tensors(vocab_size: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    """The fixture's tensors with `vocab_size` rows in `embed_tokens` and `lm_head` (rows beyond the fixture's 256
    are random, as resized embeddings are after training), in `dtype`."""
    generator = torch.Generator().manual_seed(seed)
    state = fixture_tensors()
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        rows = state[key][:vocab_size]
        extra = torch.randn(vocab_size - rows.shape[0], rows.shape[1], generator=generator)
        state[key] = torch.cat([rows, extra])
    return {key: tensor.to(dtype).contiguous() for key, tensor in state.items()}


def release_config(vocab_size: int, eos_token_id: int, pad_token_id: int, image_size: int = 56) -> dict:
    """config.json of a released folder: the fixture's model with the fields the authors' training writes."""
    fixture = json.loads((REFERENCE / "checkpoint" / "config.json").read_text())
    llm = {**LEGACY_CONFIG_FIELDS, **fixture["llm_config"]}
    llm.update(
        _name_or_path="./pretrained/InternVL3-tiny/llm",
        vocab_size=vocab_size,
        torch_dtype="bfloat16",
        bos_token_id=pad_token_id,
        eos_token_id=pad_token_id,
        pad_token_id=None,
        use_cache=False,
        transformers_version="4.57.1",
    )
    llm.pop("dtype", None)
    vision = {**LEGACY_CONFIG_FIELDS, **fixture["vision_config"], "torch_dtype": "bfloat16", "image_size": image_size}
    vision.pop("dtype", None)
    config = {k: v for k, v in fixture.items() if k not in ("dtype", "llm_config", "vision_config")}
    config.update(
        _name_or_path="./pretrained/InternVL3-tiny",
        architectures=["InternVL3SELF1E"],
        auto_map={
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        },
        model_type="internvl_chat",
        template="internvl2_5",
        force_image_size=image_size,
        use_llm_lora=0,
        use_backbone_lora=0,
        torch_dtype="bfloat16",
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        transformers_version="4.57.1",
        llm_config=llm,
        vision_config=vision,
    )
    return config


class UnpickleMarker:
    """Unpickling this creates the file `path` (through `open`); a test that finds no such file shows that no one
    unpickled it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_training_args(folder: Path, marker: Path) -> Path:
    """`training_args.bin` (what `Trainer` writes with `torch.save(args)`): a pickle that leaves `marker` if it is
    ever unpickled."""
    path = folder / "training_args.bin"
    torch.save({"output_dir": "runs/self1e", "learning_rate": 4e-5, "_marker": UnpickleMarker(marker)}, path)
    return path


def shard_names(count: int, prefix: str = "model", suffix: str = "safetensors") -> list[str]:
    return [f"{prefix}-{i:05d}-of-{count:05d}.{suffix}" for i in range(1, count + 1)]


def write_weights(folder: Path, state: dict[str, torch.Tensor], layout: str = "single") -> list[Path]:
    """Write `state` as transformers 4.x `save_pretrained` does.

    `layout`: `"single"` (model.safetensors), `"shards"` (3 shards + model.safetensors.index.json),
    `"shards-no-index"` (the shards only), `"bin"` (pytorch_model.bin), `"bin-shards"` (2 .bin shards + index).
    Returns the files written.
    """
    keys = sorted(state)
    if layout == "single":
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return [folder / "model.safetensors"]
    if layout == "bin":
        torch.save(state, folder / "pytorch_model.bin")
        return [folder / "pytorch_model.bin"]
    binary = layout == "bin-shards"
    if layout not in ("shards", "shards-no-index", "bin-shards"):
        raise ValueError(layout)
    count = 2 if binary else 3
    names = shard_names(count, "pytorch_model" if binary else "model", "bin" if binary else "safetensors")
    weight_map, files = {}, []
    for i, name in enumerate(names):
        part = {key: state[key] for key in keys[i::count]}
        if binary:
            torch.save(part, folder / name)
        else:
            save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        files.append(folder / name)
    if layout != "shards-no-index":
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        index_name = "pytorch_model.bin.index.json" if binary else "model.safetensors.index.json"
        (folder / index_name).write_text(json.dumps(index, indent=2))
        files.append(folder / index_name)
    return files


def write_release_folder(
    folder: Path,
    token_ids: dict[str, int],
    layout: str = "single",
    marker: Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    llm: str = "qwen2",
) -> dict[str, torch.Tensor]:
    """A released SELF1E folder (`ckpt_model`) trained from the original InternVL3 tokenizer whose special-token ids
    are `token_ids` (as `tests.internvl_artifacts.write_original_internvl3_folder` returns them): vocabulary rows =
    that tokenizer's length + 2 ([SEG], [SEGT]). `llm`: the fixture's Qwen2, or another LLM of the same sizes
    (`swap_llm`).

    Returns the tensors written (original names)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = max(token_ids.values()) + 1 + SEG_TOKENS
    state = released_tensors(vocab_size, dtype)
    config = release_config(vocab_size, token_ids["<|im_end|>"], token_ids["<|endoftext|>"])
    if llm != "qwen2":
        state = swap_llm(state, config, llm)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    write_weights(folder, state, layout)
    write_training_args(folder, marker or folder.parent / "training_args_was_unpickled")
    return state


# ----------------------------------------------------------------------------------------------------------------
# Other LLMs of InternVL releases
# ----------------------------------------------------------------------------------------------------------------

# InternLM2's original names (its remote code `modeling_internlm2.py`) for Llama's; q, k and v are packed apart.
INTERNLM2_NAMES = {
    "model.embed_tokens.": "model.tok_embeddings.",
    "self_attn.o_proj.": "attention.wo.",
    "mlp.gate_proj.": "feed_forward.w1.",
    "mlp.down_proj.": "feed_forward.w2.",
    "mlp.up_proj.": "feed_forward.w3.",
    "input_layernorm.": "attention_norm.",
    "post_attention_layernorm.": "ffn_norm.",
    "lm_head.": "output.",
}
QWEN2_ONLY_FIELDS = ("layer_types", "max_window_layers", "sliding_window", "use_sliding_window")


def internlm2_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """InternLM2's packed `attention.wqkv.weight`: for each key-value head, its group of query heads, then its key
    head, then its value head (rows of `head_dim` each)."""
    groups = zip(q.chunk(kv_heads), k.chunk(kv_heads), v.chunk(kv_heads))  # query head i uses key head i // group
    return torch.cat([torch.cat([q_group, k_head, v_head]) for q_group, k_head, v_head in groups])


def internlm2_layout(llama_state: dict[str, torch.Tensor], kv_heads: int) -> dict[str, torch.Tensor]:
    """A `LlamaForCausalLM` state dict under InternLM2's original names, q / k / v packed into `wqkv`."""
    packed = {}
    for key, tensor in llama_state.items():
        if ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        if ".self_attn.q_proj." in key:
            k, v = (llama_state[key.replace("q_proj", name)] for name in ("k_proj", "v_proj"))
            packed[key.replace("self_attn.q_proj", "attention.wqkv")] = internlm2_wqkv(tensor, k, v, kv_heads)
            continue
        for name, original in INTERNLM2_NAMES.items():
            key = key.replace(name, original)
        packed[key] = tensor
    return packed


def tiny_llm(llm_config: dict, llm: str, seed: int = 3):
    """A random `Qwen3ForCausalLM` (`llm="qwen3"`) or `LlamaForCausalLM` (`"internlm2"`: InternLM2 is a Llama with
    other names) with the sizes of `llm_config`; the same arguments give the same weights."""
    sizes = {key: llm_config[key] for key in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling")}  # fmt: skip
    torch.manual_seed(seed)
    if llm == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**sizes, head_dim=16, tie_word_embeddings=False))
    if llm == "internlm2":
        return LlamaForCausalLM(LlamaConfig(**sizes, tie_word_embeddings=False))
    raise ValueError(llm)


def swap_llm(state: dict[str, torch.Tensor], config: dict, llm: str) -> dict[str, torch.Tensor]:
    """`state` with its LLM replaced by `tiny_llm(config["llm_config"], llm)`, and `config["llm_config"]` updated
    as that release writes it: `"qwen3"` (InternVL3.5: own head_dim, q / k norms) or `"internlm2"` (InternVL2 / 2.5:
    the Llama under InternLM2's original names and packed `wqkv`, remote-code config)."""
    llm_config = config["llm_config"]
    if llm == "internlm2":
        llm_config["rope_scaling"] = {"type": "dynamic", "factor": 2.0}  # InternLM2.5's
    model = tiny_llm(llm_config, llm)
    if llm == "qwen3":
        llm_config.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=16)
        tensors = model.state_dict()
    else:
        for field in QWEN2_ONLY_FIELDS:
            llm_config.pop(field, None)
        llm_config.update(
            model_type="internlm2",
            architectures=["InternLM2ForCausalLM"],
            auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config",
                      "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
            attn_implementation="eager",
            bias=False,
        )  # fmt: skip
        tensors = internlm2_layout(model.state_dict(), llm_config["num_key_value_heads"])
    dtype = state["language_model.lm_head.weight"].dtype
    others = {key: tensor for key, tensor in state.items() if not key.startswith("language_model.")}
    return {**others, **{f"language_model.{key}": t.to(dtype).contiguous() for key, t in tensors.items()}}


# ----------------------------------------------------------------------------------------------------------------
# Intermediate checkpoint-N folders: PEFT-wrapped, not merged
# ----------------------------------------------------------------------------------------------------------------


def module_tree(state: dict[str, torch.Tensor]) -> nn.Module:
    """An `nn.Module` whose `state_dict()` is `state`: a module holding a 2-D `weight` (and maybe a `bias`) and
    nothing else becomes an `nn.Linear`, any other tensor a plain parameter. Lets PEFT wrap the ViT without the
    authors' class."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        path, _, leaf = key.rpartition(".")
        groups.setdefault(path, {})[leaf] = tensor
    root = nn.Module()

    def container(path: str) -> nn.Module:
        module = root
        for name in path.split(".") if path else []:
            if not hasattr(module, name):
                module.add_module(name, nn.Module())
            module = getattr(module, name)
        return module

    for path, tensors in groups.items():
        weight = tensors.get("weight")
        if weight is not None and weight.dim() == 2 and set(tensors) <= {"weight", "bias"}:
            parent, _, name = path.rpartition(".")
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in tensors, dtype=weight.dtype)
            linear.load_state_dict(tensors)
            container(parent).add_module(name, linear)
        else:
            for leaf, tensor in tensors.items():
                container(path).register_parameter(leaf, nn.Parameter(tensor.clone()))
    return root


def lora_wrapped(module: nn.Module, targets: list[str], seed: int, float32_adapters: bool = True, **lora) -> nn.Module:
    """`module` wrapped by PEFT's `get_peft_model` (`lora`: `LoraConfig` arguments) with nonzero LoRA factors (B
    starts at zero in PEFT). PEFT keeps the factors in float32 beside a bf16 model unless `float32_adapters` is
    false."""
    config = LoraConfig(lora_dropout=0.05, target_modules=targets, **lora)
    wrapped = get_peft_model(module, config, autocast_adapter_dtype=float32_adapters)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return wrapped.eval()


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{key}": tensor.detach().clone().contiguous() for key, tensor in state.items()}


def write_lora_checkpoint(
    folder: Path,
    token_ids: dict[str, int],
    rank: int = 4,
    alpha: float = 8.0,
    adapter_config: bool = True,
    float32_adapters: bool = True,
    use_rslora: bool = False,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """A `checkpoint-N` folder: the released tensors with the LLM (`Qwen2ForCausalLM`) and the ViT wrapped by PEFT
    LoRA (rank `rank`, alpha `alpha`), saved unmerged in one model.safetensors, with the trainer's side files.
    With `adapter_config`, PEFT's `adapter_config.json` is saved beside it; `float32_adapters` keeps PEFT's default
    of float32 LoRA factors (else they are in `dtype`); `use_rslora` scales by alpha / sqrt(rank).

    Returns the tensors PEFT's `merge_and_unload` gives (original names): what the converter must produce.
    """
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = max(token_ids.values()) + 1 + SEG_TOKENS
    state = released_tensors(vocab_size, dtype)
    config = release_config(vocab_size, token_ids["<|im_end|>"], token_ids["<|endoftext|>"])
    config.update(use_llm_lora=rank, use_backbone_lora=rank)

    llm_state = {k.removeprefix("language_model."): v for k, v in state.items() if k.startswith("language_model.")}
    llm = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in config["llm_config"].items() if k != "torch_dtype"}))
    llm.load_state_dict(llm_state, strict=True)
    llm.to(dtype)
    vit_state = {k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.")}
    vit = module_tree(vit_state).to(dtype)
    lora = {"r": rank, "lora_alpha": alpha, "use_rslora": use_rslora, "float32_adapters": float32_adapters}
    peft_llm = lora_wrapped(llm, LLM_LORA_TARGETS, seed=1, **lora)
    peft_vit = lora_wrapped(vit, VIT_LORA_TARGETS, seed=2, **lora)

    others = {k: v for k, v in state.items() if not k.startswith(("language_model.", "vision_model."))}
    unmerged = {
        **others,
        **prefixed("language_model", peft_llm.state_dict()),
        **prefixed("vision_model", peft_vit.state_dict()),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(unmerged, folder / "model.safetensors", metadata={"format": "pt"})
    write_training_args(folder, folder.parent / "training_args_was_unpickled")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 500, "log_history": []}))
    if adapter_config:
        peft_llm.peft_config["default"].save_pretrained(folder)

    merged_llm = peft_llm.merge_and_unload().state_dict()
    merged_vit = peft_vit.merge_and_unload().state_dict()
    return {**others, **prefixed("language_model", merged_llm), **prefixed("vision_model", merged_vit)}


def write_pickled_weights(folder: Path, marker: Path) -> None:
    """A `pytorch_model.bin` that holds, besides tensors, an object whose unpickling leaves `marker`: the kind of file
    `torch.load(weights_only=True)` must refuse."""
    state = {"vision_model.embeddings.class_embedding": torch.zeros(1, 1, 32), "payload": UnpickleMarker(marker)}
    torch.save(state, folder / "pytorch_model.bin")
