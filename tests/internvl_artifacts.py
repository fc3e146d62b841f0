"""Folders in the layouts users bring, written by other code than this project's presets and writers.

* `write_qwen2_internvl_tokenizer`: a Qwen2 byte-level BPE tokenizer (built with `tokenizers`) carrying Qwen2's
  special tokens and InternVL's image tokens at their real relative positions, saved with a hand-written
  `tokenizer_config.json` as the Hub's InternVL3 folders hold it (with or without the `*_image_token` roles).
* `write_internvl3_hf_folder`: a tiny InternVL3 written by transformers' own `InternVLForConditionalGeneration`
  (model_type `internvl`; Qwen2, Qwen3 or Llama text model), its weights in one of the key layouts met in the wild,
  with the `-hf` repositories' processor files (GotOcr2 image processor: 12 tiles + thumbnail).
* `write_original_internvl3_folder`: the original (`internvl_chat`) InternVL3 folder's processor-side files:
  config.json, CLIP-style preprocessor_config.json, tokenizer without image-token roles.
"""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import InternVLConfig, InternVLForConditionalGeneration

# Qwen2's pre-tokenisation regex (a fact of the published tokenizer.json).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 specials then InternVL's additions, in the published order (ids follow the ordinary vocabulary).
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
IMAGE_ROLES = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
MERGES = [("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġt", "he"), ("e", "d"), ("o", "n"), ("Ġ", "a"), ("Ġ", "i")]

