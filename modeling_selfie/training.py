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
* `python -m modeling_selfie.training`: the training entry point (`--help` lists every option: the SELFIE ones
  below and all of `transformers.TrainingArguments`).

Launching
---------
Run from the repository root (the launch configs name each other by relative path). `TRAIN` stands for the script
and its arguments, e.g.::

    -m modeling_selfie.training --model /ckpt/selfie-8b --recipe self1e-seg --data-root /data \\
        --output-dir runs/exp1 --per-device-train-batch-size 4 --learning-rate 1e-4 --activation-checkpointing

(`--recipe` takes a recipe file or a shipped name, `configuration/recipes/<name>.json`). Training uses LoRA of rank
8 on the LLM by default (`--lora-rank 0` trains every weight, `--vision-lora` adds the vision tower), bf16 when the
GPU has it, and ends by writing the merged checkpoint to `OUTPUT_DIR/final`. `--resume-from-checkpoint last`
continues from the newest checkpoint in the output folder (or give a checkpoint folder).

* one process (CPU or one GPU): `python TRAIN`;
* DDP on all GPUs of a node: `accelerate launch --config_file configuration/launch/ddp.yaml TRAIN`
  (or `torchrun --nproc_per_node 8 TRAIN`);
* DeepSpeed ZeRO-2 / ZeRO-3: `accelerate launch --config_file configuration/launch/deepspeed_zero2.yaml TRAIN`
  (`deepspeed_zero3.yaml` for ZeRO-3), or `torchrun ... TRAIN --deepspeed configuration/launch/zero2.json`;
* FSDP (FSDP2, one unit per `InternVLVisionLayer` and per `Qwen2DecoderLayer`):
  `accelerate launch --config_file configuration/launch/fsdp.yaml TRAIN`. FSDP checkpoints activations itself
  (`fsdp_activation_checkpointing` in the yaml): do not add `--activation-checkpointing` (alias
  `--gradient-checkpointing`) there.

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

import copy
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import HfArgumentParser, Trainer, TrainingArguments

