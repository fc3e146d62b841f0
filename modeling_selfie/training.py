"""Training SELFIE with the transformers `Trainer`: the command line, its settings and recipes.

Public API
----------
* [`SelfieDataCollator`], [`SelfieTrainer`], [`SelfieTrainingArguments`], [`apply_lora`], [`merge_and_save`]:
  defined in `modeling_selfie.trainer_selfie` (collation, the trainer, LoRA, merging), importable from here too.
  This module imports torch only when they are used or a run starts, so that `--help` answers at once.
* `python -m modeling_selfie.training`: the training entry point (`--help`: the SELFIE options and an example;
  `--help-all`: every `TrainingArguments` option too).

Settings
--------
A run's settings come from its recipe (`configuration/recipes/<name>.json`): `datasets`, `sample_rates` and `seed`
(the data seed) at the top level, and a `training` block whose keys are the SELFIE settings of
[`SelfieArguments`] (LoRA ranks, alphas, dropout and targets for the LLM and the vision tower, `model_max_length`,
`max_tiles`, `model_dtype`) and any `TrainingArguments` field (`learning_rate`, `vision_learning_rate`,
`lr_scheduler_type`, `warmup_steps`, `num_train_epochs`, `per_device_train_batch_size`,
`gradient_accumulation_steps`, `activation_checkpointing` (or its older name `gradient_checkpointing`), `seed`, ...).
Flags override only the keys they name; unknown keys are errors. A recipe may `"extends"` another (a shipped name)
and change only what it gives; `--datasets FILE` replaces a recipe's `datasets` and `sample_rates` with a file's.
The run prints the effective settings and where each came from (recipe / flag / default / derived) and writes them
to `OUTPUT_DIR/settings.json` and `settings.md`; `final/` gets them (and its model card the settings table and the
recipe) without this machine's paths and this run's own options (`LOCAL_SETTINGS`: output folder, resuming, ...).

CPU threads: without `OMP_NUM_THREADS`, each CPU process uses the idle cores (usable cores less the load average)
divided by the processes on the machine (`LOCAL_WORLD_SIZE`, set by torchrun / accelerate), not torch's one thread
per core in every process ([`cpu_threads`]).

Launching
---------
Run from the repository root (the launch configs name each other by relative path). `TRAIN` stands for the script
and its arguments, e.g.::

    -m modeling_selfie.training --model /ckpt/InternVL3-2B-hf --recipe self1e-seg --data-root /data \\
        --output-dir runs/exp1

(`--recipe` takes a recipe file or a shipped name). Without a GPU the run uses the CPU (`use_cpu`, gloo between
processes); it ends by writing the merged checkpoint, its model card and the settings to `OUTPUT_DIR/final` (process
0 only). `--resume-from-checkpoint last` continues from the newest complete checkpoint in the output folder (or give
a checkpoint folder); with none there it starts from the beginning.

* one process (CPU or one GPU): `python TRAIN`;
* DDP: `accelerate launch --config_file configuration/launch/ddp.yaml --num_processes N TRAIN` or
  `torchrun --nproc_per_node N TRAIN` (GPUs or CPU processes alike);
* DeepSpeed ZeRO-2 / ZeRO-3: `accelerate launch --config_file configuration/launch/deepspeed_zero2.yaml TRAIN`
  (`deepspeed_zero3.yaml` for ZeRO-3), or `torchrun ... TRAIN --deepspeed configuration/launch/zero2.json`;
* FSDP (FSDP2, one unit per `InternVLVisionLayer` and per decoder layer of the text model):
  `accelerate launch --config_file configuration/launch/fsdp.yaml TRAIN`. FSDP checkpoints activations itself
  (`fsdp_activation_checkpointing` in the yaml): add `--activation-checkpointing false` there (the shipped recipes
  turn it on).

Multi-node: add `--num_machines N --machine_rank R --main_process_ip HOST` to `accelerate launch` (the yaml files
set `num_processes` to 8, one node of 8 GPUs: override it with `--num_processes`).

Sharded training (FSDP, ZeRO-3): the segmentation head runs inside `SelfieForSegmentation.forward`, so its weights
are gathered like every other layer's. Sharded weights are gathered collectively, though, so every rank must call
the same sharded layers at each step, while the model runs the vision tower only for batches with images and, under
ZeRO-3 (where each layer gathers its weights when called), the projector's second pass and the head only for
batches with `[SEG]`, the head once per tile grid. So with FSDP every batch needs an image, and with ZeRO-3 also a
`[SEG]`, with one tile grid for all images (`--max-tiles 1`, as the released model). DDP and ZeRO-2 have no such
constraint.

"""