IMAGE_MEAN, IMAGE_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2 / Qwen2 byte-level BPE uses for the bytes 0..255."""
    return pre_tokenizers.ByteLevel.alphabet()


def write_qwen2_internvl_tokenizer(folder: Path, image_roles: bool = True) -> dict[str, int]:
    """Write tokenizer.json + tokenizer_config.json of a small Qwen2-style tokenizer with InternVL's tokens.

    Returns the id of every special token. The ordinary vocabulary is the 256 byte symbols plus a few merges, so any
    text encodes (as in the real one, at a coarser granularity).
    """
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {symbol: i for i, symbol in enumerate(sorted(byte_level_alphabet()))}
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(QWEN2_SPECIALS)
    internvl_tokens = [*INTERNVL_TOKENS, "<video>"] if image_roles else INTERNVL_TOKENS  # -hf names a video token
    backend.add_tokens(internvl_tokens)  # InternVL adds its tokens as normal added tokens
    backend.save(str(folder / "tokenizer.json"))
    ids = {token: backend.token_to_id(token) for token in [*QWEN2_SPECIALS, *internvl_tokens]}
    added = {
        str(ids[token]): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token in QWEN2_SPECIALS,
        }
        for token in [*QWEN2_SPECIALS, *internvl_tokens]
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 8192,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if image_roles:
        config["extra_special_tokens"] = {**IMAGE_ROLES, "video_token": "<video>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return ids


# The text models transformers' InternVL carries: Qwen2 (InternVL3), Qwen3 (InternVL3.5, its own head_dim and q/k
# norms) and Llama (InternVL2.5's InternLM2 as transformers' conversion stores it).
TEXT_MODELS = {"qwen2": {}, "qwen3": {"head_dim": 16}, "llama": {}}


def internvl3_config(
    vocab_size: int, image_token_id: int, tie_word_embeddings: bool = False, text_model: str = "qwen2"
) -> InternVLConfig:
    """A tiny InternVL config (56 px tiles, 14 px patches: 4 LLM tokens per tile) with a `text_model` LLM (one of
    `TEXT_MODELS`), written out by hand."""
    return InternVLConfig(
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "image_size": [56, 56],
            "patch_size": [14, 14],
            "attention_bias": True,
            "use_mean_pooling": True,
        },
        text_config={
            "model_type": text_model,
            **TEXT_MODELS[text_model],
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 96,
            "vocab_size": vocab_size,
            "max_position_embeddings": 512,
            "tie_word_embeddings": tie_word_embeddings,
        },
        image_token_id=image_token_id,
        image_seq_length=4,
        downsample_ratio=0.5,
        tie_word_embeddings=tie_word_embeddings,
    )


# transformers' current module names -> the names of the Hub's InternVL3 `-hf` repositories.
HUB_LAYOUT = [
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
]
LAYOUTS = ("saved", "hub", "module")


def rename_keys(state: dict[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, tensor in state.items():
        for pattern, replacement in rules:
            key, hits = re.subn(pattern, replacement, key)
            if hits:
                break
        renamed[key] = tensor.contiguous()
    return renamed


def write_internvl3_hf_folder(
    folder: Path, layout: str = "hub", tie_word_embeddings: bool = False, seed: int = 0, text_model: str = "qwen2"
) -> InternVLForConditionalGeneration:
    """A tiny InternVL3-hf folder: weights by `InternVLForConditionalGeneration`, tokenizer, processor files. The
    LLM is `text_model` (`TEXT_MODELS`; the tokenizer is the Qwen2-style one whatever the LLM).

    `layout`: `"saved"` keeps what this transformers release's `save_pretrained` wrote, `"hub"` renames the keys to
    the `-hf` repositories' layout (`vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`,
    `language_model.lm_head.weight`), `"module"` writes the model's own `state_dict` names. Tied models store no
    `lm_head`. Returns the model (eval mode), for comparisons.
    """
    if layout not in LAYOUTS:
        raise ValueError(layout)
    ids = write_qwen2_internvl_tokenizer(folder)
    vocab_size = ids["</box>"] + 1  # as the Hub's config: the tokenizer's <video> has no embedding row
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(
        internvl3_config(vocab_size, ids["<IMG_CONTEXT>"], tie_word_embeddings, text_model)
    ).eval()
    for parameter in model.parameters():  # visible numbers (the default init is N(0, 0.02^2))
        torch.nn.init.normal_(parameter, std=0.3)
    model.save_pretrained(folder)
    if layout != "saved":
        state = model.state_dict() if layout == "module" else rename_keys(model.state_dict(), HUB_LAYOUT)
        if tie_word_embeddings:
            state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
        for stale in folder.glob("model*.safetensors*"):
            stale.unlink()
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    write_json(
        folder / "preprocessor_config.json",
        {
            "crop_size": None,
            "crop_to_patches": True,
            "data_format": "channels_first",
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": IMAGE_MEAN,
            "image_processor_type": "GotOcr2ImageProcessorFast",
            "image_std": IMAGE_STD,
            "max_patches": 12,
            "min_patches": 1,
            "processor_class": "InternVLProcessor",
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "size": {"height": 56, "width": 56},
        },
    )
    write_json(folder / "processor_config.json", {"image_seq_length": 4, "processor_class": "InternVLProcessor"})
    return model


def write_original_internvl3_folder(folder: Path) -> dict[str, int]:
    """The processor-side files of an original InternVL3 folder (`internvl_chat`): no image-token roles in the
    tokenizer config, a CLIP-style preprocessor_config.json, the image size in config.json."""
    ids = write_qwen2_internvl_tokenizer(folder, image_roles=False)
    write_json(
        folder / "config.json",
        {
            "architectures": ["InternVLChatModel"],
            "model_type": "internvl_chat",
            "downsample_ratio": 0.5,
            "force_image_size": 56,
            "template": "internvl2_5",
            "ps_version": "v2",
            "vision_config": {"image_size": 56, "patch_size": 14, "hidden_size": 32},
            "llm_config": {"model_type": "qwen2", "vocab_size": max(ids.values()) + 1, "hidden_size": 64},
        },
    )
    write_json(
        folder / "preprocessor_config.json",
        {
            "crop_size": 56,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": IMAGE_MEAN,
            "image_std": IMAGE_STD,
            "resample": 3,
            "size": 56,
        },
    )
    return ids


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=2))
    return path


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors file(s)."""
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state
