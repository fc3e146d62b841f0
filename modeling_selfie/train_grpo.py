"""`selfie-train --method grpo`: reinforcement of SELFIE's answers with a mask reward through `trl.GRPOTrainer`.

The model writes an answer that ends in `[SEG]`; the mask of that `[SEG]` is scored against the ground truth
(`modeling_selfie.trl_selfie`: `mask_iou`, `format`, `no_target` rewards). Settings come from a recipe
(`configuration/recipes/grpo-refshapes.json`): `data` (where the prompts come from) and a `training` block (the
options below and any `GRPOConfig` field); flags override the recipe. This module imports nothing heavy until a run
starts, so `--help` answers at once.

Data: the recipe's `data` block `{"source": "refshapes", "size": N, "seed": S, "kind_weights": {...}}` draws RefShapes
prompts (one expression each), or `--dataset DIR` reads a `datasets` folder (`save_to_disk`) of TRL conversational
GRPO rows (`prompt`, `images`, `masks`; `modeling_selfie.trl_selfie.grpo_row` writes them from SELFIE samples).

The run ends by merging the LoRA and writing `OUTPUT_DIR/final` (model + processor), which
`SelfieForSegmentation.from_pretrained` loads.
"""

import os
import sys
import textwrap
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_REWARDS = ("mask_iou", "format")