from .data.sample import check_sample
from .io_utils import atomic_output_dir
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

    Returns (from `__call__`):
        `dict` with `input_ids`, `attention_mask`, `labels` `[B, L]`, `mask_labels` (list of `[n_seg, H, W]`,
        `n_seg` may be 0) and, when a sample has an image, `pixel_values` `[T, 3, S, S]` and `tile_grid`
        `[num_images, 2]`.
    """

    def __init__(self, processor: SelfieProcessor, max_tiles: int | None = None):
        if max_tiles is not None and (not isinstance(max_tiles, int) or max_tiles < 1):
            raise ValueError(f"max_tiles must be a positive int or None, got {max_tiles!r}.")
        self.processor = processor
        self.max_tiles = max_tiles

    def __call__(self, samples: Sequence[dict]) -> dict:
        if not samples:
            raise ValueError("SelfieDataCollator got an empty list of samples.")
        for i, sample in enumerate(samples):
            check_sample(sample, where=f"batch sample {i} (source {sample.get('source', '?')!r})")
        image_kwargs = {} if self.max_tiles is None else {"max_patches": self.max_tiles}
        batch = self.processor(
            images=[sample.get("image") for sample in samples],
            conversations=[sample["conversation"] for sample in samples],
            masks=[sample["masks"] for sample in samples],
            return_labels=True,
            **image_kwargs,
        )
        keys = ("input_ids", "attention_mask", "pixel_values", "tile_grid", "labels", "mask_labels")
        return {key: batch[key] for key in keys if key in batch}


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------


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


    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ) -> str | None:
        """Push the *merged* model (LoRA folded into the weights: a plain `SelfieForSegmentation` that loads
        without peft, with its remote-code files), the processor and a model card to `args.hub_model_id`.

        The trained model is left as it is (a copy is merged). Sharded models (FSDP, ZeRO-3): call
        [`merge_and_save`] and `modeling_selfie.hub.push_to_hub` instead. Returns the commit URL on the main process.
        """
        from .hub import model_card, push_to_hub

        if _is_sharded(self):
            raise NotImplementedError("Sharded model: merge_and_save(trainer, dir), then modeling_selfie.hub.push_to_hub.")
        if not self.is_world_process_zero():
            return None
        model = self.accelerator.unwrap_model(self.model)
        merged = copy.deepcopy(model).merge_and_unload() if isinstance(model, PeftModel) else model
        repo_id = self.hub_model_id or self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        training = (
            f"Fine-tuned with `SelfieTrainer` for {self.state.global_step} steps (learning rate "
            f"{self.args.learning_rate}, batch {self.args.per_device_train_batch_size} per device x "
            f"{self.args.gradient_accumulation_steps} accumulation); LoRA merged into the weights."
        )
        return push_to_hub(
            merged, self.processing_class, repo_id, card=model_card(repo_id, training=training),
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
    Returns:
        The `PeftModel` (train it; [`merge_and_save`] merges it).
    """
    if not isinstance(model, SelfieForSegmentation):
        raise TypeError(f"apply_lora expects a SelfieForSegmentation, got {type(model).__name__}.")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}.")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")
    patterns = [
        _module_pattern(r"model\.language_model\.layers\.\d+\.(?:self_attn|mlp)", target_modules, "target_modules")
    ]
    if vision_lora:
        patterns.append(
            _module_pattern(
                r"model\.vision_tower\.encoder\.layer\.\d+\.(?:attention|mlp)",
                vision_target_modules,
                "vision_target_modules",
            )
        )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="|".join(f"(?:{p})" for p in patterns),
        modules_to_save=list(modules_to_save),
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
    if trainer is not None:
        trainer.accelerator.wait_for_everyone()
    return merged


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SelfieScriptArguments:
    """The SELFIE options of `python -m modeling_selfie.training` (all `TrainingArguments` are accepted too)."""

    model: str = field(
        metadata={
            "help": "SELFIE or InternVL checkpoint folder, or the preset 'selfie-tiny' (random "
            "tiny model whose word-level vocabulary is read from the training data)."
        }
    )
    recipe: str = field(metadata={"help": "training data recipe: a JSON file or a shipped name (self1e, self1e-seg)"})
    data_root: str = field(metadata={"help": "folder the recipe's datasets live under"})
    eval_recipe: str | None = field(default=None, metadata={"help": "evaluation data recipe (validation prompts)"})
    processor: str | None = field(default=None, metadata={"help": "processor folder (default: --model)"})
    max_tiles: int | None = field(default=None, metadata={"help": "most tiles per image (default: the processor's)"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank; 0 trains every weight"})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha (update scaled by alpha / rank)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    vision_lora: bool = field(default=False, metadata={"help": "also put LoRA on the vision tower"})
    model_dtype: str = field(
        default="float32",
        metadata={
            "choices": ["float32", "bfloat16"],
            "help": "dtype to load the weights in (bfloat16 with DeepSpeed, which keeps fp32 master weights)",
        },
    )
    final_dir: str | None = field(
        default=None,
        metadata={"help": "where the merged checkpoint goes, in bf16 with --bf16 (default: OUTPUT_DIR/final)"},
    )


def _bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


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
    return loaded.train(), SelfieProcessor.from_pretrained(processor or model)


def _build_mixture(recipe: str, data_root: str, train: bool):
    """`modeling_selfie.data.registry.build_mixture` of a recipe (training: shuffled, training prompts)."""
    from .data.registry import build_mixture

    return build_mixture(recipe, data_root, train=train, shuffle=train)


def main(argv: list[str] | None = None) -> int:
    """Train on a recipe's mixture, then write the merged checkpoint (bf16 when training in bf16)."""
    parser = HfArgumentParser((SelfieScriptArguments, TrainingArguments))
    parser.set_defaults(remove_unused_columns=False, bf16=_bf16_available(), logging_steps=10, save_steps=1000)
    script_args, training_args = parser.parse_args_into_dataclasses(argv)
    # TrainingArguments come first: with ZeRO-3 they make from_pretrained partition the weights as it loads them.
    train_dataset = _build_mixture(script_args.recipe, script_args.data_root, train=True)
    eval_dataset = None
    if script_args.eval_recipe:
        eval_dataset = _build_mixture(script_args.eval_recipe, script_args.data_root, train=False)
    model, processor = load_model_and_processor(
        script_args.model, script_args.processor, getattr(torch, script_args.model_dtype), train_dataset
    )
    if script_args.lora_rank > 0:
        model = apply_lora(
            model,
            script_args.lora_rank,
            script_args.lora_alpha,
            script_args.lora_dropout,
            vision_lora=script_args.vision_lora,
        )
    trainer = SelfieTrainer(
        model=model,
        args=training_args,
        data_collator=SelfieDataCollator(processor, script_args.max_tiles),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
    )
    resume = training_args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
    trainer.save_state()
    final_dir = script_args.final_dir or os.path.join(training_args.output_dir, "final")
    merge_and_save(trainer, final_dir, dtype=torch.bfloat16 if training_args.bf16 else None, overwrite=True)
    if trainer.is_world_process_zero():
        print(f"wrote {final_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
