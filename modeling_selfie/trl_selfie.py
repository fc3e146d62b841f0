"""Fine-tuning SELFIE with TRL: supervised with `trl.SFTTrainer`, by reinforcement with `trl.GRPOTrainer`.

Datasets are in TRL's conversational format (`datasets.Dataset` rows):

* SFT: `messages` (user / assistant turns, `content` a string or TRL's content blocks; assistant turns hold
  `[SEG]`), `images` (a list of at most one image: SELFIE puts the image before the first user turn) and `masks`
  (one mask per `[SEG]`, in order: a COCO RLE `{"size": [h, w], "counts": ...}` or a 0/1 `[h, w]` array).
* GRPO: `prompt` (the conversation up to the question), `images` and `masks` (the target of the answer's `[SEG]`:
  one mask, empty where the expression has no target).

What TRL does and what SELFIE keeps (SFT):

* peft wrapping: `SFTTrainer(peft_config=...)` with [`selfie_lora_config`] (the same `LoraConfig` as `apply_lora`).
* chat templating, completion-only loss, collation: SELFIE's own, [`SelfieSFTCollator`] (the processor renders the
  chat with SELFIE's system turn and prompt style, supervises the assistant turns and returns `mask_labels` and
  `tile_grid`). TRL's vision collator renders with `apply_chat_template` (no SELFIE system turn or prompt style),
  supervises the whole sequence or needs a template with generation markers and transformers >= 5.18 for
  assistant-only loss on images, and knows nothing of masks or tile grids.
* loss: the model's (text CE + BCE + DICE, dual-pathway masks). `SFTTrainer.compute_loss` computes the text loss
  alone through its fused LM head, which runs the backbone without the segmentation head.

GRPO: the policy is the text model (`generate` and the log-probabilities use causal attention, as `chat` does);
the reward of a completion comes from the mask of its last `[SEG]`, predicted by one forward with the dual pathway
over prompt + completion without gradient ([`SelfieGRPOTrainer`]). The reward functions ([`mask_iou_reward`],
[`format_reward`], [`no_target_reward`]) take these keyword arguments besides TRL's: `answers` (the completions'
text with `[SEG]` kept; TRL's `completions` drop special tokens), `pred_masks` (bool `[H, W]` at the image size,
`None` without `[SEG]`), `presence_scores` (`None` without `[SEG]`) and the dataset's `masks`.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from .compat import use_plain_cpu_device
from .data.common import coco_segmentation_mask
from .processing_selfie import SEG_TOKEN, image_size_of, post_process_masks
from .trainer_selfie import LOSS_COMPONENTS, SelfieDataCollator, selfie_lora_config

# ----------------------------------------------------------------------------------------------------------------
# TRL rows -> SELFIE samples
# ----------------------------------------------------------------------------------------------------------------


def message_text(content) -> str:
    """The text of a message's `content`: a string, or TRL's content blocks (`{"type": "text", "text": ...}`;
    image blocks are left out: SELFIE places the image itself)."""
    if isinstance(content, str):
        return content
    return "".join(block.get("text") or "" for block in content if block.get("type") == "text")


def selfie_turns(messages: Sequence[dict], where: str = "row") -> list[dict]:
    """TRL messages as SELFIE turns (`{"role", "content": str}`). A system turn is refused: SELFIE's system turn is
    the processor's `system_message`, the one the model was trained with."""
    turns = []
    for message in messages:
        if message["role"] not in ("user", "assistant"):
            raise ValueError(
                f"{where} has a {message['role']!r} turn: SELFIE's conversations have user and assistant turns (the "
                "system turn is the processor's system_message)."
            )
        turns.append({"role": message["role"], "content": message_text(message["content"])})
    return turns


def row_image(row: dict, where: str = "row") -> Image.Image | None:
    """The row's image (`images`: a list of at most one, or `image`), or `None`."""
    images = row.get("images", [row["image"]] if row.get("image") is not None else [])
    images = [image for image in images or [] if image is not None]
    if len(images) > 1:
        raise ValueError(f"{where} has {len(images)} images: a SELFIE sample has at most one.")
    return images[0].convert("RGB") if images else None


def decode_mask(mask, height: int, width: int, where: str = "row") -> np.ndarray:
    """A mask of a `masks` column as a uint8 0/1 `[height, width]` array: a COCO RLE (compressed or not) or an array
    (nested lists, as `datasets` stores them)."""
    if isinstance(mask, dict):
        return coco_segmentation_mask(mask, height, width)
    array = np.asarray(mask)
    if array.shape != (height, width):
        raise ValueError(f"{where} has a mask of shape {array.shape} for an image of {(height, width)}.")
    return (array > 0.5).astype(np.uint8)