import argparse
import copy
import json
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from .data.registry import load_recipe
from .errors import UsageError
from .training_defaults import LLM_LORA_TARGETS, VISION_LEARNING_RATE_HELP, VISION_LORA_TARGETS
from .training_defaults import accelerator_available, bf16_available, last_complete_checkpoint, printed_help

# The names `modeling_selfie.trainer_selfie` defines, importable from here (loaded on first use).
TRAINER_EXPORTS = (
    "FULLY_TRAINED_MODULES", "LOSS_COMPONENTS", "SelfieDataCollator", "SelfieTrainer", "SelfieTrainingArguments",
    "apply_lora", "merge_and_save", "vision_parameter_names", "_unsharded_copy",
)  # fmt: skip


def __getattr__(name: str):
    if name not in TRAINER_EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import trainer_selfie

    return getattr(trainer_selfie, name)


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SelfieArguments:
    """The SELFIE options of `python -m modeling_selfie.training`; those after `final_dir` are settings that a
    recipe's `training` block may set too (with every `TrainingArguments` field but the per-run ones)."""

    model: str = field(
        metadata={
            "help": "starting checkpoint folder (InternVL3-hf, a converted SELF1E, a SELFIE run's final/) or the "
            "preset 'selfie-tiny' (random tiny model whose word-level vocabulary is read from the training data)"
        }
    )
    recipe: str = field(metadata={"help": "the run's recipe: a JSON file or a shipped name (self1e, self1e-seg)"})
    data_root: str = field(metadata={"help": "folder the recipe's datasets live under"})
    datasets: str | None = field(
        default=None,
        metadata={
            "help": "JSON file of your datasets, {\"datasets\": [...], \"sample_rates\": {...}} (entries as in a "
            "recipe), replacing the recipe's: train on your data with a shipped recipe's training block"
        },
    )
    eval_recipe: str | None = field(default=None, metadata={"help": "evaluation data recipe (validation prompts)"})
    processor: str | None = field(default=None, metadata={"help": "processor folder (default: --model)"})
    base_model: str | None = field(
        default=None,
        metadata={"help": "Hub id of the starting model, for the model card (e.g. OpenGVLab/InternVL3-2B-hf)"},
    )
    final_dir: str | None = field(
        default=None,
        metadata={"help": "where the merged checkpoint goes, in bf16 with --bf16 (default: OUTPUT_DIR/final)"},
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank on the LLM; 0 trains every weight"})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha on the LLM (update scaled by alpha / rank)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (LLM and vision)"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LLM_LORA_TARGETS), metadata={"help": "LLM layers that get LoRA"}
    )
    vision_lora_rank: int = field(default=0, metadata={"help": "LoRA rank on the vision tower; 0: frozen"})
    vision_lora_alpha: float | None = field(
        default=None, metadata={"help": "vision LoRA alpha (default: --lora-alpha)"}
    )
    vision_lora_target_modules: list[str] = field(
        default_factory=lambda: list(VISION_LORA_TARGETS), metadata={"help": "vision layers that get LoRA"}
    )
    model_max_length: int | None = field(
        default=None, metadata={"help": "most tokens per sample (image tokens included); longer ones lose turns"}
    )
    max_tiles: int | None = field(default=None, metadata={"help": "most tiles per image (default: the processor's)"})
    sample_rates: str | None = field(
        default=None,
        metadata={
            "help": "copies per epoch by task, e.g. semantic=6,referring=20,reasoning=6,vqa=1 (default: the recipe's)"
        },
    )
    model_dtype: str = field(
        default="float32",
        metadata={
            "choices": ["float32", "bfloat16"],
            "help": "dtype to load the weights in (bfloat16 with DeepSpeed, which keeps fp32 master weights)",
        },
    )


