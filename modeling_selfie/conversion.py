"""The conversion behind `python -m modeling_selfie.convert` (see `modeling_selfie.convert` for what it reads,
writes and refuses): original SELF1E checkpoint folder -> complete transformers folder."""

import json
import pickle
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GenerationConfig
from transformers.utils import logging

from .configuration_selfie import SelfieConfig
from .io_utils import atomic_output_dir
from .modeling_selfie import SelfieForSegmentation
from .processing_selfie import SELF1E_SYSTEM_MESSAGE, SEG_TOKEN, SelfieImageProcessor, SelfieProcessor

logger = logging.get_logger(__name__)


class ConversionError(ValueError):
    """The input is not an original SELF1E checkpoint we can convert; the message says what is wrong."""


# The tokens the authors' code adds to the base tokenizer, in this order (`[SEGT]` is unused but takes a row).
AUTHORS_ADDED_TOKENS = (SEG_TOKEN, "[SEGT]")
IMAGE_CONTEXT_TOKEN, TURN_END_TOKEN = "<IMG_CONTEXT>", "<|im_end|>"
PROMPT_TOKENS = (SEG_TOKEN, IMAGE_CONTEXT_TOKEN, "<img>", "</img>", "<|im_start|>", TURN_END_TOKEN)
# Added tokens of the original InternVL3 tokenizer (its vocabulary ends with them).
INTERNVL_TOKENS = (*PROMPT_TOKENS, "<|endoftext|>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
AUTHORS_TEMPLATE = "internvl2_5"
# llm_config fields that describe the training run, not the model (`use_cache` is off there for checkpointing).
RUN_SETTINGS = (
    "architectures", "auto_map", "_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"
)
EMBEDDING_KEYS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")
# LLMs (llm_config.model_type) the converter maps: Qwen2 (InternVL3), Qwen3 (InternVL3.5) and Llama, whose original
# tensors carry transformers' own names under `language_model.`, and InternLM2 (InternVL2 / InternVL2.5), converted
# to Llama as transformers' InternVL conversion converts it (`internlm2_as_llama`).
SUPPORTED_LLMS = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "internlm2": "InternLM2ForCausalLM",
}
# InternLM2's original names -> Llama's (the facts of transformers' InternVL conversion script); q, k and v are
# packed in one `attention.wqkv`, split by `split_wqkv`.
INTERNLM2_RULES = [
    (r"^language_model\.model\.tok_embeddings\.", "language_model.model.embed_tokens."),
    (r"^language_model\.output\.", "language_model.lm_head."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
]
WQKV = re.compile(r"^(language_model\.model\.layers\.\d+)\.attention\.wqkv\.weight$")

# Original name (regex) -> transformers name. The ViT's fused qkv is split separately.
KEY_RULES = [
    (r"^vision_model\.embeddings\.patch_embedding\.", "model.vision_tower.embeddings.patch_embeddings.projection."),
    (r"^vision_model\.embeddings\.class_embedding$", "model.vision_tower.embeddings.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "model.vision_tower.embeddings.position_embeddings"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.", r"model.vision_tower.encoder.layer.\1.attention.projection_layer."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.q_norm\.", r"model.vision_tower.encoder.layer.\1.attention.q_norm."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.k_norm\.", r"model.vision_tower.encoder.layer.\1.attention.k_norm."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls1$", r"model.vision_tower.encoder.layer.\1.lambda_1"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls2$", r"model.vision_tower.encoder.layer.\1.lambda_2"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm1\.", r"model.vision_tower.encoder.layer.\1.layernorm_before."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm2\.", r"model.vision_tower.encoder.layer.\1.layernorm_after."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"model.vision_tower.encoder.layer.\1.mlp."),
    (r"^mlp1\.0\.", "model.multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "model.multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "model.multi_modal_projector.linear_2."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^combine_decode_proj_all\.0\.", "seg_head.pus_llm.fc1."),
    (r"^combine_decode_proj_all\.2\.", "seg_head.pus_llm.fc2."),
    (r"^combine_decode_proj_ori\.0\.", "seg_head.pus_vision.fc1."),
    (r"^combine_decode_proj_ori\.2\.", "seg_head.pus_vision.fc2."),
    (r"^combine_decode_proj\.0\.", "seg_head.proj_out.fc1."),
    (r"^combine_decode_proj\.2\.", "seg_head.proj_out.fc2."),
]
QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")

# PEFT's wrapping inside an unmerged checkpoint-N.
PEFT_WRAPPER = re.compile(r"^(language_model|vision_model)\.base_model\.model\.")
LORA_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>A|B)\.(?P<adapter>[^.]+)\.weight$")
PEFT_OTHER = re.compile(r"\.(lora_\w+|modules_to_save|original_module)\.")  # DoRA, embedding LoRA, saved modules


def convert_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and split the ViT's qkv) of an original SELF1E state dict; unknown keys raise `ConversionError`."""
    converted, unknown = {}, []
    for key, tensor in original.items():
        qkv = QKV.match(key)
        if qkv:
            layer, kind = qkv.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                converted[f"model.vision_tower.encoder.layer.{layer}.attention.{name}.{kind}"] = part.clone()
            continue
        for pattern, replacement in KEY_RULES:
            new_key, hits = re.subn(pattern, replacement, key)
            if hits:
                converted[new_key] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"Unknown tensors in the original checkpoint (not SELF1E layout?): {sorted(unknown)[:8]}")
    return converted


