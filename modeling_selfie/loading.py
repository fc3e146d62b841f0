"""Loading a model for the package's commands: the one function that `selfie-segment`, `evaluate`, `evaluate_vqa`
and `training` load their model and processor with, and the `--device` / `--dtype` names they take.

[`load_model_and_processor`] registers the Auto classes first: under `python -m modeling_selfie.<command>` and the
`selfie-*` scripts the package is imported without registering them (so that `--help` answers without torch), and a
saved SELFIE folder names its classes through `auto_map` (remote code), which transformers would otherwise only load
with `trust_remote_code=True`.
"""

from pathlib import Path

import torch

from .errors import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`"auto"`: the accelerator torch sees (CUDA, ...), else the CPU. Any other name must work on this machine."""
    if name == "auto":
        return torch.accelerator.current_accelerator(check_available=True) or torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"--device {name} is not a device name (try auto, cpu, cuda or cuda:1)") from error
    if device.type == "meta":
        raise UsageError("--device meta holds no data: use auto, cpu or cuda")
    if device.type != "cpu":
        accelerator = torch.accelerator.current_accelerator(check_available=True)
        if accelerator is None or accelerator.type != device.type:
            seen = f"only {accelerator.type} and cpu" if accelerator is not None else "only the cpu"
            raise UsageError(f"--device {name} cannot be used here: torch sees {seen} (try --device auto or cpu)")
        if (device.index or 0) >= torch.accelerator.device_count():
            raise UsageError(f"--device {name} cannot be used here: torch sees {torch.accelerator.device_count()} "
                             f"{device.type} device(s), numbered from 0 (try --device auto)")
    try:
        torch.empty(1, device=device)
    except (AssertionError, RuntimeError, NotImplementedError) as error:
        reason = str(error).strip().split("\n")[0].split(". ")[0][:120] or type(error).__name__
        raise UsageError(f"--device {name} cannot be used here: {reason} (try --device auto or cpu)") from error
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`"auto"`: bfloat16 on a CUDA GPU that supports it, float32 elsewhere; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def load_model_and_processor(
    source: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str = "auto",
    processor_source: str | Path | None = None,
):
    """`(SelfieForSegmentation, SelfieProcessor)` from a folder or Hub id: a SELFIE folder (converted, trained,
    saved or pushed, with or without its remote-code files) or a plain InternVL one (`[SEG]` and the head added).

    Args:
        source: the model's folder or Hub id.
        device: where the model goes (a `torch.device`, or a name `torch.device` takes); `None`: where
            `from_pretrained` put it (training: the trainer places it).
        dtype: the weights' dtype, as `from_pretrained` takes it (`"auto"`: the checkpoint's).
        processor_source: where the processor is read from (default: `source`).

    Returns:
        The model in eval mode on `device`, and its processor, checked to agree on `[SEG]` and the image tokens.

    Raises:
        UsageError: `source` is a folder without `config.json`, or what it holds cannot be loaded (one line).
    """
    from . import register_auto_classes
    from .modeling_selfie import SelfieForSegmentation
    from .processing_selfie import SelfieProcessor

    register_auto_classes()  # the processor's tokenizer and image processor load through the Auto classes
    if Path(source).exists() and not (Path(source) / "config.json").is_file():
        raise UsageError(f"--model {source} is not a model folder (no config.json)")
    try:
        model = SelfieForSegmentation.from_pretrained(source, dtype=dtype)
        processor = SelfieProcessor.from_pretrained(processor_source or source)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"cannot load a model from {source}: {' '.join(str(error).split())}") from None
    try:
        processor.check_model(model.config)
    except ValueError as error:  # both loaded: the message names what differs
        raise UsageError(str(error)) from None
    return (model if device is None else model.to(device)).eval(), processor
