"""Shipped model presets (`configuration/selfie-*.json`) and a tiny model + processor factory.

`selfie-2b` / `selfie-8b` have the dimensions of the paper's InternVL3-2B / -8B bases (Qwen2 text model),
`selfie-internvl3.5-{2b,8b}` those of InternVL3.5 (Qwen3), `selfie-internvl2.5-{2b,8b}` those of InternVL2.5 as
transformers' InternVL conversion stores it (its InternLM2 LLM as Llama; the paper's Tab. 10 base).
"""

import json
from importlib import resources

import torch

from .configuration_selfie import SelfieConfig
from .modeling_selfie import SelfieForSegmentation
from .processing_selfie import SelfieImageProcessor, SelfieProcessor
from .tokenization import build_word_level_tokenizer

PRESETS = (
    "selfie-tiny",
    "selfie-2b",
    "selfie-8b",
    "selfie-internvl3.5-2b",
    "selfie-internvl3.5-8b",
    "selfie-internvl2.5-2b",
    "selfie-internvl2.5-8b",
)


def preset_config(name: str, **overrides) -> SelfieConfig:
    """`SelfieConfig` of a shipped preset (one of `PRESETS`), with field overrides; a dict
    given for a sub-config (`text_config={"num_hidden_layers": 3}`) updates the preset's fields of it."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {PRESETS}.")
    text = resources.files("modeling_selfie.configuration").joinpath(f"{name}.json").read_text()
    fields = {k: v for k, v in json.loads(text).items() if k not in ("model_type", "architectures", "_comment")}
    for key, value in overrides.items():
        merge = isinstance(value, dict) and isinstance(fields.get(key), dict)
        fields[key] = {**fields[key], **value} if merge else value
    return SelfieConfig(**fields)


def tiny_model_and_processor(
    words=(), seed: int = 0, system_message: str = "", **config_overrides
) -> tuple[SelfieForSegmentation, SelfieProcessor]:
    """A randomly initialised `selfie-tiny` model (56 px tiles, 4 LLM tokens per tile, variance-preserving init)
    and a matching processor with a word-level tokenizer over `words` plus the paper's prompt words. For tests,
    examples and benchmarks."""
    from .processing_selfie import ANSWERS, LONG_QUESTIONS, SHORT_QUESTIONS

    prompt_words = " ".join((*SHORT_QUESTIONS, *LONG_QUESTIONS, *ANSWERS)).replace("{text}", " ")
    for mark in ".,?":
        prompt_words = prompt_words.replace(mark, " ")
    tokenizer = build_word_level_tokenizer([*prompt_words.split(), *words])
    processor = SelfieProcessor(
        image_processor=SelfieImageProcessor(size={"height": 56, "width": 56}),
        tokenizer=tokenizer,
        image_seq_length=4,
        system_message=system_message,
    )
    config = preset_config(
        "selfie-tiny",
        image_token_id=processor.image_token_id,
        seg_token_id=processor.seg_token_id,
        **config_overrides,
    )
    config.text_config.vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    model = SelfieForSegmentation(config)
    variance_preserving_init_(model)
    return model.eval(), processor


def variance_preserving_init_(model: torch.nn.Module) -> None:
    """Re-draw Linear weights from N(0, 1/fan_in) and embeddings from N(0, 1), so a random tiny model gives mask
    logits of order 1 (transformers' N(0, 0.02^2) makes them ~1e-8 at this size)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=module.in_features**-0.5)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, std=1.0)


__all__ = ["PRESETS", "preset_config", "tiny_model_and_processor"]