def row_masks(row: dict, image: Image.Image | None, where: str = "row") -> np.ndarray:
    """The row's `masks` as uint8 `[n, H, W]` (`n` may be 0)."""
    masks = [] if row.get("masks") is None else row["masks"]
    if image is None:
        if len(masks):
            raise ValueError(f"{where} has masks but no image.")
        return np.zeros((0, 1, 1), dtype=np.uint8)
    width, height = image.size
    decoded = [decode_mask(mask, height, width, where) for mask in masks]
    return np.stack(decoded) if decoded else np.zeros((0, height, width), dtype=np.uint8)


def sample_from_row(row: dict, where: str = "row") -> dict:
    """A TRL conversational SFT row (`messages`, `images`, `masks`) as a SELFIE sample
    (`modeling_selfie.data.sample`)."""
    image = row_image(row, where)
    masks = row_masks(row, image, where)
    return {
        "image": image,
        "conversation": selfie_turns(row["messages"], where),
        "masks": masks,
        "task": "referring" if len(masks) else "vqa",
        "source": row.get("source", "trl"),
    }


class SelfieSFTCollator:
    """TRL conversational rows -> one SELFIE batch, through [`SelfieDataCollator`] (the arguments are its own).

    Returns:
        `dict` with `input_ids`, `attention_mask`, `labels` (assistant turns), `mask_labels` and, with images,
        `pixel_values` and `tile_grid`.
    """

    def __init__(self, processor, max_tiles: int | None = None, max_length: int | None = None):
        self.collator = SelfieDataCollator(processor, max_tiles, max_length)

    def __call__(self, rows: Sequence[dict]) -> dict:
        return self.collator([sample_from_row(row, f"dataset row {i}") for i, row in enumerate(rows)])


