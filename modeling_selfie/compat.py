"""Differences between the transformers and huggingface_hub releases SELFIE supports, in one place.

Every switch here detects a feature (a signature, an attribute), never a version string, so a release that backports
or renames something is handled by what it actually offers. Supported: transformers 5.17 to 5.24, huggingface_hub
1.x and 2.x.
"""

import dataclasses
import inspect
import re

import torch

# transformers' top-level `AutoImageProcessor` is a placeholder that demands torchvision in some releases (5.17);
# the class in its own module works with the PIL backends everywhere.
from transformers.models.auto.image_processing_auto import AutoImageProcessor
from transformers.masking_utils import create_causal_mask as _create_causal_mask
from transformers.utils.deprecation import deprecate_kwarg
from transformers.models.internvl.modeling_internvl import InternVLModelOutputWithPast

# The name of the key-value cache argument: `past_key_values` until transformers 5.2x renamed it to `cache`.
CACHE_KWARG = "cache" if "cache" in inspect.signature(_create_causal_mask).parameters else "past_key_values"


def create_causal_mask(*, cache=None, **kwargs):
    """`transformers.masking_utils.create_causal_mask` with the cache passed under whichever name it takes."""
    return _create_causal_mask(**cache_kwargs(cache), **kwargs)


def deprecated_cache_name(forward):
    """Where the cache argument is `cache`, a forward also takes the old name `past_key_values` with transformers'
    deprecation warning (as InternVL's does); where it is still `past_key_values`, the forward is unchanged."""
    if CACHE_KWARG == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)
    return forward


def pop_cache(kwargs: dict):
    """Remove and return the key-value cache from forward kwargs, under either name (`generate` passes the one its
    release uses)."""
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def cache_kwargs(cache) -> dict:
    """`{name: cache}` for calling a transformers module of this release."""
    return {CACHE_KWARG: cache}


def image_output_fields(vision_outputs) -> dict:
    """The vision encoder's outputs as InternVL's model output of this release holds them: `image_outputs` (the
    whole `BaseModelOutputWithPooling`, 5.2x) or `image_hidden_states` (its pooled, projected features, 5.17)."""
    if vision_outputs is None:
        return {}
    if "image_outputs" in InternVLModelOutputWithPast.__dataclass_fields__:
        return {"image_outputs": vision_outputs}
    return {"image_hidden_states": vision_outputs.pooler_output}


def enable_activation_checkpointing(model, use_reentrant: bool = False) -> None:
    """Turn on activation (gradient) checkpointing: `activation_checkpointing_enable` where the release has it
    (5.24), else `gradient_checkpointing_enable`."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


def activation_checkpointing_field() -> str:
    """The `TrainingArguments` field that turns activation checkpointing on: `activation_checkpointing` where the
    release has it (5.24, with `gradient_checkpointing` a deprecated alias that warns), else
    `gradient_checkpointing`."""
    from transformers import TrainingArguments

    names = {item.name for item in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def checkpointing_argv(argv) -> list[str]:
    """Command-line arguments with `--activation-checkpointing` / `--gradient-checkpointing` (either spelling, `_`
    or `-`, with `=VALUE` or not) renamed to the option of this release's `activation_checkpointing_field()`."""
    flag = "--" + activation_checkpointing_field().replace("_", "-")
    pattern = re.compile(r"--(?:activation|gradient)[-_]checkpointing(?==|$)")
    return [pattern.sub(flag, argument) if argument.startswith("--") else argument for argument in argv]


def use_plain_cpu_device(args) -> None:
    """Give CPU processes of a `TrainingArguments` the device "cpu" instead of an indexed "cpu:N" (the same memory).

    With several processes, transformers 5.17 loads a resumed optimizer state onto `args.device`, and `torch.load`
    cannot restore tensors onto "cpu:N" (later releases load onto "cpu"). `args.device` is the cached
    `_setup_devices` property in every supported release.
    """
    device = args.device
    if device.type == "cpu" and device.index is not None:
        args.__dict__["_setup_devices"] = torch.device("cpu")


__all__ = [
    "AutoImageProcessor",
    "CACHE_KWARG",
    "activation_checkpointing_field",
    "checkpointing_argv",
    "cache_kwargs",
    "create_causal_mask",
    "deprecated_cache_name",
    "enable_activation_checkpointing",
    "image_output_fields",
    "pop_cache",
    "use_plain_cpu_device",
]