RUN_OPTIONS = ("model", "recipe", "data_root", "datasets", "eval_recipe", "processor", "base_model", "final_dir")
PER_RUN_TRAINING_OPTIONS = ("output_dir", "resume_from_checkpoint", "hub_token")
RECIPE_TOP_LEVEL = ("name", "description", "notes", "seed", "datasets", "sample_rates", "training")
# Settings that say where this run's files are and how it was started: in OUTPUT_DIR/settings.*, not in the shared
# copies (final/settings.*, the model card).
LOCAL_SETTINGS = (
    "data_root", "datasets_file", "output_dir", "final_dir", "logging_dir", "run_name", "overwrite_output_dir",
    "resume_from_checkpoint", "hub_token", "push_to_hub", "report_to", "disable_tqdm",
)  # fmt: skip
CHECKPOINTING_NAMES = ("activation_checkpointing", "gradient_checkpointing")  # the recipe key, its older name
SCRIPT_DEFAULTS = {"remove_unused_columns": False, "logging_steps": 10, "save_steps": 1000}
# The settings always shown in the table, in this order (others appear when a recipe or a flag sets them).
TABLE_KEYS = (
    "model", "recipe", "data_root", "output_dir", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules",
    "vision_lora_rank", "vision_lora_alpha", "vision_lora_target_modules", "learning_rate", "vision_learning_rate",
    "lr_scheduler_type", "warmup_steps", "weight_decay", "optim", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "total_batch_size",
    "activation_checkpointing", "model_max_length", "max_tiles", "bf16", "use_cpu", "seed", "data_seed", "sample_rates",
    "datasets", "push_to_hub", "hub_model_id",
)  # fmt: skip
METHODS = ("sft", "grpo")
SHORT_HELP = """\
usage: python -m modeling_selfie.training --model DIR --recipe RECIPE --data-root DATA --output-dir OUT [options]
       python -m modeling_selfie.training --method grpo --model DIR --output-dir OUT [options]  (--method grpo --help)

Fine-tune SELFIE (an InternVL3 MLLM that segments with one [SEG] token) on a recipe's data mixture with the
transformers Trainer and LoRA, then write the merged model to OUT/final (loads with SelfieForSegmentation or,
without this package, AutoModelForImageTextToText.from_pretrained(..., trust_remote_code=True)).

The recipe (configuration/recipes/*.json: self1e, self1e-seg) holds the datasets with their sample rates and, in
its "training" block, the run's settings (LoRA, learning rates, schedule, epochs, batch, accumulation, gradient
checkpointing, max length, seeds). Flags override only the settings they name; the run prints the effective
settings and where each came from (recipe / flag / default) and saves them as OUT/settings.json and settings.md.
Starting from InternVL3-hf, --model DIR adds [SEG] and a fresh SELFIE head.

SELFIE options:
{options}
Often used Trainer options:
  --output-dir OUT                   run folder (checkpoints, settings, final/)
  --learning-rate, --num-train-epochs, --max-steps, --per-device-train-batch-size,
  --gradient-accumulation-steps, --activation-checkpointing, --lr-scheduler-type, --warmup-steps, --seed
                                     override the recipe's value
  --save-steps N, --logging-steps N  checkpoint / log every N steps
  --resume-from-checkpoint last      continue from the newest complete checkpoint in OUT (or give a folder)
  --push-to-hub --hub-model-id ID    upload the merged model, processor, remote code and a model card
  --bf16, --use-cpu                  precision / device (bf16 by default on GPUs that have it; CPU without a GPU)

Example (SELF1E-SEG from InternVL3-2B-hf, 4 GPUs):
  accelerate launch --config_file configuration/launch/ddp.yaml --num_processes 4 -m modeling_selfie.training \\
      --model InternVL3-2B-hf --recipe self1e-seg --data-root dataset --output-dir runs/self1e-seg

--help-all lists every option (all of transformers.TrainingArguments).
"""


