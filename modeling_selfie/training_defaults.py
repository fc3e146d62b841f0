"""Training settings shared by the command lines (`modeling_selfie.training`, `modeling_selfie.train_grpo`; no torch
at import) and the trainer (`modeling_selfie.trainer_selfie`): the default LoRA targets, the help of the vision tower's
learning rate, the hardware defaults (bf16, CPU) and the checkpoint a run resumes from."""

import os
import re
from pathlib import Path

LLM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2")
VISION_LEARNING_RATE_HELP = (
    "learning rate of the vision tower's trainable weights (its own optimizer param group, on the same schedule); "
    "default: --learning-rate"
)


def printed_help(argv: list[str], short_help, parser) -> bool:
    """Print `short_help()` for `-h` / `--help`, or `parser()`'s full help for `--help-all`; whether it printed (the
    command then exits 0)."""
    if "-h" in argv or "--help" in argv:
        print(short_help())
        return True
    if "--help-all" in argv:
        parser().print_help()
        return True
    return False


def bf16_available() -> bool:
    """Whether a CUDA GPU with bfloat16 is there (the runs' `bf16` default)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def accelerator_available() -> bool:
    """Whether a GPU (or another accelerator torch knows) is there; without one the run uses the CPU."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` in `output_dir` that was written to the end (has `trainer_state.json`, which the
    Trainer writes last); `None` if there is none."""
    folder = Path(output_dir)
    steps = [
        (int(path.name.split("-")[1]), path)
        for path in (folder.glob("checkpoint-*") if folder.is_dir() else [])
        if re.fullmatch(r"checkpoint-\d+", path.name) and (path / "trainer_state.json").is_file()
    ]
    return str(max(steps)[1]) if steps else None
