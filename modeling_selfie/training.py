"""Training SELFIE with the transformers `Trainer`: batch collation, a trainer that logs each loss term, LoRA and
merging the LoRA into a plain checkpoint.

Public API
----------
* [`SelfieDataCollator`]: dataset samples (`modeling_selfie.data.sample`) -> one model batch.
* [`SelfieTrainer`]: `transformers.Trainer` that takes the loss from the model and logs `text_loss`,
  `mask_bce_loss` and `mask_dice_loss` next to `loss`, in training and evaluation.
* [`apply_lora`]: wrap the LLM (and optionally the vision tower) with LoRA; `seg_head`, `embed_tokens` and
  `lm_head` are trained fully and saved with the adapter.
* [`merge_and_save`]: merge the LoRA and write a plain checkpoint (model + processor) that
  `SelfieForSegmentation.from_pretrained` loads.
* [`SelfieTrainingArguments`]: `TrainingArguments` with `vision_learning_rate` (the vision tower's param group).
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

CPU threads: without `OMP_NUM_THREADS`, each CPU process uses its usable cores divided by the processes on the
machine (`LOCAL_WORLD_SIZE`, set by torchrun / accelerate), not torch's one thread per core in every process.

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
* FSDP (FSDP2, one unit per `InternVLVisionLayer` and per `Qwen2DecoderLayer`):
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

Loss scaling: the model's `loss` is a per-batch mean (text cross entropy over the batch's supervised tokens, mask
losses normalised by `config.mask_loss_normalization`), so the trainer does not pass `num_items_in_batch` to the
model and divides by the gradient accumulation steps like for any per-batch loss.
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

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import HfArgumentParser, Trainer, TrainingArguments

from .data.registry import load_recipe
from .compat import activation_checkpointing_field, checkpointing_argv, use_plain_cpu_device
from .data.sample import check_sample
from .io_utils import atomic_output_dir, atomic_output_file
from .modeling_selfie import SelfieForSegmentation
from .processing_selfie import SelfieProcessor

LOSS_COMPONENTS = ("text_loss", "mask_bce_loss", "mask_dice_loss")
LLM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2")
FULLY_TRAINED_MODULES = ("seg_head", "embed_tokens", "lm_head")


# ----------------------------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------------------------


class SelfieDataCollator:
    """Turn a list of samples (the dicts of `modeling_selfie.data.sample`) into one model batch.

    A batch may mix segmentation samples (any number of `[SEG]`, each with its mask), VQA samples (an image, no
    mask) and text-only samples (`image=None`), and images of different tile grids.

    Args:
        processor ([`SelfieProcessor`]): renders, tokenizes, tiles and builds `labels` / `mask_labels`.
        max_tiles (`int`, *optional*): most tiles per image (the image processor's `max_patches`); `None` keeps the
            processor's setting (1 tile for the released model).
        max_length (`int`, *optional*): most tokens per sample (image tokens included; the recipes' `model_max_length`).
            A longer sample loses its last exchanges (question, answer and the answer's masks) until it fits; one
            whose first exchange does not fit raises a `ValueError`. `None`: no limit.

    Returns (from `__call__`):
        `dict` with `input_ids`, `attention_mask`, `labels` `[B, L]`, `mask_labels` (list of `[n_seg, H, W]`,
        `n_seg` may be 0) and, when a sample has an image, `pixel_values` `[T, 3, S, S]` and `tile_grid`
        `[num_images, 2]`.
    """

    def __init__(self, processor: SelfieProcessor, max_tiles: int | None = None, max_length: int | None = None):
        for name, value in (("max_tiles", max_tiles), ("max_length", max_length)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}.")
        self.processor = processor
        self.max_tiles = max_tiles
        self.max_length = max_length

    def _process(self, samples: Sequence[dict]):
        image_kwargs = {} if self.max_tiles is None else {"max_patches": self.max_tiles}
        return self.processor(
            images=[sample.get("image") for sample in samples],
            conversations=[sample["conversation"] for sample in samples],
            masks=[sample["masks"] for sample in samples],
            return_labels=True,
            **image_kwargs,
        )

    def _shorten(self, sample: dict, where: str) -> dict:
        """`sample` without its last exchanges (user turn, assistant turn, the assistant turn's masks) until it has
        at most `max_length` tokens."""
        conversation, masks = list(sample["conversation"]), sample["masks"]
        while True:
            candidate = {**sample, "conversation": conversation, "masks": masks}
            length = int(self._process([candidate])["attention_mask"].sum())
            if length <= self.max_length:
                return candidate
            last_user = max(i for i, turn in enumerate(conversation) if turn["role"] == "user")
            if last_user == 0:
                raise ValueError(
                    f"{where} has {length} tokens with its first exchange alone, more than model_max_length "
                    f"{self.max_length}: raise model_max_length or lower max_tiles."
                )
            kept = sum(t["content"].count("[SEG]") for t in conversation[:last_user] if t["role"] == "assistant")
            conversation, masks = conversation[:last_user], masks[:kept]

    def __call__(self, samples: Sequence[dict]) -> dict:
        if not samples:
            raise ValueError("SelfieDataCollator got an empty list of samples.")
        wheres = [f"batch sample {i} (source {sample.get('source', '?')!r})" for i, sample in enumerate(samples)]
        for sample, where in zip(samples, wheres):
            check_sample(sample, where=where)
        batch = self._process(samples)
        if self.max_length is not None:
            lengths = batch["attention_mask"].sum(1).tolist()
            if max(lengths) > self.max_length:
                samples = [
                    self._shorten(sample, where) if length > self.max_length else sample
                    for sample, where, length in zip(samples, wheres, lengths)
                ]
                batch = self._process(samples)
        keys = ("input_ids", "attention_mask", "pixel_values", "tile_grid", "labels", "mask_labels")
        return {key: batch[key] for key in keys if key in batch}


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SelfieTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the vision tower's own learning rate (SELF1E trains the vision LoRA at
    `--vision_lr`)."""

    vision_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "learning rate of the vision tower's trainable weights (its own optimizer param group, on the "
            "same schedule); default: --learning-rate"
        },
    )


def vision_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the trainable parameters inside the vision tower (its LoRA, or its weights when fully trained)."""
    return {name for name, p in model.named_parameters() if p.requires_grad and ".vision_tower." in f".{name}"}


class SelfieTrainer(Trainer):
    """`transformers.Trainer` for [`SelfieForSegmentation`] (plain or wrapped by peft).

    * The loss is the model's `loss`; its terms `text_loss`, `mask_bce_loss` and `mask_dice_loss` are logged like
      `loss`: averaged over the micro-batches of the logging interval (and over processes) in training, and as
      `{prefix}_text_loss`, ... next to `eval_loss` by `evaluate()` (averaged over samples).
    * `args.remove_unused_columns` must be `False`: the collator needs the raw samples (image, conversation,
      masks) and the batches hold `mask_labels`, a list.
    * `data_collator` defaults to [`SelfieDataCollator`] of `processing_class`.
    * Evaluation computes the losses (segmentation metrics: `modeling_selfie.evaluation`).
    * `args.ddp_find_unused_parameters` defaults to `True`: a DDP batch without images or without `[SEG]` leaves
      the vision tower or the segmentation head unused.
    * With [`SelfieTrainingArguments`]`.vision_learning_rate`, the vision tower's trainable weights form their own
      optimizer param groups at that rate (the schedule scales every group alike).
    * With `args.push_to_hub`, checkpoints are not pushed (`hub_strategy` is set to `"end"`: they hold PEFT adapters
      that need this code and the base model); [`push_to_hub`](#SelfieTrainer.push_to_hub) pushes the merged model.
    """

    # The model's loss is a per-batch mean: `training_step` divides it by the gradient accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model=None,
        args: TrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        **kwargs,
    ):
        if args is None:
            raise ValueError("SelfieTrainer needs TrainingArguments with remove_unused_columns=False.")
        if args.remove_unused_columns:
            raise ValueError(
                "SelfieTrainer needs TrainingArguments(remove_unused_columns=False): the collator reads the samples' "
                "image, conversation and masks, which are not arguments of the model's forward."
            )
        if args.label_smoothing_factor or kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "SelfieTrainer takes the loss from the model (text and mask terms): label_smoothing_factor and "
                "compute_loss_func would replace it by a text-only loss."
            )
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = True
        if args.push_to_hub:
            args.hub_strategy = "end"
        use_plain_cpu_device(args)
        if data_collator is None and isinstance(processing_class, SelfieProcessor):
            data_collator = SelfieDataCollator(processing_class)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # `num_items_in_batch` would normalise only the text loss across micro-batches, not the mask losses.
        self.model_accepts_loss_kwargs = False
        self._component_totals: dict[str, torch.Tensor] = {}

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer; with `args.vision_learning_rate`, each param group's vision-tower parameters
        move to a group of their own at that learning rate (same weight decay)."""
        optimizer = super().create_optimizer(model)
        vision_lr = getattr(self.args, "vision_learning_rate", None)
        if vision_lr is None:
            return optimizer
        opt_model = self.model if model is None else model
        vision = {id(p) for name, p in opt_model.named_parameters() if name in vision_parameter_names(opt_model)}
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in vision]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in vision]
                optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": moved,
                                           "lr": vision_lr})
        optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's loss; also accumulates its terms for logging (per micro-batch in training, per sample in
        evaluation)."""
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        mode = "train" if model.training else "eval"
        weight = 1 if mode == "train" else inputs["input_ids"].shape[0]
        self._accumulate_components(mode, outputs, weight)
        return (loss, outputs) if return_outputs else loss

    def _accumulate_components(self, mode: str, outputs, weight: int) -> None:
        """Add `weight * term` and `weight` to the running totals of `mode` (row 0: sums, row 1: weights)."""
        totals = self._component_totals.get(mode)
        if totals is None:
            totals = self._component_totals[mode] = torch.zeros(2, len(LOSS_COMPONENTS), device=self.args.device)
        for i, name in enumerate(LOSS_COMPONENTS):
            value = outputs.get(name)
            if value is not None:
                totals[0, i] += weight * value.detach().float().mean().to(totals.device)
                totals[1, i] += weight

    def _pop_component_means(self, mode: str, prefix: str = "") -> dict[str, float]:
        """Means of the terms accumulated in `mode` over all processes (a collective call), then reset them."""
        totals = self._component_totals.pop(mode, None)
        if totals is None:
            totals = torch.zeros(2, len(LOSS_COMPONENTS), device=self.args.device)
        totals = self.accelerator.reduce(totals, reduction="sum")
        return {
            f"{prefix}{name}": (totals[0, i] / totals[1, i]).item()
            for i, name in enumerate(LOSS_COMPONENTS)
            if totals[1, i] > 0
        }

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the loss terms' interval means to the periodic training logs (those that carry `loss`)."""
        if "loss" in logs:
            logs = {**logs, **self._pop_component_means("train")}
        super().log(logs, start_time)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """Evaluation as in `Trainer`, with `{metric_key_prefix}_{term}` for each loss term in the metrics."""
        self._component_totals.pop("eval", None)
        output = super().evaluation_loop(
            dataloader,
            description,
            prediction_loss_only=prediction_loss_only,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        output.metrics.update(self._pop_component_means("eval", prefix=f"{metric_key_prefix}_"))
        return output


    def model_card(
        self,
        repo_id: str,
        base_model: str | None = None,
        datasets: Sequence[str] | None = None,
        recipe: dict | None = None,
        settings: str | None = None,
        evaluation: dict | str | os.PathLike | list | None = None,
    ):
        """The card of the merged model: `base_model`, `datasets` (default: the recipe's dataset names), the recipe
        and the settings table (`settings`, markdown) in the Training section, and `evaluation` (an
        `modeling_selfie.evaluate` JSON or its dict; default: the last `eval_*` losses of this run)."""
        from .hub import model_card

        if evaluation is None:
            last = next((log for log in reversed(self.state.log_history) if "eval_loss" in log), None)
            if last is not None:
                name = (recipe or {}).get("name", "eval")
                metrics = {key: float(value) for key, value in last.items() if key.startswith("eval_") and
                           isinstance(value, (int, float)) and not key.endswith(("_runtime", "_per_second"))}
                evaluation = {"dataset": name, "split": "eval", "metrics": metrics}
        if datasets is None and recipe is not None:
            datasets = list(dict.fromkeys(entry["name"] for entry in recipe.get("datasets", [])))
        lines = [
            f"Fine-tuned with `SelfieTrainer` for {self.state.global_step} steps (learning rate "
            f"{self.args.learning_rate}, batch {self.args.per_device_train_batch_size} per device x "
            f"{self.args.gradient_accumulation_steps} accumulation x {self.args.world_size} processes); LoRA merged "
            "into the weights."
        ]
        if settings:
            lines += ["", "Effective settings (and where each came from):", "", settings.strip()]
        if recipe is not None:
            lines += ["", "Recipe:", "", "```json", json.dumps(recipe, indent=2), "```"]
        return model_card(repo_id, base_model=base_model, datasets=list(datasets) if datasets else None,
                          evaluation=evaluation, training="\n".join(lines))

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        base_model: str | None = None,
        datasets: Sequence[str] | None = None,
        recipe: dict | None = None,
        settings: str | None = None,
        evaluation: dict | str | os.PathLike | list | None = None,
        **kwargs,
    ) -> str | None:
        """Push the *merged* model (LoRA folded into the weights: a plain `SelfieForSegmentation` that loads
        without peft, with its remote-code files), the processor and a model card ([`model_card`] of the other
        arguments) to `args.hub_model_id`.

        The trained model is left as it is (a copy is merged). Sharded models (FSDP, ZeRO-3): call
        [`merge_and_save`] and `modeling_selfie.hub.push_to_hub` instead. Returns the commit URL on the main process.
        """
        if _is_sharded(self):
            raise NotImplementedError(
                "Sharded model: merge_and_save(trainer, dir), then modeling_selfie.hub.push_to_hub."
            )
        if not self.is_world_process_zero():
            return None
        model = self.accelerator.unwrap_model(self.model)
        merged = copy.deepcopy(model).merge_and_unload() if isinstance(model, PeftModel) else model
        return self.push_merged(merged, commit_message, token, private, base_model=base_model, datasets=datasets,
                                recipe=recipe, settings=settings, evaluation=evaluation)

    def push_merged(self, merged: SelfieForSegmentation, commit_message: str | None = None, token: str | None = None,
                    private: bool | None = None, **card) -> str:
        """Upload an already merged model with the processor and [`model_card`]`(**card)` to `args.hub_model_id`
        (default: the output folder's name); the commit URL."""
        from .hub import push_to_hub

        repo_id = self.hub_model_id or self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        return push_to_hub(
            merged, self.processing_class, repo_id, card=self.model_card(repo_id, **card),
            private=self.args.hub_private_repo if private is None else private,
            token=token or self.args.hub_token, commit_message=commit_message or "Upload SELFIE model",
        )