def _parser(suppress_defaults: bool = False):
    """The command-line parser (an `HfArgumentParser`); with `suppress_defaults` it only returns the options given
    (to tell flags from defaults)."""
    from transformers import HfArgumentParser

    from .trainer_selfie import SelfieTrainingArguments

    parser = HfArgumentParser((SelfieArguments, SelfieTrainingArguments))
    if suppress_defaults:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
    else:
        parser.set_defaults(**SCRIPT_DEFAULTS, bf16=bf16_available())
    return parser


def short_help() -> str:
    """`--help`: what the script does, the SELFIE options, common Trainer options and an example."""
    options = []
    helps = [(item.name, item.metadata["help"]) for item in fields(SelfieArguments)]
    for name, text in [*helps, ("vision_learning_rate", VISION_LEARNING_RATE_HELP)]:
        flag = "--" + name.replace("_", "-")
        options.append(textwrap.fill(text, 116, initial_indent=f"  {flag:<34} ", subsequent_indent=" " * 37))
    return SHORT_HELP.format(options="\n".join(options) + "\n")


def parse_sample_rates(text: str) -> dict[str, int]:
    """`"semantic=6,referring=20"` -> `{"semantic": 6, "referring": 20}`."""
    rates = {}
    for part in text.split(","):
        task, _, rate = part.partition("=")
        if not task.strip() or not rate.strip().isdigit():
            raise ValueError(f"--sample-rates takes task=rate pairs such as semantic=6,referring=20, got {text!r}.")
        rates[task.strip()] = int(rate)
    return rates


def recipe_settings(recipe: dict) -> dict:
    """The settings a recipe sets: its `training` block, `sample_rates` and `seed` (the data seed, also
    `training.data_seed`). Unknown keys raise a `ValueError` naming them. Activation checkpointing may be given as
    `activation_checkpointing` or by its older name `gradient_checkpointing`."""
    from .compat import activation_checkpointing_field
    from .trainer_selfie import SelfieTrainingArguments

    name = recipe.get("name", "<unnamed>")
    unknown = [key for key in recipe if key not in RECIPE_TOP_LEVEL]
    if unknown:
        raise ValueError(f"Recipe {name!r} has unknown key(s) {unknown}; the keys are {list(RECIPE_TOP_LEVEL)}.")
    training = dict(recipe.get("training", {}))
    checkpointing = [key for key in CHECKPOINTING_NAMES if key in training]
    if len(checkpointing) == 2:
        raise ValueError(f"Recipe {name!r} gives both {' and '.join(CHECKPOINTING_NAMES)}: keep one.")
    if checkpointing:
        training[activation_checkpointing_field()] = training.pop(checkpointing[0])
    allowed = {item.name for item in fields(SelfieArguments) if item.name not in RUN_OPTIONS}
    allowed |= {item.name for item in fields(SelfieTrainingArguments) if item.init} - set(PER_RUN_TRAINING_OPTIONS)
    for key in training:
        if key not in allowed:
            per_run = key in RUN_OPTIONS + PER_RUN_TRAINING_OPTIONS
            hint = " (a per-run option: give it on the command line)" if per_run else ""
            raise ValueError(
                f"Recipe {name!r}: unknown training key {key!r}{hint}. Keys are the SELFIE settings "
                "(python -m modeling_selfie.training --help) and TrainingArguments fields (--help-all)."
            )
    if "sample_rates" in training:
        raise ValueError(f"Recipe {name!r}: sample_rates belongs at the top level, next to datasets.")
    if "seed" in recipe:
        if "data_seed" in training and training["data_seed"] != recipe["seed"]:
            raise ValueError(f"Recipe {name!r} gives two data seeds: seed {recipe['seed']} and data_seed.")
        training["data_seed"] = recipe["seed"]
    if "sample_rates" in recipe:
        training["sample_rates"] = recipe["sample_rates"]
    return training