def split_wqkv(wqkv: torch.Tensor, num_heads: int, num_key_value_heads: int) -> list[torch.Tensor]:
    """Llama's q, k and v projections from InternLM2's packed `wqkv` `[(heads + 2 * kv_heads) * head_dim, D]`,
    whose rows hold, for each key-value head in turn, the `heads / kv_heads` query heads that share it, its key head
    and its value head."""
    group = num_heads // num_key_value_heads
    blocks = wqkv.unflatten(0, (num_key_value_heads, group + 2, -1))  # [kv_heads, group + 2, head_dim, D]
    return [part.flatten(0, -2).clone() for part in (blocks[:, :group], blocks[:, -2], blocks[:, -1])]


def internlm2_as_llama(original: dict, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A release whose LLM is InternLM2 as the same release with that LLM as Llama (config and tensors under Llama's
    original names), as transformers' InternVL conversion stores InternVL2.5; any other release unchanged."""
    llm = original.get("llm_config")
    if not isinstance(llm, dict) or llm.get("model_type") != "internlm2":
        return original, state
    if llm.get("bias"):
        raise ConversionError("llm_config sets bias=true: only InternLM2 without biases (InternVL2 / 2.5) is mapped.")
    heads = llm.get("num_attention_heads")
    kv_heads = llm.get("num_key_value_heads") or heads
    if not isinstance(heads, int) or not isinstance(kv_heads, int) or min(heads, kv_heads) < 1:
        raise ConversionError(f"llm_config gives no usable head counts ({heads}, {kv_heads}) to split attention.wqkv.")
    converted = {}
    for key, tensor in state.items():
        packed = WQKV.match(key)
        if packed:
            if heads % kv_heads or tensor.shape[0] % (heads + 2 * kv_heads):
                raise ConversionError(
                    f"{key} has {tensor.shape[0]} rows: not q, k and v of {heads} heads with {kv_heads} key-value "
                    "heads (llm_config)."
                )
            for name, part in zip(("q_proj", "k_proj", "v_proj"), split_wqkv(tensor, heads, kv_heads)):
                converted[f"{packed[1]}.self_attn.{name}.weight"] = part
            continue
        if key.startswith("language_model."):
            for pattern, replacement in INTERNLM2_RULES:
                key = re.sub(pattern, replacement, key)
        converted[key] = tensor
    llama = {k: v for k, v in llm.items() if k not in ("bias", "attn_implementation")}
    llama["model_type"] = "llama"
    return {**original, "llm_config": llama}, converted


# ----------------------------------------------------------------------------------------------------------------
# Reading the weights
# ----------------------------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    """A JSON object from `path`; anything else is a `ConversionError` naming the file."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} does not hold a JSON object.")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, safetensors first (as transformers prefers them): the index's shards,
    the single file, or shards named `*-0000k-of-0000n.*` found without an index (all n of them required)."""
    for stem, suffix in (("model", "safetensors"), ("pytorch_model", "bin")):
        index = folder / f"{stem}.{suffix}.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index} is not a weight index (no weight_map).")
            names = sorted(set(weight_map.values()))
        elif (folder / f"{stem}.{suffix}").is_file():
            names = [f"{stem}.{suffix}"]
        else:
            shards = sorted(folder.glob(f"{stem}-*-of-*.{suffix}"))
            if not shards:
                continue
            counts = {re.search(r"-of-(\d+)\.", p.name).group(1) for p in shards}
            if len(counts) != 1:
                raise ConversionError(f"{folder} mixes shard sets {sorted(counts)} of {stem}-*.{suffix}.")
            count = counts.pop()
            names = [f"{stem}-{i:0{len(count)}d}-of-{count}.{suffix}" for i in range(1, int(count) + 1)]
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise ConversionError(f"{folder} lacks the weight file(s) {missing}.")
        return [folder / name for name in names]
    raise ConversionError(
        f"{folder} holds no weights: expected model.safetensors, model-*-of-*.safetensors shards (with or without "
        "model.safetensors.index.json) or pytorch_model.bin."
    )


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of one file; `.bin` files are read with `weights_only=True`, so no pickled object is ever built."""
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as error:  # safetensors raises its own SafetensorError on a damaged file
            raise ConversionError(f"{path.name} is not a readable safetensors file: {error}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0]
        raise ConversionError(f"{path.name} holds more than tensors; refused to unpickle it ({first_line}).") from None
    except (RuntimeError, EOFError) as error:
        raise ConversionError(f"{path.name} is not a readable PyTorch weight file: {error}") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ConversionError(f"{path.name} is not a state dict of tensors.")
    return state


def load_original_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder's weight files (see `weight_files`)."""
    state = {}
    for path in weight_files(folder):
        state.update(read_weight_file(path))
    return state


# ----------------------------------------------------------------------------------------------------------------
# Unmerged LoRA (checkpoint-N folders)
# ----------------------------------------------------------------------------------------------------------------


def is_unmerged(state: dict[str, torch.Tensor]) -> bool:
    return any(PEFT_WRAPPER.match(key) for key in state)


def read_lora_alpha(folder: Path, lora_alpha: float | None) -> tuple[float, bool]:
    """LoRA alpha (the flag, else `adapter_config.json`) and whether rsLoRA scaling (alpha / sqrt(r)) applies."""
    config_path = folder / "adapter_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    for option in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if config.get(option):
            raise ConversionError(f"{config_path} sets {option}; only plain LoRA can be merged.")
    if config.get("alpha_pattern"):
        raise ConversionError(f"{config_path} sets alpha_pattern; only one LoRA alpha for all modules is supported.")
    if lora_alpha is None:
        lora_alpha = config.get("lora_alpha")
    if lora_alpha is None:
        raise ConversionError(
            f"{folder} is an unmerged checkpoint (PEFT LoRA keys) without adapter_config.json: pass --lora-alpha "
            "(the LoRA alpha of the training run; the merge adds alpha / rank * B @ A), or convert the merged "
            "release folder instead."
        )
    return float(lora_alpha), bool(config.get("use_rslora", False))


def merge_lora(state: dict[str, torch.Tensor], lora_alpha: float, use_rslora: bool = False) -> dict[str, torch.Tensor]:
    """Unwrap PEFT's keys and merge each LoRA pair into its base weight as PEFT's `merge_and_unload` does on CPU:
    the delta `(B @ A) * alpha / r` computed in float32 and kept in the LoRA factors' dtype, then added in place to
    the weight (PEFT's adapters are often float32 beside a bf16 model: the sum is then rounded once). The base
    weights of `state` are updated in place (no second copy of a large model)."""
    plain, factors, adapters = {}, {}, set()
    for key, tensor in state.items():
        key = PEFT_WRAPPER.sub(r"\1.", key)
        lora = LORA_FACTOR.match(key)
        if lora:
            factors[lora["module"], lora["factor"]] = tensor
            adapters.add(lora["adapter"])
        else:
            plain[key.replace(".base_layer.", ".")] = tensor
    leftovers = sorted(key for key in plain if PEFT_OTHER.search(key))
    if leftovers:
        raise ConversionError(f"Unsupported PEFT tensors (only LoRA A/B pairs can be merged): {leftovers[:8]}")
    if len(adapters) > 1:
        raise ConversionError(f"The checkpoint holds several LoRA adapters {sorted(adapters)}; expected one.")
    modules = sorted({module for module, _ in factors})
    for module in modules:
        if (module, "A") not in factors or (module, "B") not in factors or f"{module}.weight" not in plain:
            raise ConversionError(f"LoRA of {module} is incomplete (needs lora_A, lora_B and the base weight).")
        lora_a, lora_b = factors[module, "A"], factors[module, "B"]
        rank = lora_a.shape[0]
        scale = lora_alpha / (rank**0.5 if use_rslora else rank)
        delta = ((lora_b.float() @ lora_a.float()) * scale).to(lora_b.dtype)
        plain[f"{module}.weight"].add_(delta)  # in the weight's dtype: a float32 delta is rounded once
    logger.info(f"Merged {len(modules)} LoRA pairs (alpha {lora_alpha}).")
    return plain


# ----------------------------------------------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------------------------------------------


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def segmentation_tokenizer(folder: Path, base: Path | None, rows: int):
    """The tokenizer of the converted model: `base`'s (or `folder`'s) with `[SEG]` and `[SEGT]` added as the
    authors add them when it lacks `[SEG]`; `None` when neither folder has a tokenizer."""
    source = base if base is not None else (folder if has_tokenizer(folder) else None)
    if source is None:
        return None
    if not has_tokenizer(source):
        raise ConversionError(f"--base-tokenizer {source} holds no tokenizer (tokenizer.json / tokenizer_config.json).")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as error:
        raise ConversionError(f"Cannot load the tokenizer of {source}: {error}") from None
    if token_id(tokenizer, SEG_TOKEN) is None:
        tokenizer = add_authors_tokens(tokenizer, rows)
    return tokenizer


def add_authors_tokens(tokenizer, rows: int):
    """`add_tokens(["[SEG]"])` then `add_tokens(["[SEGT]"])`, as the authors' code does on the original InternVL3
    tokenizer, whose length is the checkpoint's vocabulary rows - 2.

    A `-hf` folder's tokenizer holds tokens after the original ones that no SELF1E prompt uses (`<video>`); the
    authors' vocabulary had none, so they are moved after `[SEGT]`, where `[SEG]` and `[SEGT]` keep the authors' ids.
    """
    base_size = rows - len(AUTHORS_ADDED_TOKENS)
    later = unused_tokens(tokenizer, base_size)
    if len(tokenizer) - len(later) != base_size:
        raise ConversionError(
            f"The base tokenizer has {len(tokenizer) - len(later)} tokens, {len(tokenizer) - len(later) + 2} with "
            f"[SEG] and [SEGT], but the checkpoint's embeddings have {rows} rows: --base-tokenizer must be the "
            "tokenizer of the InternVL3 model this checkpoint was trained from."
        )
    for token in AUTHORS_ADDED_TOKENS:
        tokenizer.add_tokens([token])
    if later:
        logger.info(f"Tokens {later} of the base tokenizer are not in the authors' vocabulary: moved after [SEGT].")
        tokenizer = move_tokens_last(tokenizer, set(later))
    return tokenizer


def unused_tokens(tokenizer, size: int) -> list[str]:
    """Added tokens with an id >= `size` that the original InternVL3 tokenizer does not have (nor `[SEG]`)."""
    return [
        token.content
        for i, token in sorted(tokenizer.added_tokens_decoder.items())
        if i >= size and token.content not in (*INTERNVL_TOKENS, *AUTHORS_ADDED_TOKENS)
    ]


def move_tokens_last(tokenizer, contents: set[str]):
    """The same tokenizer with the added tokens `contents` renumbered after all other added tokens."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        path = Path(folder) / "tokenizer.json"
        data = json.loads(path.read_text())
        added = sorted(data["added_tokens"], key=lambda token: token["id"])
        first = min(token["id"] for token in added if token["content"] in contents)
        tail = [t for t in added if t["id"] >= first and t["content"] not in contents]
        tail += [t for t in added if t["id"] >= first and t["content"] in contents]
        for new_id, token in enumerate(tail, start=first):
            token["id"] = new_id
        path.write_text(json.dumps(data, ensure_ascii=False))
        return AutoTokenizer.from_pretrained(folder)


def token_id(tokenizer, token: str) -> int | None:
    """Id of `token` in `tokenizer`, `None` if it is not a token of it."""
    found = tokenizer.convert_tokens_to_ids(token)
    return None if found is None or found == tokenizer.unk_token_id else found


def tokenizer_ids(tokenizer, rows: int) -> dict[str, int]:
    """`[SEG]`, `<IMG_CONTEXT>`, `<|im_end|>` and pad ids, checked against the checkpoint's vocabulary rows: every
    token but added ones no prompt uses (a `-hf` tokenizer's `<video>`) must have a row."""
    absent = [token for token in PROMPT_TOKENS if token_id(tokenizer, token) is None]
    if absent:
        raise ConversionError(f"The tokenizer lacks {absent}: it is not an InternVL3 tokenizer with [SEG].")
    size = len(tokenizer) - len(unused_tokens(tokenizer, rows))
    if size != rows or any(token_id(tokenizer, token) >= rows for token in PROMPT_TOKENS):
        raise ConversionError(
            f"The tokenizer has {size} tokens (with [SEG] and [SEGT]) but the checkpoint's embeddings have {rows} "
            "rows: --base-tokenizer must be the tokenizer of the InternVL3 model this checkpoint was trained from."
        )
    return {
        "seg": token_id(tokenizer, SEG_TOKEN),
        "image": token_id(tokenizer, IMAGE_CONTEXT_TOKEN),
        "turn_end": token_id(tokenizer, TURN_END_TOKEN),
        "pad": tokenizer.pad_token_id,
    }


def read_side_settings(folder: Path) -> dict:
    """Token ids and loss weights of the older `meta.json` side file (the parity fixture's), if present."""
    meta_path = folder / "meta.json"
    meta = read_json(meta_path) if meta_path.is_file() else {}
    kwargs = meta.get("model_init_kwargs_not_in_config", {})
    return {
        "seg": meta.get("seg_token_id", kwargs.get("seg_token_idx")),
        "image": meta.get("img_context_token_id", kwargs.get("img_token_idx")),
        "loss_weights": meta.get("loss_weights", {}),
    }


def resolve_token_ids(tokenizer, side: dict, given: dict, original: dict, rows: int) -> dict:
    """Token ids from the tokenizer when there is one (side settings and flags must then agree with it), else from
    the side settings / flags."""
    ids = tokenizer_ids(tokenizer, rows) if tokenizer is not None else {"turn_end": None, "pad": None}
    for name, flag in (("seg", "--seg-token-id"), ("image", "--image-token-id")):
        for source, value in (("meta.json", side[name]), (flag, given.get(name))):
            if value is None:
                continue
            if tokenizer is not None and value != ids[name]:
                raise ConversionError(f"{source} gives {name} token id {value} but the tokenizer has {ids[name]}.")
            ids[name] = value
        if ids.get(name) is None:
            raise ConversionError(
                f"The {name} token id is unknown: pass --base-tokenizer (the base InternVL3 folder or its tokenizer), "
                "since the release holds no tokenizer."
            )
    if ids["turn_end"] is not None and original.get("eos_token_id") not in (None, ids["turn_end"]):
        raise ConversionError(
            f"config.json has eos_token_id {original['eos_token_id']} but the tokenizer's {TURN_END_TOKEN} is "
            f"{ids['turn_end']}: wrong --base-tokenizer?"
        )
    return ids


# ----------------------------------------------------------------------------------------------------------------
# Config and output
# ----------------------------------------------------------------------------------------------------------------


def image_size_of(original: dict) -> int:
    return original.get("force_image_size") or original["vision_config"]["image_size"]


def build_config(original: dict, ids: dict, loss_weights: dict, state: dict[str, torch.Tensor]) -> SelfieConfig:
    """`SelfieConfig` from the original config.json, the token ids, the loss weights and tensor shapes."""
    vision, llm = original["vision_config"], dict(original["llm_config"])
    image_size = image_size_of(original)
    ratio = original.get("downsample_ratio", 0.5)
    vision_config = {
        "hidden_size": vision["hidden_size"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
        "intermediate_size": vision["intermediate_size"],
        "image_size": [image_size, image_size],
        "patch_size": [vision["patch_size"], vision["patch_size"]],
        "attention_bias": vision.get("qkv_bias", True),
        "use_qk_norm": vision.get("qk_normalization", False),
        "norm_type": vision.get("norm_type", "layer_norm"),
        "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
        "hidden_act": vision.get("hidden_act", "gelu"),
        "use_mean_pooling": True,
    }
    for key in RUN_SETTINGS:
        llm.pop(key, None)
    return SelfieConfig(
        vision_config=vision_config,
        text_config=llm,
        image_token_id=ids["image"],
        seg_token_id=ids["seg"],
        image_seq_length=int((image_size // vision["patch_size"]) ** 2 * ratio**2),
        downsample_ratio=ratio,
        vision_feature_layer=original.get("select_layer", -1),
        seg_hidden_size=state["combine_decode_proj.0.weight"].shape[1],
        tie_word_embeddings=llm.get("tie_word_embeddings", False),
        text_loss_weight=loss_weights.get("ce_loss_weight", 1.0),
        bce_loss_weight=loss_weights.get("bce_loss_weight", 2.0),
        dice_loss_weight=loss_weights.get("dice_loss_weight", 0.5),
    )


def check_original(original: dict, state: dict[str, torch.Tensor]) -> None:
    """Refuse configs and checkpoints that are not the SELF1E layout this converter knows."""
    if original.get("model_type") != "internvl_chat":
        raise ConversionError(
            f"config.json has model_type={original.get('model_type')!r}; the original SELF1E layout has "
            "'internvl_chat'."
        )
    llm = original.get("llm_config") if isinstance(original.get("llm_config"), dict) else {}
    if llm.get("model_type") not in SUPPORTED_LLMS:
        supported = ", ".join(f"{name} ({architecture})" for name, architecture in SUPPORTED_LLMS.items())
        raise ConversionError(
            f"config.json's llm_config is model_type={llm.get('model_type')!r} {llm.get('architectures', [])}; the "
            f"converter maps the LLMs {supported}."
        )
    if original.get("ps_version", "v2") != "v2":
        raise ConversionError(f"ps_version={original['ps_version']!r} is not supported (transformers' InternVL is v2).")
    if original.get("template", AUTHORS_TEMPLATE) != AUTHORS_TEMPLATE:
        raise ConversionError(
            f"config.json has template={original['template']!r}; the released SELF1E prompt is {AUTHORS_TEMPLATE!r}."
        )
    missing = [key for key in ("combine_decode_proj.0.weight", *EMBEDDING_KEYS) if key not in state]
    if missing:
        raise ConversionError(f"The checkpoint lacks {missing}: it is not a SELF1E checkpoint.")
    rows = {key: state[key].shape[0] for key in EMBEDDING_KEYS}
    declared = original["llm_config"].get("vocab_size")
    if len(set(rows.values())) != 1 or declared not in (None, *rows.values()):
        raise ConversionError(f"Vocabulary sizes disagree: llm_config.vocab_size={declared}, tensor rows {rows}.")


def checked_model(config: SelfieConfig, converted: dict[str, torch.Tensor]) -> SelfieForSegmentation:
    """A `SelfieForSegmentation` holding exactly the converted tensors (their dtypes kept). It is built on the meta
    device, so nothing is initialised at random; every key and shape must match the architecture."""
    with torch.device("meta"):
        model = SelfieForSegmentation(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"Checkpoint does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}.")
    wrong = [f"{key} {tuple(converted[key].shape)} != {tuple(expected[key].shape)}"
             for key in sorted(expected) if converted[key].shape != expected[key].shape]
    if wrong:
        raise ConversionError(f"Tensor shapes do not fit config.json: {wrong[:4]}")
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval()


def build_processor(tokenizer, config: SelfieConfig, original: dict) -> SelfieProcessor:
    """The processor of the released model: one tile of `force_image_size` px per image (as it was trained and
    evaluated), InternVL's ImageNet normalisation, the authors' `internvl2_5` prompt and system message; checked
    against the model's token ids."""
    size = image_size_of(original)
    image_processor = SelfieImageProcessor(size={"height": size, "width": size}, max_patches=1)
    processor = SelfieProcessor(
        image_processor,
        tokenizer,
        image_seq_length=config.image_seq_length,
        system_message=SELF1E_SYSTEM_MESSAGE,
        prompt_style="self1e",
    )
    try:
        processor.check_model(config)
    except ValueError as error:
        raise ConversionError(str(error)) from None
    return processor


def convert_checkpoint(
    input_dir: str | Path,
    output_dir: str | Path,
    base_tokenizer: str | Path | None = None,
    seg_token_id: int | None = None,
    image_token_id: int | None = None,
    lora_alpha: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert `input_dir` (original SELF1E layout) into `output_dir`, written atomically; returns `output_dir`."""
    folder = Path(input_dir)
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder} has no config.json: point --input at an original SELF1E checkpoint folder.")
    if base_tokenizer is not None and not Path(base_tokenizer).is_dir():
        raise ConversionError(f"--base-tokenizer {base_tokenizer} is not a folder.")
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; pass overwrite=True (--overwrite) to replace it.")
    original = read_json(folder / "config.json")
    state = load_original_state_dict(folder)
    if is_unmerged(state):
        state = merge_lora(state, *read_lora_alpha(folder, lora_alpha))
    original, state = internlm2_as_llama(original, state)
    check_original(original, state)
    rows = state[EMBEDDING_KEYS[0]].shape[0]
    tokenizer = segmentation_tokenizer(folder, Path(base_tokenizer) if base_tokenizer is not None else None, rows)
    side = read_side_settings(folder)
    ids = resolve_token_ids(tokenizer, side, {"seg": seg_token_id, "image": image_token_id}, original, rows)
    config = build_config(original, ids, side["loss_weights"], state)
    model = checked_model(config, convert_state_dict(state))
    if ids["turn_end"] is not None:
        pad = ids["pad"] if ids["pad"] is not None else original.get("pad_token_id")
        model.generation_config = GenerationConfig(eos_token_id=ids["turn_end"], pad_token_id=pad)
    processor = build_processor(tokenizer, config, original) if tokenizer is not None else None
    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)
    if processor is None:
        logger.warning(
            f"{output_dir} holds the model only (token ids from meta.json / flags): no tokenizer was given, so it has "
            "no processor. Pass --base-tokenizer for a complete folder."
        )
    return output_dir
