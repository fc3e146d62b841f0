"""Training SELFIE with the transformers `Trainer`: batch collation, a trainer that logs each loss term, LoRA and
merging the LoRA into a plain checkpoint. Importable from `modeling_selfie.training` too (its command line loads this
module once the arguments are read, so that `--help` needs no torch).

* [`SelfieDataCollator`]: dataset samples (`modeling_selfie.data.sample`) -> one model batch.
* [`SelfieTrainer`]: `transformers.Trainer` that takes the loss from the model and logs `text_loss`,
  `mask_bce_loss` and `mask_dice_loss` next to `loss`, in training and evaluation.
* [`selfie_lora_config`]: the peft `LoraConfig` of SELFIE's LoRA (`peft_config` of TRL's trainers).
* [`apply_lora`]: wrap the LLM (and optionally the vision tower) with LoRA; `seg_head`, `embed_tokens` and
  `lm_head` are trained fully and saved with the adapter.
* [`merge_and_save`]: merge the LoRA and write a plain checkpoint (model + processor) that
  `SelfieForSegmentation.from_pretrained` loads.
* [`SelfieTrainingArguments`]: `TrainingArguments` with `vision_learning_rate` (the vision tower's param group).

Loss scaling: the model's `loss` is a per-batch mean (text cross entropy over the batch's supervised tokens, mask
losses normalised by `config.mask_loss_normalization`), so the trainer does not pass `num_items_in_batch` to the
model and divides by the gradient accumulation steps like for any per-batch loss.
"""

import copy
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from .compat import use_plain_cpu_device
from .data.sample import check_sample
from .io_utils import atomic_output_dir
from .modeling_selfie import SelfieForSegmentation
from .processing_selfie import SelfieProcessor
from .training_defaults import LLM_LORA_TARGETS, VISION_LEARNING_RATE_HELP, VISION_LORA_TARGETS

LOSS_COMPONENTS = ("text_loss", "mask_bce_loss", "mask_dice_loss")
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

    vision_learning_rate: float | None = field(default=None, metadata={"help": VISION_LEARNING_RATE_HELP})


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
        evaluation). The forward keeps no key-value cache (`use_cache=False`): a loss needs none, and activation
        checkpointing would otherwise turn it off with a warning."""
        inputs = {**inputs, "use_cache": False}
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


def selfie_lora_config(
    rank: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    target_modules: Sequence[str] = LLM_LORA_TARGETS,
    vision_lora: bool = False,
    vision_target_modules: Sequence[str] = VISION_LORA_TARGETS,
    modules_to_save: Sequence[str] = FULLY_TRAINED_MODULES,
    vision_rank: int | None = None,
    vision_alpha: float | None = None,
) -> LoraConfig:
    """The peft `LoraConfig` of SELFIE's LoRA: adapters on the LLM's projections (and with `vision_lora` the vision
    tower's), `modules_to_save` trained fully. [`apply_lora`] wraps a model with it; TRL's trainers take it as
    `peft_config`.

    Args:
        rank, alpha, dropout: LoRA rank r, scaling numerator (the update is scaled by `alpha / rank`) and dropout.
        target_modules: names of the `Linear` layers to adapt inside each decoder layer of the text model.
        vision_lora: also adapt the `vision_target_modules` of each `InternVLVisionLayer`.
        modules_to_save: names (suffixes) of modules trained and saved in full (the segmentation head and both token
            embeddings by default: `[SEG]` is a new token). The projector stays frozen.
        vision_rank, vision_alpha: rank and alpha of the vision tower's adapters (default: `rank`, `alpha`); the
            dropout is shared (peft has one dropout per adapter).
    """
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
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="|".join(f"(?:{p})" for p in patterns),
        modules_to_save=list(modules_to_save),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )


def apply_lora(model: SelfieForSegmentation, rank: int = 8, alpha: float = 16, dropout: float = 0.05,
               **kwargs) -> PeftModel:
    """Wrap the LLM's projections (and with `vision_lora` the vision tower's) with LoRA adapters: `get_peft_model`
    with [`selfie_lora_config`]`(rank, alpha, dropout, **kwargs)` (its arguments).

    Only the adapters and `modules_to_save` are trainable afterwards. `model` is modified in place.

    Returns:
        The `PeftModel` (train it; [`merge_and_save`] merges it).
    """
    if not isinstance(model, SelfieForSegmentation):
        raise TypeError(f"apply_lora expects a SelfieForSegmentation, got {type(model).__name__}.")
    return get_peft_model(model, selfie_lora_config(rank, alpha, dropout, **kwargs))


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