def read_datasets_file(path: str | os.PathLike) -> dict:
    """The `--datasets` file: `{"datasets": [...]}` with optionally `"sample_rates"`, or a bare list of entries."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--datasets {str(path)!r} does not exist.") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"--datasets {str(path)!r} is not valid JSON: {error}") from error
    if isinstance(data, list):
        data = {"datasets": data}
    extra = set(data) - {"datasets", "sample_rates"} if isinstance(data, dict) else None
    if extra is None or extra or not isinstance(data.get("datasets"), list) or not data["datasets"]:
        raise ValueError(
            f"--datasets {str(path)!r} must hold {{\"datasets\": [entries], \"sample_rates\": {{task: rate}}}} "
            f"(sample_rates optional), or a list of entries{f'; unknown key(s) {sorted(extra)}' if extra else ''}."
        )
    return data


@dataclass
class RunSettings:
    """A run's resolved options: the two argument dataclasses, the recipe and each setting's value and source."""

    script: "SelfieArguments"
    training: "SelfieTrainingArguments"  # noqa: F821  (modeling_selfie.trainer_selfie)
    recipe: dict
    values: dict
    sources: dict

    def rows(self, shared: bool = False) -> list[tuple[str, str, str]]:
        """(setting, value, source) for the table: `TABLE_KEYS`, then every other setting a recipe or flag gave.
        `shared`: without `LOCAL_SETTINGS` and with local paths cut to their last part (for final/ and the card)."""
        keys = list(TABLE_KEYS) + sorted(k for k, s in self.sources.items() if s != "default" and k not in TABLE_KEYS)
        keys = [key for key in keys if key in self.values and not (shared and key in LOCAL_SETTINGS)]
        shown = without_local_paths if shared else (lambda value: value)
        return [(key, _format_value(shown(self.values[key])), self.sources[key]) for key in keys]

    def table(self, shared: bool = False) -> str:
        """The settings as a markdown table (`shared`: see `rows`)."""
        rows = [("setting", "value", "from"), *self.rows(shared)]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)

    def to_json(self, shared: bool = False) -> str:
        """The settings and the recipe as JSON (`shared`: see `rows`)."""
        shown = without_local_paths if shared else (lambda value: value)
        settings = {
            key: {"value": shown(self.values[key]), "from": self.sources[key]} for key, _, _ in self.rows(shared)
        }
        return json.dumps({"settings": settings, "recipe": shown(self.recipe)}, indent=2, default=str)

    def files(self, shared: bool = False) -> dict[str, str]:
        """`settings.json` and `settings.md` (file name -> text)."""
        return {"settings.json": self.to_json(shared) + "\n", "settings.md": self.table(shared) + "\n"}


def without_local_paths(value):
    """`value` with every absolute path (in strings, lists and dicts) cut to its last part: what a shared card or
    settings file may say about this machine's files."""
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    if isinstance(value, dict):
        return {key: without_local_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_local_paths(item) for item in value]
    return value