def mask_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a 0/1 `[H, W]` mask, `counts` as text: compact in a `datasets` column."""
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def sft_row(sample: dict) -> dict:
    """A SELFIE sample (`modeling_selfie.data.sample`) as a TRL conversational SFT row (masks as RLE)."""
    return {
        "messages": [dict(turn) for turn in sample["conversation"]],
        "images": [sample["image"]] if sample.get("image") is not None else [],
        "masks": [mask_rle(mask) for mask in sample["masks"]],
    }


def grpo_row(sample: dict) -> dict:
    """A SELFIE sample as a TRL conversational GRPO row: `prompt` (the conversation without its last assistant
    turn), `images` and `masks` (the masks of that turn's `[SEG]`: what the generated `[SEG]` is scored against)."""
    *prompt, answer = sample["conversation"]
    if answer["role"] != "assistant" or SEG_TOKEN not in answer["content"]:
        raise ValueError("A GRPO sample's conversation ends with an assistant turn that holds [SEG].")
    answer_masks = sample["masks"][len(sample["masks"]) - answer["content"].count(SEG_TOKEN):]
    return {
        "prompt": [dict(turn) for turn in prompt],
        "images": [sample["image"]],
        "masks": [mask_rle(mask) for mask in answer_masks],
    }


# ----------------------------------------------------------------------------------------------------------------
# SFT
# ----------------------------------------------------------------------------------------------------------------


def prepare_selfie_args(args) -> None:
    """Settings every SELFIE TRL run needs: the CPU device without an index (`use_plain_cpu_device`) and unused
    parameters allowed under DDP (a batch without `[SEG]` leaves the segmentation head unused)."""
    if args.ddp_find_unused_parameters is None:
        args.ddp_find_unused_parameters = True
    use_plain_cpu_device(args)


class SelfieSFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` for [`SelfieForSegmentation`] on TRL conversational rows with masks (see the module
    docstring).

    * `peft_config` (TRL's): e.g. [`selfie_lora_config`]`()`; the segmentation head and the embeddings are trained
      fully with it (`modules_to_save`).
    * `data_collator` defaults to [`SelfieSFTCollator`] of `processing_class` (with `args.max_length`).
    * The loss is the model's: text cross entropy over the assistant turns + BCE + DICE of every `[SEG]`'s mask;
      `text_loss`, `mask_bce_loss` and `mask_dice_loss` are logged next to TRL's metrics.
    * The `masks` column is kept (`remove_unused_columns` keeps TRL's vision columns and it).
    """

    def __init__(self, model, args: SFTConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, **kwargs):
        if args is None:
            raise ValueError("SelfieSFTTrainer needs an SFTConfig (output_dir, schedule, ...).")
        if kwargs.get("compute_loss_func") is not None or kwargs.get("formatting_func") is not None:
            raise ValueError(
                "SelfieSFTTrainer takes the loss from the model and renders the chat with the SELFIE processor: "
                "compute_loss_func and formatting_func do not apply."
            )
        prepare_selfie_args(args)
        if data_collator is None:
            data_collator = SelfieSFTCollator(processing_class, max_length=args.max_length)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        # The model's loss is a per-batch mean (text and mask terms): divided by the accumulation steps, not by
        # `num_items_in_batch`, which would normalise only the text loss.
        self.model_accepts_loss_kwargs = False

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "masks" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "masks"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's loss (text CE + BCE + DICE); its terms go to the logged metrics."""
        outputs = model(**inputs, use_cache=False)
        mode = "train" if model.training else "eval"
        for name in LOSS_COMPONENTS:
            value = outputs.get(name)
            if value is not None:
                self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value.detach()).mean().item())
        return (outputs.loss, outputs) if return_outputs else outputs.loss


# ----------------------------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------------------------


def mask_iou(pred: np.ndarray | torch.Tensor | None, target) -> float:
    """IoU of two masks (nonzero = in); 1.0 when both are empty; 0.0 when `pred` is `None` (no `[SEG]`)."""
    if pred is None:
        return 0.0
    pred, target = np.asarray(pred) > 0, np.asarray(target) > 0
    union = np.logical_or(pred, target).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, target).sum() / union)


def mask_array(mask) -> np.ndarray:
    """A mask of a `masks` column at its own size: a COCO RLE decoded at its `size`, or an array."""
    if isinstance(mask, dict):
        return coco_segmentation_mask(mask, *mask["size"])
    return np.asarray(mask)


def last_target(sample_masks: Sequence) -> np.ndarray | None:
    """The mask of a row's answer `[SEG]`: the last of its `masks` (`None` if it has none)."""
    return mask_array(sample_masks[-1]) if len(sample_masks) else None


def mask_iou_reward(pred_masks: Sequence, masks: Sequence, **kwargs) -> list[float]:
    """IoU of the answer's `[SEG]` mask with the ground truth (the last mask of the row's `masks`); 0 without
    `[SEG]`, 1 for an empty prediction of an empty target."""
    rewards = []
    for pred, sample_masks in zip(pred_masks, masks):
        target = last_target(sample_masks)
        rewards.append(mask_iou(pred, target if target is not None else np.zeros_like(np.asarray(pred))))
    return rewards


_ANSWER_END = re.compile(r"\s*\.?\s*")


def format_reward(answers: Sequence[str], **kwargs) -> list[float]:
    """1.0 where the answer holds exactly one `[SEG]` and ends right after it (an optional full stop), else 0.0."""
    rewards = []
    for answer in answers:
        head, seg, tail = answer.rpartition(SEG_TOKEN)
        rewards.append(float(bool(seg) and SEG_TOKEN not in head and _ANSWER_END.fullmatch(tail) is not None))
    return rewards


def no_target_reward(pred_masks: Sequence, presence_scores: Sequence, masks: Sequence,
                     presence_threshold: float = 0.5, **kwargs) -> list[float | None]:
    """For rows whose expression has no target (no mask, or an empty one): 1.0 where the answer's mask is empty or
    its presence score is below `presence_threshold`, else 0.0 (0.0 without `[SEG]` too). `None` (no reward from
    this function) for rows with a target."""
    rewards = []
    for pred, score, sample_masks in zip(pred_masks, presence_scores, masks):
        target = last_target(sample_masks)
        if target is not None and target.any():
            rewards.append(None)
        elif pred is None:
            rewards.append(0.0)
        else:
            rewards.append(float(not np.asarray(pred).any() or score < presence_threshold))
    return rewards


REWARDS = {"mask_iou": mask_iou_reward, "format": format_reward, "no_target": no_target_reward}


# ----------------------------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SelfieGRPOConfig(GRPOConfig):
    """`GRPOConfig` with SELFIE's mask settings."""

    mask_loss_weight: float = field(
        default=0.0,
        metadata={"help": "weight of a supervised BCE + DICE term on the sampled answers' [SEG] masks (answers with "
                          "exactly one [SEG]); 0 freezes the segmentation head"},
    )
    mask_threshold: float = field(default=0.0, metadata={"help": "logit threshold of the predicted masks"})
    presence_threshold: float = field(
        default=0.5, metadata={"help": "presence score below which no_target_reward counts a mask as absent"}
    )


class SelfieGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` for [`SelfieForSegmentation`]: rewards from the masks of the generated `[SEG]`.

    * Prompts are rendered by the SELFIE processor (its system turn and prompt style), one image per prompt.
    * Before the reward functions run, each completion's mask is predicted: one forward over prompt + completion
      with the dual-pathway attention, without gradient; the reward functions get `answers`, `pred_masks`,
      `presence_scores` (see the module docstring) with the dataset's columns.
    * `args.mask_loss_weight` > 0 adds `weight * (BCE + DICE)` of the sampled answers' masks (those with exactly one
      `[SEG]`) against the row's mask to the GRPO loss; 0 freezes the segmentation head.
    * `generate` stops at the end of the assistant turn (`<|im_end|>`, made the tokenizer's end token when it has
      none).
    """

    def __init__(self, model, reward_funcs=None, args: SelfieGRPOConfig | None = None, train_dataset=None,
                 processing_class=None, **kwargs):
        if args is None:
            raise ValueError("SelfieGRPOTrainer needs a SelfieGRPOConfig (output_dir, generations, ...).")
        if processing_class is None:
            raise ValueError("SelfieGRPOTrainer needs the model's SelfieProcessor as processing_class.")
        if reward_funcs is None:
            reward_funcs = [mask_iou_reward, format_reward]
        prepare_selfie_args(args)
        tokenizer = processing_class.tokenizer
        if tokenizer.eos_token is None:
            tokenizer.eos_token = "<|im_end|>"
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         processing_class=processing_class, **kwargs)
        if getattr(args, "mask_loss_weight", 0.0) == 0:
            for name, parameter in self.model.named_parameters():
                if ".seg_head." in f".{name}":
                    parameter.requires_grad_(False)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "masks" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "masks"]

    def _selfie_prompt(self, prompt: Sequence[dict]) -> tuple[list[int], Image.Image | None, torch.Tensor | None]:
        """Token ids (SELFIE's chat, generation prompt open), the image and its tiles of one conversational prompt
        (TRL's content blocks, the image in an `{"type": "image", "image": ...}` block)."""
        processor = self.processing_class
        images = [block["image"] for message in prompt if not isinstance(message["content"], str)
                  for block in message["content"] if block.get("type") == "image" and block.get("image") is not None]
        if len(images) > 1:
            raise ValueError(f"A prompt has {len(images)} images: a SELFIE sample has at most one.")
        image = images[0].convert("RGB") if images else None
        text = processor.render_conversation(selfie_turns(prompt, "prompt"), with_image=image is not None,
                                             add_generation_prompt=True)
        inputs = processor(images=[image] if image is not None else None, text=[text], padding=False)
        return inputs["input_ids"][0].tolist(), image, inputs.get("pixel_values")

    def _tokenize_prompts(self, prompts: list):
        """SELFIE's rendering of each prompt (instead of TRL's `apply_chat_template`): ids, images, pixel values."""
        rendered = [self._selfie_prompt(prompt) for prompt in prompts]
        if any(image is None for _, image, _ in rendered):
            raise ValueError("Every GRPO prompt needs its image (the row's `images`): the reward scores a mask of it.")
        if any(pixel_values.shape[0] != 1 for _, _, pixel_values in rendered):
            raise ValueError("GRPO with SELFIE takes one tile per image (the processor's max_patches=1).")
        fields = {"pixel_values": torch.cat([pixel_values for _, _, pixel_values in rendered])}
        return [ids for ids, _, _ in rendered], [[image] for _, image, _ in rendered], fields

    def _get_per_token_logps_and_entropies(self, *args, tile_grid=None, **kwargs):
        # The processor's `tile_grid` (one tile per image here) is no argument of TRL's log-probability pass.
        return super()._get_per_token_logps_and_entropies(*args, **kwargs)

    @torch.no_grad()
    def predict_completion_masks(self, prompts: list, completion_ids_list: list[list[int]]) -> dict[str, list]:
        """Each completion's answer text (`[SEG]` kept), mask (bool `[H, W]` at its image's size, from its last
        `[SEG]`; `None` without `[SEG]` or image) and presence score: one dual-pathway forward over prompt +
        completion per batch, without gradient."""
        processor, model = self.processing_class, self.accelerator.unwrap_model(self.model)
        end_ids = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        answers_ids = [[token for token in ids if token not in end_ids] for ids in completion_ids_list]
        answers = [processor.tokenizer.decode(ids, skip_special_tokens=False) for ids in answers_ids]
        seg_id = processor.seg_token_id
        rendered = [self._selfie_prompt(prompt) for prompt in prompts]
        segmenting = [i for i, (ids, (_, image, _)) in enumerate(zip(answers_ids, rendered))
                      if seg_id in ids and image is not None]
        pred_masks, scores = [None] * len(prompts), [None] * len(prompts)
        if segmenting:
            sequences = [torch.tensor(rendered[i][0] + answers_ids[i]) for i in segmenting]
            input_ids = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True,
                                                        padding_value=self._tokenizer.pad_token_id)
            attention_mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in sequences], batch_first=True)
            pixel_values = torch.cat([rendered[i][2] for i in segmenting]).to(model.dtype)
            was_training = model.training
            model.eval()
            try:
                out = model(input_ids=input_ids.to(self.accelerator.device),
                            attention_mask=attention_mask.to(self.accelerator.device),
                            pixel_values=pixel_values.to(self.accelerator.device), logits_to_keep=1)
            finally:
                model.train(was_training)
            sizes = [image_size_of(rendered[i][1]) for i in segmenting]
            last = [masks[-1:].float() for masks in out.pred_masks]
            binary = post_process_masks(last, sizes, self.args.mask_threshold)
            for i, mask, presence in zip(segmenting, binary, out.presence_logits):
                pred_masks[i], scores[i] = mask[0].cpu().numpy(), float(presence[-1].float().sigmoid())
        return {"answers": answers, "pred_masks": pred_masks, "presence_scores": scores}

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        predicted = self.predict_completion_masks(prompts, completion_ids_list)
        inputs = [{**row, **{key: values[i] for key, values in predicted.items()},
                   "presence_threshold": self.args.presence_threshold} for i, row in enumerate(inputs)]
        return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.args.mask_loss_weight > 0:
            output["mask_targets"] = [[] if row.get("masks") is None else row["masks"] for row in inputs]
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """GRPO's loss, plus `mask_loss_weight * (BCE + DICE)` of the sampled answers' masks when it is > 0."""
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.args.mask_loss_weight > 0:
            mask_loss = self.supervised_mask_loss(model, inputs)
            if mask_loss is not None:
                mode = "train" if model.training else "eval"
                self._metrics[mode]["mask_loss"].append(self.accelerator.gather(mask_loss.detach()).mean().item())
                loss = loss + self.args.mask_loss_weight * mask_loss
        return loss

    def supervised_mask_loss(self, model, inputs) -> torch.Tensor | None:
        """BCE + DICE (the model's mask loss, config weights) of the masks of the completions with exactly one
        `[SEG]` against their rows' masks; `None` when no completion has one."""
        seg_id = self.processing_class.seg_token_id
        completion_ids = inputs["completion_ids"] * inputs["completion_mask"]
        keep = [i for i in range(completion_ids.shape[0])
                if int((completion_ids[i] == seg_id).sum()) == 1 and len(inputs["mask_targets"][i])]
        if not keep or inputs.get("pixel_values") is None:
            return None
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)[keep]
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)[keep]
        mask_labels = [torch.as_tensor(last_target(inputs["mask_targets"][i]) > 0, dtype=torch.float32)[None]
                       for i in keep]
        out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=inputs["pixel_values"][keep],
                    mask_labels=mask_labels, use_cache=False)
        config = self.accelerator.unwrap_model(model).config
        return config.bce_loss_weight * out.mask_bce_loss + config.dice_loss_weight * out.mask_dice_loss


def reward_functions(names: Sequence[str]) -> list:
    """The reward functions called `names` (keys of `REWARDS`: mask_iou, format, no_target)."""
    unknown = [name for name in names if name not in REWARDS]
    if unknown:
        raise ValueError(f"Unknown reward function(s) {unknown}; choose from {list(REWARDS)}.")
    return [REWARDS[name] for name in names]


__all__ = [
    "REWARDS",
    "SelfieGRPOConfig",
    "SelfieGRPOTrainer",
    "SelfieSFTCollator",
    "SelfieSFTTrainer",
    "format_reward",
    "grpo_row",
    "mask_iou",
    "mask_iou_reward",
    "no_target_reward",
    "reward_functions",
    "sample_from_row",
    "sft_row",
    "selfie_lora_config",
]