# ----------------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------------


def _module_pattern(prefix: str, names: Sequence[str], what: str) -> str:
    """Regex (peft full-match) for the modules called one of `names` under `prefix`."""
    names = tuple(names)
    bad = [name for name in names if not re.fullmatch(r"\w+", str(name))]
    if not names or bad:
        raise ValueError(f"{what} must be a non-empty list of module names such as 'q_proj', got {names!r}.")
    return rf"{prefix}\.(?:{'|'.join(names)})"


def apply_lora(
    model: SelfieForSegmentation,
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] = LLM_LORA_TARGETS,
    vision_lora: bool = False,
    vision_target_modules: Sequence[str] = VISION_LORA_TARGETS,
    modules_to_save: Sequence[str] = FULLY_TRAINED_MODULES,
    vision_rank: int | None = None,
    vision_alpha: float | None = None,
) -> PeftModel:
    """Wrap the LLM's projections (and with `vision_lora` the vision tower's) with LoRA adapters.

    Only the adapters and `modules_to_save` are trainable afterwards; `modules_to_save` (the segmentation head and
    both token embeddings by default: `[SEG]` is a new token) are trained fully and saved with the adapter. The
    projector stays frozen.

    Args:
        model ([`SelfieForSegmentation`]): the model to wrap (modified in place).
        rank, alpha, dropout: LoRA rank r, scaling numerator (the update is scaled by `alpha / rank`) and dropout.
        target_modules: names of the `Linear` layers to adapt inside each `Qwen2DecoderLayer`.
        vision_lora: also adapt the `vision_target_modules` of each `InternVLVisionLayer`.
        modules_to_save: names (suffixes) of modules trained and saved in full.
        vision_rank, vision_alpha: rank and alpha of the vision tower's adapters (default: `rank`, `alpha`); the
            dropout is shared (peft has one dropout per adapter).
    Returns:
        The `PeftModel` (train it; [`merge_and_save`] merges it).
    """
    if not isinstance(model, SelfieForSegmentation):
        raise TypeError(f"apply_lora expects a SelfieForSegmentation, got {type(model).__name__}.")
    for name, value in (("rank", rank), ("vision rank", rank if vision_rank is None else vision_rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"LoRA {name} must be a positive int, got {value!r}.")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")
    patterns = [
        _module_pattern(r"model\.language_model\.layers\.\d+\.(?:self_attn|mlp)", target_modules, "target_modules")
    ]
    rank_pattern, alpha_pattern = {}, {}
    if vision_lora:
        vision_pattern = _module_pattern(
            r"model\.vision_tower\.encoder\.layer\.\d+\.(?:attention|mlp)",
            vision_target_modules,
            "vision_target_modules",
        )
        patterns.append(vision_pattern)
        rank_pattern[vision_pattern] = rank if vision_rank is None else vision_rank
        alpha_pattern[vision_pattern] = alpha if vision_alpha is None else vision_alpha
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="|".join(f"(?:{p})" for p in patterns),
        modules_to_save=list(modules_to_save),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    return get_peft_model(model, config)


# ----------------------------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------------------------


def _is_sharded(trainer: Trainer) -> bool:
    """Whether the trainer's parameters are sharded across processes (FSDP or DeepSpeed ZeRO-3)."""
    if trainer.is_fsdp_enabled:
        return True
    return trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3


def _unsharded_copy(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of `model` (a `PeftModel` or a plain model) that holds the full `state_dict`, built without
    allocating weights (meta device) and without touching `model`'s own, possibly sharded, parameters."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    with torch.device("meta"):
        replica = type(base)(copy.deepcopy(base.config))
        if isinstance(model, PeftModel):
            replica = get_peft_model(replica, copy.deepcopy(model.peft_config[model.active_adapter]))
    missing, unexpected = replica.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"The gathered state dict does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}."
        )
    # Non-persistent buffers (rotary frequencies) are in no state dict; sharding leaves them whole on every process.
    device = next(iter(state_dict.values())).device
    buffers = dict(model.named_buffers())
    for name, buffer in replica.named_buffers():
        if buffer.is_meta:
            module_name, _, buffer_name = name.rpartition(".")
            setattr(replica.get_submodule(module_name), buffer_name, buffers[name].detach().to(device, copy=True))
    return replica


def merge_and_save(
    trainer_or_model: Trainer | PeftModel | SelfieForSegmentation,
    output_dir: str | os.PathLike,
    processor: SelfieProcessor | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> SelfieForSegmentation | None:
    """Merge the LoRA adapters into the weights and write a plain checkpoint (model + processor), atomically.

    A `PeftModel` is merged in place (`merge_and_unload`): do not train it further. A plain model is saved as it
    is. Given a trainer, its model is used; if it is sharded (FSDP, ZeRO-3) the full weights are first gathered onto
    the main process (call this on every process) and merged into a copy there.

    Args:
        trainer_or_model: a [`SelfieTrainer`] after training, or the model.
        output_dir: folder to write; `SelfieForSegmentation.from_pretrained(output_dir)` and
            `SelfieProcessor.from_pretrained(output_dir)` load it.
        processor: the processor to save with the model (default: the trainer's `processing_class`).
        dtype: cast the merged weights to this dtype before saving (e.g. `torch.bfloat16`).
        overwrite: replace an existing `output_dir`.
        extra_files: file name -> text, written into the folder with the model (a model card, the settings).
    Returns:
        The merged model on the main process, `None` on the others.
    """
    trainer = trainer_or_model if isinstance(trainer_or_model, Trainer) else None
    if trainer is not None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        processor = processor if processor is not None else trainer.processing_class
        if _is_sharded(trainer):
            state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
            if trainer.accelerator.is_main_process:
                model = _unsharded_copy(model, state_dict)
        is_main = trainer.accelerator.is_main_process
    else:
        model, is_main = trainer_or_model, True
    if processor is None:
        raise ValueError("merge_and_save needs the processor to write a usable checkpoint: pass processor=.")

    merged = None
    if is_main:
        merged = model.merge_and_unload() if isinstance(model, PeftModel) else model
        if not isinstance(merged, SelfieForSegmentation):
            raise TypeError(
                f"merge_and_save expects a SelfieForSegmentation (or its PeftModel), got {type(merged).__name__}."
            )
        if dtype is not None:
            merged = merged.to(dtype)
        with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
            merged.save_pretrained(staging)
            processor.save_pretrained(staging)
            for name, text in (extra_files or {}).items():
                (staging / name).write_text(text, encoding="utf-8")
    if trainer is not None:
        trainer.accelerator.wait_for_everyone()
    return merged


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
SHORT_HELP = """\
usage: python -m modeling_selfie.training --model DIR --recipe RECIPE --data-root DATA --output-dir OUT [options]

Fine-tune SELFIE (an InternVL3 MLLM that segments with one [SEG] token) on a recipe's data mixture with the
transformers Trainer and LoRA, then write the merged model to OUT/final (loads with SelfieForSegmentation or,
without this package, AutoModel.from_pretrained(..., trust_remote_code=True)).

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


def _parser(suppress_defaults: bool = False) -> HfArgumentParser:
    """The command-line parser; with `suppress_defaults` it only returns the options given (to tell flags from
    defaults)."""
    parser = HfArgumentParser((SelfieArguments, SelfieTrainingArguments))
    if suppress_defaults:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
    else:
        parser.set_defaults(**SCRIPT_DEFAULTS, bf16=_bf16_available())
    return parser


def short_help() -> str:
    """`--help`: what the script does, the SELFIE options, common Trainer options and an example."""
    vision_lr = next(item for item in fields(SelfieTrainingArguments) if item.name == "vision_learning_rate")
    options = []
    for item in [*fields(SelfieArguments), vision_lr]:
        flag = "--" + item.name.replace("_", "-")
        options.append(
            textwrap.fill(item.metadata["help"], 116, initial_indent=f"  {flag:<34} ", subsequent_indent=" " * 37)
        )
    return SHORT_HELP.format(options="\n".join(options) + "\n")


def _bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _accelerator_available() -> bool:
    """Whether a GPU (or another accelerator torch knows) is there; without one the run uses the CPU."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


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

    script: SelfieArguments
    training: SelfieTrainingArguments
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
    if "use_cpu" not in given and not _accelerator_available():
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


def _conversation_words(dataset, limit: int = 1000) -> list[str]:
    """Words of the conversations of the first `limit` samples (the vocabulary of a `selfie-tiny` model)."""
    words = {}
    for i in range(min(len(dataset), limit)):
        for turn in dataset[i]["conversation"]:
            for word in re.split(r"[ \n.,?!:;]+", turn["content"]):
                words.setdefault(word, None)
    words.pop("", None)
    return list(words)


def load_model_and_processor(
    model: str, processor: str | None = None, dtype: torch.dtype = torch.float32, train_dataset=None
) -> tuple[SelfieForSegmentation, SelfieProcessor]:
    """The model and processor to train: a checkpoint folder, or `selfie-tiny` built on `train_dataset`'s words."""
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
    loaded = SelfieForSegmentation.from_pretrained(model, dtype=dtype)
    loaded_processor = SelfieProcessor.from_pretrained(processor or model)
    loaded_processor.check_model(loaded.config)
    return loaded.train(), loaded_processor


def cpu_threads(cores: int, local_processes: int, environ: dict) -> int | None:
    """Intra-op threads for each CPU training process: `None` (leave torch's choice) when `OMP_NUM_THREADS` is set,
    else the cores this process may use shared among the processes of this machine (at least 1). torch would
    otherwise start one thread per core in every process, and N processes on C cores would run N x C threads."""
    if environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, cores // max(1, local_processes))


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the platform reports it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    """Train on a recipe's mixture, then write the merged checkpoint (bf16 when training in bf16) with its card and
    settings, and push it with `--push-to-hub`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(short_help())
        return 0
    if "--help-all" in argv:
        _parser().print_help()
        return 0
    from .data.registry import build_mixture
    from .hub import check_push_access

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
        threads = cpu_threads(usable_cores(), int(os.environ.get("LOCAL_WORLD_SIZE", 1)), os.environ)
        if threads is not None:
            torch.set_num_threads(threads)
    if args.process_index == 0:
        print(f"SELFIE training settings ({args.world_size} process(es)):\n{run.table()}", flush=True)
        for name, text in run.files().items():
            with atomic_output_file(Path(args.output_dir) / name) as staging:
                staging.write_text(text, encoding="utf-8")

    try:
        model, processor = load_model_and_processor(
            script.model, script.processor, getattr(torch, script.model_dtype), train_dataset
        )
    except ValueError as error:
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