def _format_value(value) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def resolve_settings(argv: Sequence[str]) -> RunSettings:
    """Defaults < the recipe's settings < the flags given in `argv`; raises `ValueError` for a bad recipe or
    `--datasets` file."""
    from .compat import activation_checkpointing_field, checkpointing_argv
    from .trainer_selfie import SelfieTrainingArguments

    argv = checkpointing_argv(argv)
    values = vars(_parser().parse_args(argv))
    given = set(vars(_parser(suppress_defaults=True).parse_args(argv)))
    recipe = copy.deepcopy(load_recipe(values["recipe"]))
    recipe.setdefault("name", Path(values["recipe"]).stem)
    datasets_source = "recipe"
    if values["datasets"] is not None:
        recipe.update(read_datasets_file(values["datasets"]))
        datasets_source = f"flag: {Path(values['datasets']).name}"
    from_recipe = recipe_settings(recipe)
    sources = {key: "flag" if key in given else "default" for key in values}
    for key, value in from_recipe.items():
        if key not in given:
            values[key], sources[key] = value, "recipe" if key != "sample_rates" else datasets_source
    if isinstance(values["sample_rates"], str):
        values["sample_rates"] = parse_sample_rates(values["sample_rates"])
    if values["sample_rates"] is None:
        values["sample_rates"] = {}  # every dataset entry then needs a "rate"
    if "use_cpu" not in given and not accelerator_available():
        values["use_cpu"], sources["use_cpu"] = True, "derived: no GPU"
    if values["lora_rank"] == 0 and values["vision_lora_rank"]:
        raise ValueError("vision_lora_rank needs lora_rank > 0 (lora_rank 0 trains every weight, vision included).")
    script = SelfieArguments(**{f.name: values[f.name] for f in fields(SelfieArguments)})
    training = SelfieTrainingArguments(**{f.name: values[f.name] for f in fields(SelfieTrainingArguments) if f.init})
    values["world_size"], sources["world_size"] = training.world_size, "derived: launcher"
    values["total_batch_size"] = (
        training.per_device_train_batch_size * training.gradient_accumulation_steps * training.world_size
    )
    sources["total_batch_size"] = "derived: batch x accum. x procs"
    values["datasets_file"], sources["datasets_file"] = values["datasets"], sources["datasets"]
    values["datasets"] = [entry["name"] for entry in recipe.get("datasets", [])]
    sources["datasets"] = datasets_source
    field_name = activation_checkpointing_field()
    values["activation_checkpointing"] = values.pop(field_name)  # one row, whatever the release calls it
    sources["activation_checkpointing"] = sources.pop(field_name)
    values.pop("gradient_checkpointing", None)
    sources.pop("gradient_checkpointing", None)
    data_seed = values["data_seed"] if values["data_seed"] is not None else values["seed"]
    recipe = {**recipe, "seed": data_seed, "sample_rates": values["sample_rates"]}
    return RunSettings(script, training, recipe, values, sources)


def _conversation_words(dataset, limit: int = 1000) -> list[str]:
    """Words of the conversations of the first `limit` samples (the vocabulary of a `selfie-tiny` model)."""
    words = {}
    for i in range(min(len(dataset), limit)):
        for turn in dataset[i]["conversation"]:
            for word in re.split(r"[ \n.,?!:;]+", turn["content"]):
                words.setdefault(word, None)
    words.pop("", None)
    return list(words)


def load_model_and_processor(model: str, processor: str | None = None, dtype=None, train_dataset=None) -> tuple:
    """The model and processor to train (`SelfieForSegmentation`, `SelfieProcessor`, weights in `dtype`, default
    float32): a checkpoint folder, or `selfie-tiny` built on `train_dataset`'s words."""
    import torch

    from .loading import load_model_and_processor as load_checkpoint

    dtype = torch.float32 if dtype is None else dtype
    if model == "selfie-tiny":
        from .presets import tiny_model_and_processor

        if train_dataset is None:
            raise ValueError("The selfie-tiny preset reads its vocabulary from the training data: pass train_dataset.")
        tiny, tiny_processor = tiny_model_and_processor(_conversation_words(train_dataset))
        return tiny.to(dtype).train(), tiny_processor
    if not Path(model).is_dir():
        raise ValueError(
            f"--model {model!r} is neither a checkpoint folder nor the preset 'selfie-tiny' (the 2B and "
            "8B presets have no weights or tokenizer: convert a checkpoint with selfie-convert)."
        )
    loaded, loaded_processor = load_checkpoint(model, dtype=dtype, processor_source=processor)
    return loaded.train(), loaded_processor