@dataclass
class GrpoArguments:
    """The SELFIE options of `selfie-train --method grpo` (a recipe's `training` block may set those after
    `dataset`, and any `GRPOConfig` field)."""

    model: str = field(metadata={"help": "starting checkpoint folder (a SELFIE model, e.g. an SFT run's final/)"})
    recipe: str = field(
        default="grpo-refshapes", metadata={"help": "recipe: a JSON file or a shipped name (grpo-refshapes)"}
    )
    dataset: str | None = field(
        default=None, metadata={"help": "datasets folder (save_to_disk) of GRPO rows: prompt, images, masks"}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: list(DEFAULT_REWARDS),
        metadata={"help": "reward functions, summed (weights: --reward-weights): mask_iou, format, no_target"},
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank on the LLM; 0 trains every weight"})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha (update scaled by alpha / rank)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    max_tiles: int = field(default=1, metadata={"help": "tiles per image (GRPO takes one)"})


SHORT_HELP = """\
usage: selfie-train --method grpo --model DIR --output-dir OUT [--recipe RECIPE] [--dataset DIR] [options]

Reinforce SELFIE's answers with a mask reward through trl.GRPOTrainer: the model writes an answer ending in [SEG]
(free text before it), the mask of that [SEG] (one dual-pathway forward, no gradient) is scored against the ground
truth, and the LoRA (and, with --mask-loss-weight > 0, the segmentation head) learns from the rewards.
Writes checkpoints to OUT and the merged model to OUT/final.

GRPO options:
{options}
Often used GRPOConfig options (override the recipe's):
  --output-dir OUT                   run folder (checkpoints, final/)
  --mask-loss-weight W               supervised BCE + DICE on the sampled [SEG] masks; 0 (default) freezes the head
  --num-generations G                answers sampled per prompt (the group of the advantage)
  --max-completion-length N          most answer tokens
  --learning-rate, --max-steps, --per-device-train-batch-size, --temperature, --beta, --reward-weights, --seed
  --save-steps N, --logging-steps N  checkpoint / log every N steps
  --resume-from-checkpoint last      continue from the newest complete checkpoint in OUT (or give a folder)

Example (after an SFT run that answers "<name> [SEG]"):
  selfie-train --method grpo --model runs/sft/final --recipe grpo-refshapes --output-dir runs/grpo --max-steps 200

--help-all lists every option (all of trl.GRPOConfig).
"""


def short_help() -> str:
    """`--help`: what the command does, its options and an example."""
    options = []
    for item in fields(GrpoArguments):
        flag = "--" + item.name.replace("_", "-")
        options.append(textwrap.fill(item.metadata["help"], 116, initial_indent=f"  {flag:<34} ",
                                     subsequent_indent=" " * 37))
    return SHORT_HELP.format(options="\n".join(options) + "\n")


def _parser(suppress_defaults: bool = False):
    from transformers import HfArgumentParser

    from .trl_selfie import SelfieGRPOConfig

    parser = HfArgumentParser((GrpoArguments, SelfieGRPOConfig))
    if suppress_defaults:
        import argparse

        for action in parser._actions:
            action.default = argparse.SUPPRESS
    return parser


def resolve(argv: list[str]) -> tuple[GrpoArguments, "SelfieGRPOConfig", dict]:  # noqa: F821
    """Defaults < the recipe's `training` block < the flags; the recipe's `data` block. Raises `ValueError`."""
    from .data.registry import load_recipe
    from .trl_selfie import SelfieGRPOConfig

    values = vars(_parser().parse_args(argv))
    given = set(vars(_parser(suppress_defaults=True).parse_args(argv)))
    recipe = load_recipe(values["recipe"])
    unknown = set(recipe) - {"name", "description", "notes", "data", "training"}
    known = {f.name for f in fields(GrpoArguments)} | {f.name for f in fields(SelfieGRPOConfig) if f.init}
    unknown |= {f"training.{key}" for key in recipe.get("training", {}) if key not in known}
    if unknown:
        raise ValueError(f"Recipe {values['recipe']!r} has unknown key(s) {sorted(unknown)}.")
    for key, value in recipe.get("training", {}).items():
        if key not in given:
            values[key] = value
    from .training_defaults import accelerator_available, bf16_available

    if "use_cpu" not in given and "use_cpu" not in recipe.get("training", {}) and not accelerator_available():
        values["use_cpu"] = True  # as the supervised run: the CPU without a GPU
    if "bf16" not in given and "bf16" not in recipe.get("training", {}):
        values["bf16"] = bf16_available()
    script = GrpoArguments(**{f.name: values[f.name] for f in fields(GrpoArguments)})
    config = SelfieGRPOConfig(**{f.name: values[f.name] for f in fields(SelfieGRPOConfig) if f.init})
    return script, config, recipe.get("data", {})


def load_rows(script: GrpoArguments, data: dict):
    """The training rows: `--dataset` (a `datasets` folder) or the recipe's RefShapes prompts."""
    from datasets import Dataset, load_from_disk

    from .trl_selfie import grpo_row

    if script.dataset is not None:
        if not Path(script.dataset).is_dir():
            raise ValueError(f"--dataset {script.dataset!r} is not a folder (a datasets save_to_disk folder).")
        rows = load_from_disk(script.dataset)
        missing = {"prompt", "masks"} - set(rows.column_names)
        if missing or not {"images", "image"} & set(rows.column_names):
            raise ValueError(f"--dataset {script.dataset!r} lacks the column(s) {sorted(missing) or ['images']}.")
        return rows
    if data.get("source") != "refshapes":
        raise ValueError("The recipe's data block names no source (\"refshapes\"): give --dataset DIR.")
    from .data.refshapes import RefShapesDataset

    refshapes = RefShapesDataset("train", size=int(data.get("size", 512)), seed=int(data.get("seed", 0)),
                                 kind_weights=data.get("kind_weights"))
    return Dataset.from_list([grpo_row(refshapes[i]) for i in range(len(refshapes))])


def training_summary(script: GrpoArguments, config, prompts: int, steps: int) -> str:
    """The model card's Training section: where the run started, its data, rewards and main settings."""
    lora = f"LoRA rank {script.lora_rank}, merged" if script.lora_rank > 0 else "full weights"
    return (
        f"GRPO (TRL's `GRPOTrainer` through `SelfieGRPOTrainer`, `selfie-train --method grpo`) from the checkpoint "
        f"`{Path(script.model).name}`, recipe `{Path(script.recipe).name}`, on {prompts} prompts: rewards "
        f"{', '.join(f'`{name}`' for name in script.reward_funcs)}; {steps} step{'s' if steps != 1 else ''}, "
        f"{config.num_generations} completions per prompt, learning rate {config.learning_rate:g}, {lora}."
    )


def main(argv: list[str] | None = None) -> int:
    """Run GRPO on the recipe's prompts, then write the merged model to OUTPUT_DIR/final."""
    argv = sys.argv[1:] if argv is None else list(argv)
    from .training_defaults import printed_help

    if printed_help(argv, short_help, _parser):
        return 0
    try:
        script, config, data = resolve(argv)
        rows = load_rows(script, data)
        from .trl_selfie import reward_functions

        rewards = reward_functions(script.reward_funcs)
        if not Path(script.model).is_dir():
            raise ValueError(f"--model {script.model!r} is not a checkpoint folder.")
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from . import SelfieForSegmentation, SelfieProcessor  # through the package: registers the Auto classes
    from .hub import model_card
    from .trainer_selfie import merge_and_save, selfie_lora_config
    from .training_defaults import last_complete_checkpoint
    from .trl_selfie import SelfieGRPOTrainer

    model = SelfieForSegmentation.from_pretrained(script.model)
    processor = SelfieProcessor.from_pretrained(script.model)
    processor.check_model(model.config)
    processor.image_processor.max_patches = script.max_tiles
    peft_config = None
    if script.lora_rank > 0:
        peft_config = selfie_lora_config(script.lora_rank, script.lora_alpha, script.lora_dropout)
    trainer = SelfieGRPOTrainer(model=model.train(), reward_funcs=rewards, args=config, train_dataset=rows,
                                processing_class=processor, peft_config=peft_config)
    resume = config.resume_from_checkpoint
    if resume == "last":
        resume = last_complete_checkpoint(config.output_dir)
        print(f"resuming from {resume}" if resume else f"no complete checkpoint in {config.output_dir}: starting")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()
    final_dir = os.path.join(config.output_dir, "final")
    card = model_card(Path(config.output_dir).absolute().name, training=training_summary(script, config, len(rows), trainer.state.global_step))
    merge_and_save(trainer, final_dir, processor=processor, overwrite=True, extra_files={"README.md": str(card)})
    if trainer.is_world_process_zero():
        print(f"wrote {final_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