def cpu_threads(cores: int, local_processes: int, environ: dict, load: float = 0.0) -> int | None:
    """Intra-op threads for each CPU training process: `None` (torch's or the user's choice) when
    `OMP_NUM_THREADS` is set, else the cores other work leaves idle (`cores` minus the whole part of the `load`
    average, at least 1) shared among the processes of this machine, at least 1 each. torch would otherwise start
    one thread per core in every process: N processes on C cores run N x C threads, and a thread that waits for a
    busy core stalls the others at every operation (a step was 30x slower with 2 threads than with 1 on 2 cores that
    other work kept busy, `docs/performance.md`)."""
    if environ.get("OMP_NUM_THREADS"):
        return None
    idle = max(1, cores - int(load))
    return max(1, idle // max(1, local_processes))


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the platform reports it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def training_method(argv: list[str]) -> tuple[str, list[str]]:
    """`--method` (one of `METHODS`; default `sft`: this module's supervised run) and the other arguments; raises
    `ValueError` for another method."""
    for i, arg in enumerate(argv):
        if arg == "--method" or arg.startswith("--method="):
            value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if value not in METHODS:
                raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {value!r}")
            return value, [*argv[:i], *argv[i + (1 if "=" in arg else 2) :]]
    return "sft", list(argv)


def main(argv: list[str] | None = None) -> int:
    """Train on a recipe's mixture, then write the merged checkpoint (bf16 when training in bf16) with its card and
    settings, and push it with `--push-to-hub`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        method, argv = training_method(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if method == "grpo":
        from .train_grpo import main as grpo_main

        return grpo_main(argv)
    if printed_help(argv, short_help, _parser):
        return 0
    import torch

    from .data.registry import build_mixture
    from .hub import check_push_access
    from .io_utils import atomic_output_file
    from .trainer_selfie import SelfieDataCollator, SelfieTrainer, apply_lora, merge_and_save

    try:
        run = resolve_settings(argv)
        if run.training.push_to_hub:
            check_push_access(run.training.hub_token)
        # TrainingArguments come first: with ZeRO-3 they make from_pretrained partition the weights as it loads them.
        train_dataset = build_mixture(run.recipe, run.script.data_root, train=True, shuffle=True)
        eval_dataset = None
        if run.script.eval_recipe:
            eval_dataset = build_mixture(run.script.eval_recipe, run.script.data_root, train=False, shuffle=False)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    script, args = run.script, run.training
    if args.use_cpu:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        threads = cpu_threads(usable_cores(), processes, os.environ, load)
        if threads is not None:
            torch.set_num_threads(threads)
            if args.process_index == 0:
                print(f"CPU threads per process: {threads} ({usable_cores()} cores, {processes} process(es) here, "
                      f"load {load:.1f}; OMP_NUM_THREADS sets it)", flush=True)
    if args.process_index == 0:
        print(f"SELFIE training settings ({args.world_size} process(es)):\n{run.table()}", flush=True)
        for name, text in run.files().items():
            with atomic_output_file(Path(args.output_dir) / name) as staging:
                staging.write_text(text, encoding="utf-8")

    try:
        model, processor = load_model_and_processor(
            script.model, script.processor, getattr(torch, script.model_dtype), train_dataset
        )
    except (ValueError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if script.lora_rank > 0:
        model = apply_lora(
            model,
            script.lora_rank,
            script.lora_alpha,
            script.lora_dropout,
            target_modules=script.lora_target_modules,
            vision_lora=script.vision_lora_rank > 0,
            vision_target_modules=script.vision_lora_target_modules,
            vision_rank=script.vision_lora_rank or None,
            vision_alpha=script.vision_lora_alpha,
        )
    trainer = SelfieTrainer(
        model=model,
        args=args,
        data_collator=SelfieDataCollator(processor, script.max_tiles, script.model_max_length),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
    )
    resume = args.resume_from_checkpoint
    if resume == "last":
        resume = last_complete_checkpoint(args.output_dir)
        if args.process_index == 0:
            print(f"resuming from {resume}" if resume else f"no complete checkpoint in {args.output_dir}: starting")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()

    final_dir = script.final_dir or os.path.join(args.output_dir, "final")
    repo_id = args.hub_model_id or Path(args.output_dir).absolute().name
    card = {"base_model": script.base_model, "recipe": without_local_paths(run.recipe), "settings": run.table(True)}
    extra_files = {"README.md": str(trainer.model_card(repo_id, **card)), **run.files(shared=True)}
    merged = merge_and_save(
        trainer, final_dir, dtype=torch.bfloat16 if args.bf16 else None, overwrite=True, extra_files=extra_files
    )
    if trainer.is_world_process_zero():
        print(f"wrote {final_dir}")
        if args.push_to_hub:
            print(f"pushed {trainer.push_merged(merged, **card)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
