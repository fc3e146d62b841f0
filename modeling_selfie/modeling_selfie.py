"""SELFIE (SELF1E): segmentation from an InternVL3 MLLM itself, with one `[SEG]` token and no mask decoder.

The model is transformers' InternVL plus three small things, each in one named place:

* `self_replicate` + the InternVL projector give the full-resolution ViT features F_V1^HQ (paper Sec. 3.3);
* `dual_pathway_mask_function` lets image tokens of a segmentation sample see each other and every `[SEG]`
  (Sec. 3.5), through transformers' masking utilities, so eager, sdpa and flex attention all get it;
* `SelfieSegmentationHead` fuses the LLM's residual on image tokens with F_V1^HQ (RFR / RFA, Sec. 3.3-3.4),
  stitches tiles and takes the scaled dot product with the `[SEG]` vector (Eq. 1).
"""

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from logging import Filter

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from transformers import GenerationMixin, InternVLForConditionalGeneration, InternVLModel
from transformers.activations import ACT2FN
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.models.internvl.modeling_internvl import (
    InternVLCausalLMOutputWithPast,
    InternVLModelOutputWithPast,
)
from transformers.cache_utils import Cache
from transformers.masking_utils import and_masks, or_masks
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging

from .compat import cache_kwargs, create_causal_mask, deprecated_cache_name, image_output_fields, pop_cache
from .configuration_selfie import SelfieConfig

logger = logging.get_logger(__name__)

UNKNOWN_TOKEN_PRESENCE_PENALTY = 8.0  # presence logit taken off per unknown-word token before a [SEG]


# ----------------------------------------------------------------------------------------------------------------
# Small named helpers
# ----------------------------------------------------------------------------------------------------------------


def self_replicate(vision_features: torch.Tensor, factor: int) -> torch.Tensor:
    """Self-replication of pre-shuffle ViT features (F_V0 -> F_V0^r, paper Fig. 2).

    Each patch feature is repeated `factor**2` times along channels (`[x, x, x, x]`, tiled), so InternVL's
    projector, built for pixel-shuffled 2x2 groups, can be applied to every patch at full resolution.

    Args:
        vision_features: `[num_tiles, num_patches, C_v]`.
    Returns:
        `[num_tiles, num_patches, factor**2 * C_v]`.
    """
    return vision_features.repeat(1, 1, factor * factor)


def stitch_tiles(tile_tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Lay the row-major token grids of row-major tiles out as one map per image.

    Args:
        tile_tokens: `[num_images * rows * cols, g * g, C]`, tiles of one image consecutive, row-major.
    Returns:
        `[num_images, rows * g, cols * g, C]`: tile (r, c) fills block (r, c).
    """
    num_tiles, num_tokens, channels = tile_tokens.shape
    side = math.isqrt(num_tokens)
    grid = tile_tokens.view(num_tiles // (rows * cols), rows, cols, side, side, channels)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(-1, rows * side, cols * side, channels)


def depth_to_space(features: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel unshuffle of the paper: the exact inverse of InternVL's pixel shuffle, for any map shape.

    `out[factor*i + di, factor*j + dj, c] = in[i, j, (factor*di + dj) * C + c]`.

    Args:
        features: `[N, H, W, factor**2 * C]`.
    Returns:
        `[N, factor * H, factor * W, C]`.
    """
    n, height, width, channels = features.shape
    out_channels = channels // (factor * factor)
    blocks = features.view(n, height, width, factor, factor, out_channels)
    return blocks.permute(0, 1, 3, 2, 4, 5).reshape(n, height * factor, width * factor, out_channels)


def mean_of_chunks(features: torch.Tensor, factor: int) -> torch.Tensor:
    """Average the `factor**2` channel chunks of unshuffle-MLP features: `[..., factor**2 * C]` -> `[..., C]`."""
    return features.unflatten(-1, (factor * factor, -1)).mean(-2)


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (`align_corners=False`, no antialias) of `[N, H, W]` or `[N, H, W, C]` maps to `size`."""
    if tuple(maps.shape[1:3]) == tuple(size):
        return maps
    if maps.dim() == 3:
        return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    resized = F.interpolate(maps.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1)


def largest_part_share(masks: torch.Tensor) -> torch.Tensor:
    """Share of each mask's cells in its largest 4-connected part: `[n, H, W]` bool -> `[n]` (0 for an empty mask).
    A mask spread over two equal objects gives 1/2 (cells touching at a corner only are apart: two shapes' masks
    often do). Parts are labelled by spreading the largest cell id to the four neighbours until nothing changes."""
    height, width = masks.shape[-2:]
    ids = torch.arange(1, height * width + 1, dtype=torch.float32, device=masks.device).view(1, height, width)
    inside = masks.float()
    labels = ids * inside
    while True:
        padded = F.pad(labels, (1, 1, 1, 1))
        neighbours = (padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:])
        spread = torch.stack([labels, *neighbours]).amax(0) * inside
        if torch.equal(spread, labels):
            break
        labels = spread
    shares = []
    for mask_labels in labels:
        _, counts = mask_labels[mask_labels > 0].unique(return_counts=True)
        shares.append(counts.max() / counts.sum() if len(counts) else counts.new_zeros((), dtype=torch.float32))
    return torch.stack(shares).float() if shares else labels.new_zeros(0)


def mask_quality(mask_logits: torch.Tensor, offset: float = 1.0) -> torch.Tensor:
    """How much a mask's own logits say it is right, `[n, H, W]` -> `[n]` in [0, 1]: the product of SAM's stability
    score (IoU of the mask thresholded at logit `+offset` and at `-offset`), the mean probability of the mask's cells
    (logit > 0) and the share of the mask in its largest connected part ([`largest_part_share`]). A sharp,
    confident mask of one object scores near 1; a soft mask, or one spread over two objects, low; an empty mask 0."""
    logits = mask_logits.detach().float()
    inside = logits > 0
    cells = inside.flatten(1).sum(1)
    loose = (logits > -offset).flatten(1).sum(1)
    stability = (logits > offset).flatten(1).sum(1) / loose.clamp(min=1)
    confidence = (torch.sigmoid(logits) * inside).flatten(1).sum(1) / cells.clamp(min=1)
    return stability * confidence * largest_part_share(inside)


def log_mask_quality(mask_logits: torch.Tensor) -> torch.Tensor:
    """The IoU head's input: `log(mask_quality)`, floored at `log(1e-4)` (an empty mask), `[n, H, W]` -> `[n, 1]`."""
    return mask_quality(mask_logits).clamp(min=1e-4).log()[:, None]


def dual_pathway_pattern(
    image_mask: torch.Tensor,
    seg_mask: torch.Tensor,
    segmenting: torch.Tensor,
    mode: str,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The attention that segmentation samples add to the causal mask (paper Sec. 3.5, Tab. 7).

    Query q of sample b additionally attends to key k when `queries[b, q] & keys[b, k]`.

    Args:
        image_mask: `[B, L]` bool, image (IMG_CONTEXT) tokens.
        seg_mask: `[B, L]` bool, `[SEG]` tokens.
        segmenting: `[B]` bool, samples that contain a `[SEG]`; every other sample stays causal.
        mode: one of `SelfieConfig.seg_attention`.
        attention_mask: `[B, L]`, 0 on padding (padding keys are never added).
    Returns:
        `(queries, keys)`, two `[B, L]` bool tensors, or `None` for `"causal"`.
    """
    if mode == "causal":
        return None
    queries = image_mask & segmenting[:, None]
    if mode == "image_bidirectional":
        keys = image_mask
    elif mode == "image_to_seg":
        keys = image_mask | seg_mask
    elif mode == "image_to_text":
        keys = torch.ones_like(image_mask)
    elif mode == "bidirectional":
        queries = segmenting[:, None].expand_as(image_mask)
        keys = torch.ones_like(image_mask)
    else:
        raise ValueError(f"Unknown seg_attention mode {mode!r}.")
    if attention_mask is not None:
        keys = keys & attention_mask.bool()
    return queries, keys


def dual_pathway_mask_function(queries: torch.Tensor, keys: torch.Tensor) -> Callable:
    """The pattern of `dual_pathway_pattern` as a mask function `(batch, head, q, kv) -> bool`, to OR with the
    causal mask in `transformers.masking_utils.create_causal_mask` (used for flex attention's block mask)."""

    length = keys.shape[1]

    def mask_function(batch_idx, head_idx, q_idx, kv_idx):
        # positions past the prompt (a static cache's free slots, flex attention's block padding) add nothing
        inside = (q_idx < length) & (kv_idx < length)
        q_idx, kv_idx = q_idx.clamp(max=length - 1), kv_idx.clamp(max=length - 1)
        return inside & queries[batch_idx, q_idx] & keys[batch_idx, kv_idx]

    return mask_function


def add_to_block_mask(block_mask: BlockMask, queries: torch.Tensor, keys: torch.Tensor) -> BlockMask:
    """A prefill's flex-attention `BlockMask` (its queries are the prompt's positions) that also lets query q of sample
    b attend to key k when `queries[b, q] & keys[b, k]` (`[B, L]` bool) and the prompt's last query attends to k (so
    padding keys and a static cache's free slots stay masked)."""
    q_length, kv_length = block_mask.seq_lengths
    given = block_mask.mask_mod

    def seen_by_last_query(batch_idx, head_idx, q_idx, kv_idx):
        return given(batch_idx, head_idx, torch.full_like(q_idx, q_length - 1), kv_idx)

    added = and_masks(dual_pathway_mask_function(queries, keys), seen_by_last_query)
    return create_block_mask(
        or_masks(given, added), B=queries.shape[0], H=None, Q_LEN=q_length, KV_LEN=kv_length,
        device=queries.device, BLOCK_SIZE=block_mask.BLOCK_SIZE,
    )


def add_to_dense_mask(
    mask: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """A dense `[B, 1, Q, K]` attention mask (bool, True = attend; or additive, 0 = attend) that also lets query q of
    sample b attend to key k when `queries[b, q] & keys[b, k]` (`[B, Q]`, `[B, L]` bool; keys past L, the free slots
    of a static cache, are not added). A bool mask comes back additive in `dtype` (sdpa would convert it in every
    layer)."""
    keys = F.pad(keys, (0, mask.shape[-1] - keys.shape[1]))
    added = queries[:, None, :, None] & keys[:, None, None, :]
    if mask.dtype == torch.bool:
        allowed = mask | added
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
    return mask.masked_fill(added, 0.0)


def first_true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """`mask.nonzero()[:count, 0]` with a size known beforehand: the indices of the first `count` True entries of a
    1-D bool tensor, in order, computed on its device with a static shape (a stable sort), so reading them needs no
    device-to-host copy and `torch.compile` traces it without a graph break."""
    return torch.sort(mask.to(torch.uint8), descending=True, stable=True).indices[:count]


def gather_ranges(tensor: torch.Tensor, ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The rows `start:end` of each `(start, end)` in `ranges` (host ints), concatenated along dim 0; one range is a
    view. Selection by slicing, so no index tensor has to be built or copied to the device."""
    if len(ranges) == 1:
        return tensor[ranges[0][0] : ranges[0][1]]
    return torch.cat([tensor[start:end] for start, end in ranges])


def repeat_rows(tensor: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Row i of `tensor` repeated `counts[i]` times (host ints) along dim 0 (`tensor` itself when every count is 1)."""
    if all(count == 1 for count in counts):
        return tensor
    return torch.cat([tensor[i : i + 1].expand(n, *tensor.shape[1:]) for i, n in enumerate(counts)])


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join `(start, end)` ranges that touch (`[(0, 2), (2, 3), (5, 6)]` -> `[(0, 3), (5, 6)]`)."""
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def padding_mask(attention_mask) -> torch.Tensor | None:
    """The `[B, L]` padding mask (1 = real token) in `attention_mask`, or `None` when it is absent or prebuilt (a
    4-D mask or a dict of them, as static-cache generation passes: its padding is already applied)."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        return attention_mask.bool()
    return None


def special_token_masks(
    config: SelfieConfig, input_ids: torch.Tensor, padding: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, L]` bool masks of the `[SEG]` and the image (`<IMG_CONTEXT>`) tokens of `input_ids`, padding excluded."""
    no_seg = config.seg_token_id is None
    seg_tokens = torch.zeros_like(input_ids, dtype=torch.bool) if no_seg else input_ids == config.seg_token_id
    image_tokens = input_ids == config.image_token_id
    if padding is not None:
        seg_tokens, image_tokens = seg_tokens & padding, image_tokens & padding
    return seg_tokens, image_tokens


@dataclass(frozen=True)
class SegmentationLayout:
    """Where the `[SEG]` tokens and the images of a batch are, as host integers.

    The segmentation path needs these numbers to choose shapes (how many masks, how tiles are stitched, how the
    per-sample outputs are split). Known on the host, they let the forward run without reading device values (no
    host synchronisation), and `torch.compile` specialises on them (one graph per layout). Build it with
    [`SegmentationLayout.from_inputs`] from the processor's outputs while they are still on the CPU (free) and pass
    it as `seg_layout=`; without it the model builds it from its inputs (one device-to-host copy on an accelerator).

    Attributes:
        seg_counts: number of `[SEG]` tokens in each sample.
        image_samples: the sample each image belongs to.
        tile_grids: `(rows, cols)` of each image's tiles.
    """

    seg_counts: tuple[int, ...]
    image_samples: tuple[int, ...]
    tile_grids: tuple[tuple[int, int], ...]

    @classmethod
    def from_inputs(
        cls,
        config: SelfieConfig,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | dict | None = None,
        tile_grid: torch.Tensor | None = None,
    ) -> "SegmentationLayout":
        """Read the layout from `[B, L]` `input_ids` (padding excluded by a `[B, L]` `attention_mask`; a prebuilt
        mask, dict or 4-D, as static-cache generation passes, is not read) and `[num_images, 2]` `tile_grid`
        (default: one tile per image), in one device-to-host copy."""
        seg_tokens, image_tokens = special_token_masks(config, input_ids, padding_mask(attention_mask))
        return cls.from_token_masks(config, seg_tokens, image_tokens, tile_grid)

    @classmethod
    def from_token_masks(
        cls,
        config: SelfieConfig,
        seg_tokens: torch.Tensor,
        image_tokens: torch.Tensor,
        tile_grid: torch.Tensor | None = None,
    ) -> "SegmentationLayout":
        """The layout from `[B, L]` bool masks of the `[SEG]` and image tokens (padding excluded), in one
        device-to-host copy. Checks that `tile_grid` accounts for every image token and that each sample with
        `[SEG]` has exactly one image."""
        counts = torch.stack([seg_tokens.sum(1), image_tokens.sum(1)]).flatten()
        if tile_grid is not None:
            counts = torch.cat([counts, tile_grid.to(counts).flatten()])
        values = counts.tolist()
        batch_size = seg_tokens.shape[0]
        seg_counts, image_token_counts = values[:batch_size], values[batch_size : 2 * batch_size]
        tokens_per_tile = config.tokens_per_tile_side**2
        if tile_grid is None:
            grids = [(1, 1)] * (sum(image_token_counts) // tokens_per_tile)
        else:
            grids = list(zip(values[2 * batch_size :: 2], values[2 * batch_size + 1 :: 2]))
        described = sum(rows * cols for rows, cols in grids) * tokens_per_tile
        if described != sum(image_token_counts):
            raise ValueError(
                f"tile_grid describes {described} image tokens but input_ids hold {sum(image_token_counts)}: "
                "pass the tile_grid the processor returned with these input_ids."
            )
        sample_end = [sum(image_token_counts[: b + 1]) for b in range(batch_size)]
        image_end, samples = 0, []
        for rows, cols in grids:  # the sample that holds the image's last token
            image_end += rows * cols * tokens_per_tile
            samples.append(sum(end < image_end for end in sample_end))
        for b, n_seg in enumerate(seg_counts):
            if n_seg and samples.count(b) != 1:
                raise ValueError(
                    f"Sample {b} has {n_seg} [SEG] token(s) and {samples.count(b)} images; a segmentation sample "
                    "needs exactly one image."
                )
        return cls(tuple(seg_counts), tuple(samples), tuple(grids))

    @property
    def segmenting(self) -> bool:
        """Whether any sample has a `[SEG]`."""
        return any(self.seg_counts)

    def tile_ranges(self) -> list[tuple[int, int]]:
        """`(start, end)` of each image's tiles in the batch's tiles."""
        ends = [0]
        for rows, cols in self.tile_grids:
            ends.append(ends[-1] + rows * cols)
        return list(zip(ends[:-1], ends[1:]))

    def seg_images(self) -> list[int]:
        """The images of samples with `[SEG]` (one per such sample), in order."""
        return [i for i, b in enumerate(self.image_samples) if self.seg_counts[b]]

    def seg_tile_ranges(self) -> list[tuple[int, int]]:
        """The tiles of `seg_images`, as merged ranges: the tiles F_V1^HQ is computed for."""
        tiles = self.tile_ranges()
        return merge_ranges([tiles[i] for i in self.seg_images()])


def mask_bce_and_dice(
    logits: torch.Tensor, targets: torch.Tensor, max_side: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-mask BCE and DICE of logits against 0/1 targets, as the released SELF1E training computes them.

    Targets whose short side exceeds `max_side` are resized bilinearly (soft targets) so that the short side is
    `max_side`; the logits are resized bilinearly to the target size.

    Args:
        logits: `[n, H, W]` mask logits.
        targets: `[n, h, w]` 0/1 targets (any size).
    Returns:
        Two `[n]` tensors: mean BCE-with-logits per mask, and DICE loss per mask.
    """
    targets = targets.to(logits.dtype)
    height, width = targets.shape[-2:]
    short = min(height, width)
    if short > max_side:
        targets = resize_maps(targets, (height * max_side // short, width * max_side // short))
    logits = resize_maps(logits, tuple(targets.shape[-2:]))
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1)
    probs = logits.sigmoid().flatten(1) / 1000
    flat_targets = targets.flatten(1)
    numerator = 2 * (probs * flat_targets).sum(1)
    denominator = probs.sum(1) + (flat_targets / 1000).sum(1)
    dice = 1 - (numerator + 1e-6) / (denominator + 1e-6)
    return bce, dice


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SelfieModelOutputWithPast(InternVLModelOutputWithPast):
    r"""
    image_features (`torch.FloatTensor` of shape `(num_tiles, g_lo**2, hidden_size)`, *optional*):
        F_V1: pixel-shuffled, projected image tokens that enter the LLM.
    image_features_hq (`torch.FloatTensor` of shape `(num_seg_tiles, g_hi**2, hidden_size)`, *optional*):
        F_V1^HQ: self-replicated, projected ViT features at full ViT resolution (bypass the LLM). Computed only
        when a sample contains `[SEG]` and `config.use_hq_features`; given a `SegmentationLayout`, only for the
        tiles of images in samples with `[SEG]` (`SegmentationLayout.seg_tile_ranges`), else for all tiles.
    """

    image_features: torch.FloatTensor | None = None
    image_features_hq: torch.FloatTensor | None = None


@dataclass
class SelfieSegmentationOutput(InternVLCausalLMOutputWithPast):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*):
        `text_loss_weight * text_loss + bce_loss_weight * mask_bce_loss + dice_loss_weight * mask_dice_loss`.
    pred_masks (`list[torch.FloatTensor]`, *optional*):
        One `[n_seg, H, W]` tensor of mask logits per sample, `n_seg` = number of `[SEG]` in the sample (may be 0),
        the k-th mask for the k-th `[SEG]`. `H, W` = 4x the LLM token grid of the sample's image (tiles stitched
        row-major). Pass them to `SelfieProcessor.post_process_masks` for masks at the image's own size.
    presence_logits (`list[torch.FloatTensor]`, *optional*):
        One `[n_seg]` tensor per sample: whether the referred object is in the image at all (the convention of
        SAM3's `presence_logits`); see [`SelfieForSegmentation.presence_logits`]. Never above the logit of the
        mask's most confident pixel; `post_process_masks(..., return_scores=True)` caps it again by the most
        confident pixel at the image's size, so that a mask is empty exactly when its score is below 0.5.
    iou_logits (`list[torch.FloatTensor]`, *optional*):
        With `config.iou_head`, one `[n_seg]` tensor per sample: `sigmoid(iou_logits)` is each mask's predicted IoU
        with the referred object (SAM's `iou_scores`); see [`SelfieForSegmentation.iou_logits`].
    text_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Next-token cross entropy (when `labels` are given).
    mask_bce_loss, mask_dice_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Summed BCE / DICE of the full-resolution and auxiliary low-resolution masks, normalised as
        `config.mask_loss_normalization` says (when `mask_labels` are given).
    """

    pred_masks: list[torch.FloatTensor] | None = None
    presence_logits: list[torch.FloatTensor] | None = None
    iou_logits: list[torch.FloatTensor] | None = None
    text_loss: torch.FloatTensor | None = None
    mask_bce_loss: torch.FloatTensor | None = None
    mask_dice_loss: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# Segmentation head
# ----------------------------------------------------------------------------------------------------------------


class SelfieMLP(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, act: str = "gelu"):
        super().__init__()
        # float32 whatever the default dtype: the head is in `_keep_in_fp32_modules_strict`
        self.fc1 = nn.Linear(in_features, hidden_features, dtype=torch.float32)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(hidden_features, out_features, dtype=torch.float32)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # In the weights' precision: the head stays float32 in a bfloat16 / quantized model
        return self.fc2(self.act(self.fc1(hidden_states.to(self.fc1.weight.dtype))))


class SelfieSegmentationHead(nn.Module):
    """RFR / RFA fusion, tile stitching, the `[SEG]` vector and the scaled dot product (paper Eq. 1-6).

    It works on image-token features and `[SEG]` hidden states; it knows nothing of token ids or text batches.
    With D = LLM width, C = `seg_hidden_size`, r = unshuffle factor (2):

    * `pus_llm` (f'_PUS): D -> D -> r*r*C, for LLM-processed image tokens F_IMG and the `[SEG]` vector;
    * `pus_vision` (f_PUS): D -> D -> r*r*C, for features that bypass the LLM (F_V1 and F_V1^HQ);
    * `proj_out`: C -> C -> C, shared by the pixel features and the `[SEG]` vector.
    """

    def __init__(self, config: SelfieConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        self.factor = config.unshuffle_factor
        self.seg_hidden_size = config.seg_hidden_size
        self.use_hq_features = config.use_hq_features
        self.residual_mode = config.residual_mode
        act = config.projector_hidden_act
        unshuffled = self.factor * self.factor * config.seg_hidden_size
        self.pus_llm = SelfieMLP(hidden, hidden, unshuffled, act)
        self.pus_vision = SelfieMLP(hidden, hidden, unshuffled, act)
        self.proj_out = SelfieMLP(config.seg_hidden_size, config.seg_hidden_size, config.seg_hidden_size, act)
        self.presence = nn.Linear(hidden, 1, dtype=torch.float32) if config.presence_head else None
        self.iou = nn.Linear(1, 1, dtype=torch.float32) if config.iou_head else None  # on log(mask_quality)

    def _to_pixels(self, unshuffled: torch.Tensor) -> torch.Tensor:
        """RFA unshuffles the r*r chunks into r x r pixels; the other modes average them at the token grid."""
        if self.residual_mode == "rfa":
            return depth_to_space(unshuffled, self.factor)
        return mean_of_chunks(unshuffled, self.factor)

    def seg_embeddings(self, seg_hidden_states: torch.Tensor) -> torch.Tensor:
        """F'_SEG (Eq. 6): `[S, D]` hidden states that predict `[SEG]` -> `[S, C]`."""
        return self.proj_out(mean_of_chunks(self.pus_llm(seg_hidden_states), self.factor))

    def llm_pixel_features(self, image_hidden_states: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """f'_PUS(F_IMG) as pixels: `[N*rows*cols, g_lo**2, D]` -> `[N, H_lo, W_lo, C]` (also the auxiliary map)."""
        return self._to_pixels(stitch_tiles(self.pus_llm(image_hidden_states), rows, cols))

    def pixel_features(
        self,
        llm_pixels: torch.Tensor,
        image_features: torch.Tensor,
        image_features_hq: torch.Tensor | None,
        rows: int,
        cols: int,
    ) -> torch.Tensor:
        """F'_IMG (Eq. 3 / 5) after the shared output projection.

        Args:
            llm_pixels: `[N, H_lo, W_lo, C]` from `llm_pixel_features`.
            image_features: F_V1, `[N*rows*cols, g_lo**2, D]`.
            image_features_hq: F_V1^HQ, `[N*rows*cols, g_hi**2, D]` (or `None` without `use_hq_features`).
        Returns:
            `[N, H, W, C]` pixel features; `H = rows * g_lo * 4` for RFA with F_V1^HQ.
        """
        if not self.use_hq_features:
            return self.proj_out(llm_pixels)
        pixels = self._to_pixels(self.pus_vision(stitch_tiles(image_features_hq, rows, cols)))
        if self.residual_mode != "none":
            residual = llm_pixels - self._to_pixels(stitch_tiles(self.pus_vision(image_features), rows, cols))
            pixels = pixels + resize_maps(residual, tuple(pixels.shape[1:3]))
        return self.proj_out(pixels)

    def mask_logits(self, pixels: torch.Tensor, seg_embeddings: torch.Tensor) -> torch.Tensor:
        """Eq. 1: `[S, H, W, C]` pixel features (one image per `[SEG]`) . `[S, C]` / sqrt(C) -> `[S, H, W]`."""
        return torch.einsum("shwc,sc->shw", pixels, seg_embeddings) / math.sqrt(self.seg_hidden_size)


def seg_token_id_of_folder(pretrained_model_name_or_path, kwargs: dict, image_token_id: int) -> int | None:
    """The id `[SEG]` has, or gets when added, in the tokenizer stored with a checkpoint; `None` if the checkpoint
    has no tokenizer of its own (one that puts InternVL's image token at the model's `image_token_id`)."""
    from transformers import AutoTokenizer

    from .processing_selfie import IMAGE_TOKEN_ROLES, hub_kwargs, seg_token_id_in

    try:
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **hub_kwargs(kwargs))
    except (OSError, ValueError, TypeError):
        return None
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN_ROLES["context_image_token"]) != image_token_id:
        return None
    return seg_token_id_in(tokenizer)


class HeldLoadReport(Filter):
    """Holds back the LOAD REPORT warning that `PreTrainedModel.from_pretrained` logs (missing / unexpected /
    mismatched keys) until `release()` logs it; used as a context manager around the call, it releases the report
    when the call raises."""

    def __init__(self):
        super().__init__()
        self.records = []
        self.logger = logging.get_logger("transformers.modeling_utils")

    def filter(self, record) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True

    def release(self) -> None:
        for record in self.records:
            self.logger.handle(record)
        self.records = []

    def __enter__(self) -> "HeldLoadReport":
        self.logger.addFilter(self)
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        self.logger.removeFilter(self)
        if error is not None:
            self.release()


def shared_fields(output, target_class) -> dict:
    """The fields of a model output that `target_class` also has (cache, hidden states, attentions, image outputs:
    their names differ between transformers releases)."""
    names = set(target_class.__dataclass_fields__) - {"loss", "logits"}
    return {name: value for name, value in output.items() if name in names}  # (dynamo cannot trace fields(output))


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------

# Checkpoint key layouts of InternVL (regex -> this model's names), for `from_pretrained(key_mapping=...)`: the Hub's
# `-hf` repositories (`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.*`,
# `multi_modal_projector.*`) and `InternVLForConditionalGeneration.save_pretrained` (`model.language_model.model.*`).
INTERNVL_KEY_MAPPING = {
    r"^language_model\.lm_head\.": "lm_head.",
    r"^language_model\.model\.": "model.language_model.",
    r"^model\.language_model\.model\.": "model.language_model.",
    r"^vision_tower\.": "model.vision_tower.",
    r"^multi_modal_projector\.": "model.multi_modal_projector.",
}


class SelfieModel(InternVLModel):
    """InternVL with the F_V1^HQ branch and the dual-pathway attention for samples that contain `[SEG]`."""

    config_class = SelfieConfig
    config: SelfieConfig

    def get_image_features_hq(self, vision_features: torch.Tensor) -> torch.Tensor:
        """F_V1^HQ: `[T, g_hi**2, C_v]` pre-shuffle ViT patch features -> `[T, g_hi**2, D]` via the projector."""
        return self.multi_modal_projector(self_replicate(vision_features, self.config.unshuffle_factor))

    def token_masks(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, attention_mask=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, L]` bool masks of the `[SEG]` and image tokens, padding excluded: from `input_ids`, or without them
        from the embeddings (a position whose embedding equals the token's row, as InternVL finds image tokens)."""
        if input_ids is not None:
            return special_token_masks(self.config, input_ids, padding_mask(attention_mask))
        token_ids = [self.config.seg_token_id, self.config.image_token_id]
        rows = self.get_input_embeddings()(torch.tensor([t or 0 for t in token_ids], device=inputs_embeds.device))
        seg_tokens, image_tokens = (inputs_embeds[..., None, :] == rows.to(inputs_embeds)).all(-1).unbind(-1)
        if token_ids[0] is None:
            seg_tokens = torch.zeros_like(seg_tokens)
        padding = padding_mask(attention_mask)
        if padding is not None:
            seg_tokens, image_tokens = seg_tokens & padding, image_tokens & padding
        return seg_tokens, image_tokens

    def seg_attention_mask(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | BlockMask | dict | None,
        cache,
        position_ids: torch.LongTensor | None,
        has_seg: bool | None = None,
        token_masks: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | BlockMask | dict | None:
        """Attention mask for the LLM: the dual pathway in samples with `[SEG]` (full forwards only), else as given.

        `has_seg` says on the host whether any sample has a `[SEG]` (`SegmentationLayout.segmenting`); `None`
        reads it from the inputs (a host synchronisation on an accelerator). `token_masks` are the `[SEG]` and
        image token masks of `token_masks()` when known; else they are read from `input_ids` or `inputs_embeds`.

        `attention_mask` comes in any form transformers hands a model: `None` or a `[B, L]` padding mask (the 4D
        mask is then built by `create_causal_mask`, a `BlockMask` for flex attention), or a mask prepared for
        static-cache generation (`create_masks_for_generate`): a 4D mask, a `BlockMask`, or a per-layer-type dict
        holding one of these or `None` (no padding: causal). The pattern is added to whichever mask results, and a
        dict comes back as a dict. `attention_mask` is returned unchanged when no sample segments, the mode is
        `"causal"`, or this is a cached decoding step (keys already computed). A 4D mask is what every text model
        InternVL carries takes (its `create_causal_mask` returns it as is); Qwen2 / Qwen3 also take the dict.
        """
        if has_seg is False or self.config.seg_token_id is None or self.config.seg_attention == "causal":
            return attention_mask
        if cache is not None and cache.get_seq_length() > 0:  # decoding: the keys are already computed
            return attention_mask
        given = attention_mask.get("full_attention") if isinstance(attention_mask, dict) else attention_mask
        if token_masks is None:
            token_masks = self.token_masks(input_ids, inputs_embeds, given)
        seg_mask, image_mask = token_masks
        segmenting = seg_mask.any(dim=1)
        if not (bool(segmenting.any()) if has_seg is None else has_seg):
            return attention_mask
        layer_types = set(getattr(self.config.text_config, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise ValueError(
                f"SELFIE's dual-pathway attention is built for full-attention layers; this text model also has "
                f"{sorted(layer_types - {'full_attention'})} layers (turn off its sliding window)."
            )
        implementation = self.config.text_config._attn_implementation
        if implementation == "flash_attention_2":
            raise ValueError(
                "SELFIE's dual-pathway attention cannot be expressed with flash_attention_2 (it keeps only padding "
                "masks). Load the model with attn_implementation='sdpa', 'eager' or 'flex_attention'."
            )
        mode = self.config.seg_attention
        if isinstance(given, BlockMask):  # prepared for flex attention: padding is in its mask function
            mask = add_to_block_mask(given, *dual_pathway_pattern(image_mask, seg_mask, segmenting, mode))
        elif isinstance(given, torch.Tensor) and given.dim() == 4:
            # keys of the cache past the inputs (a static cache's free slots) and padding keys stay masked
            valid_keys = (given if given.dtype == torch.bool else given == 0).any(-2)[:, 0]
            queries, keys = dual_pathway_pattern(image_mask, seg_mask, segmenting, mode)
            keys = keys & valid_keys[:, : keys.shape[1]]
            mask = add_to_dense_mask(given, queries, keys, inputs_embeds.dtype)
        else:  # `None` or a `[B, L]` padding mask
            pattern = dual_pathway_pattern(image_mask, seg_mask, segmenting, mode, given)
            mask_kwargs = dict(
                config=self.config.text_config,
                inputs_embeds=inputs_embeds,
                attention_mask=given,
                cache=cache,
                position_ids=position_ids,
            )
            if implementation == "flex_attention":
                mask = create_causal_mask(**mask_kwargs, or_mask_function=dual_pathway_mask_function(*pattern))
            else:
                # A dense mask either way: build causal + padding in the backend's format (fast path), then add the
                # pattern with tensor ops (the mask-function path evaluates it under vmap, ~10x slower here).
                mask = create_causal_mask(**mask_kwargs, allow_is_causal_skip=False)
                mask = add_to_dense_mask(mask, *pattern, inputs_embeds.dtype)
        return {**attention_mask, "full_attention": mask} if isinstance(attention_mask, dict) else mask

    @can_return_tuple
    @deprecated_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        seg_layout: SegmentationLayout | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SelfieModelOutputWithPast:
        r"""
        Same inputs as [`InternVLModel.forward`], plus the batch's [`SegmentationLayout`] when known (else whether a
        sample has `[SEG]` is read from the device). Without `input_ids`, image and `[SEG]` tokens are found from
        `inputs_embeds`. The key-value cache comes as `cache` or `past_key_values`, whichever this transformers
        release uses.

        Returns:
            [`SelfieModelOutputWithPast`]: InternVL's outputs (with the vision encoder's outputs) plus
            `image_features` (F_V1) and, when a sample contains `[SEG]`, `image_features_hq` (F_V1^HQ: with
            `seg_layout`, of the tiles of images in samples with `[SEG]` only).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds.")
        legacy_cache = pop_cache(kwargs)  # `past_key_values` where this release still uses that name
        cache = legacy_cache if cache is None else cache
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        # given embeddings: find the tokens before image features replace the image tokens' rows
        token_masks = None if input_ids is not None else self.token_masks(None, inputs_embeds, attention_mask)

        vision_outputs = image_features = image_features_hq = None
        segmenting = seg_layout.segmenting if seg_layout is not None else None
        if pixel_values is not None:
            vision_outputs = self.get_image_features(pixel_values=pixel_values, return_dict=True)
            image_features = vision_outputs.pooler_output
            placeholder = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(placeholder, image_features.to(inputs_embeds))
            if segmenting is None:
                seg_tokens = (token_masks or self.token_masks(input_ids, inputs_embeds, attention_mask))[0]
                segmenting = bool(seg_tokens.any())
            if segmenting and self.config.use_hq_features:
                layer = self.config.vision_feature_layer
                selected = vision_outputs.last_hidden_state if layer == -1 else vision_outputs.hidden_states[layer]
                if seg_layout is not None:  # no F_V1^HQ for images of samples without [SEG]
                    selected = gather_ranges(selected, seg_layout.seg_tile_ranges())
                image_features_hq = self.get_image_features_hq(selected[:, 1:, :])

        if segmenting is None:  # no images in this forward (a decoding step, text only): no pattern to add
            segmenting = False
        llm_attention_mask = self.seg_attention_mask(
            input_ids, inputs_embeds, attention_mask, cache, position_ids, has_seg=segmenting, token_masks=token_masks
        )
        outputs = self.language_model(
            attention_mask=llm_attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **cache_kwargs(cache),
            **kwargs,
        )
        return SelfieModelOutputWithPast(
            **outputs,
            **image_output_fields(vision_outputs),
            image_features=image_features,
            image_features_hq=image_features_hq,
        )


class SelfieForSegmentation(InternVLForConditionalGeneration, GenerationMixin):
    """InternVL3 that also returns one mask per `[SEG]` token, from one forward pass and no mask decoder.

    Chat without `[SEG]` is exactly InternVL (same logits, `generate()` works). The text model is whichever InternVL
    carries (Qwen2 for InternVL3, Qwen3 for InternVL3.5, Llama for InternVL2.5 as transformers converts it);
    `_no_split_modules` (InternVL's vision layer) gains its decoder layer in `post_init`, as transformers gathers the
    sub-models' ones. `AutoModel` and `AutoModelForImageTextToText` both give this class (the model that segments);
    [`SelfieModel`] is its base model (`base_model_prefix`: a checkpoint of either loads into the other).
    """

    config_class = SelfieConfig
    config: SelfieConfig
    # The head (~0.3% of the weights) stays float32 when the rest loads in float16 / bfloat16 (`dtype=`); its layers
    # are built in float32. Quantized loads leave it unconverted too (see `__init__`).
    _keep_in_fp32_modules_strict = ["seg_head"]

    def __init__(self, config: SelfieConfig):
        # InternVLPreTrainedModel's init, not InternVLForConditionalGeneration's (it would build an InternVLModel)
        super(InternVLForConditionalGeneration, self).__init__(config)
        self.model = SelfieModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.seg_head = SelfieSegmentationHead(config)
        self.loss_type = "ForCausalLM"  # the text loss; the class name would select transformers' detection loss
        self.post_init()
        if getattr(config, "quantization_config", None) is not None:
            # transformers' quantizers (bitsandbytes, torchao) leave `_keep_in_fp32_modules` unconverted, not the
            # strict list; `from_pretrained` sets the config's quantization_config before it builds the model
            self._keep_in_fp32_modules = {*self._keep_in_fp32_modules, "seg_head"}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, seg_token_id: int | None = None, **kwargs):
        """Load a SELFIE checkpoint, or start SELFIE from a plain InternVL3 one.

        Reads the key layouts InternVL checkpoints come in (`INTERNVL_KEY_MAPPING`: the Hub's `-hf` repositories,
        what `InternVLForConditionalGeneration.save_pretrained` writes, the module names), tied or untied word
        embeddings. Every base weight must be in the checkpoint: a missing one is a `ValueError` that names it (a
        checkpoint without its language model or vision tower never loads silently), unless the caller takes the
        loading report (`output_loading_info=True`) or gives the weights (`state_dict=`): then, as in transformers,
        missing weights are initialised by `_init_weights`, listed in the report and logged. The SELFIE head may
        always be missing (an InternVL start): it is initialised as transformers initialises every Linear (normal
        weights with `initializer_range`, zero biases) and logged. Unless `seg_token_id` is given, a config
        without one gets `[SEG]` at the id the folder's tokenizer gives it (`SelfieProcessor.from_pretrained` on the
        same folder agrees), or appended to the vocabulary when the folder has no tokenizer; its embedding rows
        start at the mean of the old rows (`add_seg_token`), also logged.
        """
        want_info = kwargs.pop("output_loading_info", False)
        kwargs["key_mapping"] = {**INTERNVL_KEY_MAPPING, **(kwargs.get("key_mapping") or {})}
        with HeldLoadReport() as held:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        missing = [key for key in info["missing_keys"] if not key.startswith("seg_head.")]
        if missing or info["unexpected_keys"] or info["mismatched_keys"]:
            held.release()  # more than the new head, which is logged below, once: transformers' report is shown
        if missing:
            shown = ", ".join(sorted(missing)[:12]) + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
            message = (
                f"{pretrained_model_name_or_path} lacks {len(missing)} weight(s) of the InternVL base model: {shown}"
            )
            if not want_info and kwargs.get("state_dict") is None:
                raise ValueError(
                    f"{message}. Only the SELFIE head may be missing from a checkpoint; is this an InternVL3 / SELFIE "
                    "checkpoint? (With output_loading_info=True they are initialised at random and reported instead.)"
                )
            logger.warning(f"{message}; they are initialised at random.")
        fresh = sorted({".".join(key.split(".")[:2]) for key in info["missing_keys"] if key.startswith("seg_head.")})
        if fresh:
            count = sum(p.numel() for name in fresh for p in model.get_submodule(name).parameters())
            logger.warning(
                f"SELFIE modules initialised from scratch (not in the checkpoint): {', '.join(fresh)} ({count:,} "
                "parameters). Train them before use."
            )
        if seg_token_id is not None:
            model.config.seg_token_id = seg_token_id
        if model.config.seg_token_id is None:
            folder = pretrained_model_name_or_path
            model.add_seg_token(
                None if folder is None else seg_token_id_of_folder(folder, kwargs, model.config.image_token_id)
            )
        return (model, info) if want_info else model

    @property
    def input_device(self) -> torch.device:
        """Where inputs go: the execution device of the input embeddings when accelerate dispatched the model
        (`device_map=...`; offloaded weights wait on the meta device, so `self.device` can say "meta"), else
        `self.device`."""
        hook = getattr(self.get_input_embeddings(), "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        return self.device if device is None else torch.device(device)

    def add_seg_token(self, seg_token_id: int | None = None) -> int:
        """Give `[SEG]` an embedding row (input and output) and return its id.

        Args:
            seg_token_id: the id; defaults to the current vocabulary size (the row is appended). An id past the
                vocabulary grows it to `seg_token_id + 1` rows; an id inside it reuses that (unused) row. Every row
                set here starts at the mean of the old vocabulary's rows.
        """
        old_size = self.config.text_config.vocab_size
        new_id = old_size if seg_token_id is None else seg_token_id
        if new_id >= old_size:
            self.resize_token_embeddings(new_id + 1, mean_resizing=False)
        rows = slice(min(old_size, new_id), new_id + 1)
        weights = [self.get_input_embeddings().weight, self.get_output_embeddings().weight]
        gathered = contextlib.nullcontext()
        if is_deepspeed_zero3_enabled():  # the rows are partitioned across processes
            try:  # (a try block, so that remote code does not list deepspeed as a requirement)
                from deepspeed.zero import GatheredParameters
            except ImportError as error:
                raise ImportError("ZeRO-3 is enabled but deepspeed cannot be imported.") from error
            gathered = GatheredParameters(weights, modifier_rank=0)
        with gathered, torch.no_grad():
            for weight in weights:
                weight[rows] = weight[:old_size].mean(0)
        self.config.seg_token_id = new_id
        logger.warning(
            f"Added [SEG] to the vocabulary with id {new_id}; the embeddings have "
            f"{self.config.text_config.vocab_size} rows."
        )
        return new_id

    def predict_masks(
        self,
        seg_tokens: torch.Tensor,
        image_tokens: torch.Tensor,
        hidden_states: torch.Tensor,
        image_features: torch.Tensor,
        image_features_hq: torch.Tensor | None,
        seg_layout: SegmentationLayout,
        with_aux: bool = False,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Mask logits for every `[SEG]`, vectorised over all images that share a tile grid.

        Reads no device values: `[SEG]` and image-token positions are found on the device with sizes the layout
        gives, tiles and `[SEG]` vectors are selected by host-known ranges, and each sample's masks are a view of its
        grid's result. Samples without `[SEG]` cost nothing.

        Args:
            seg_tokens, image_tokens: `[B, L]` bool masks of the `[SEG]` and image tokens, padding excluded
                ([`SelfieModel.token_masks`]).
            hidden_states: `[B, L, D]` final-norm LLM states.
            image_features: F_V1 `[T, g_lo**2, D]` of all tiles.
            image_features_hq: F_V1^HQ `[T_seg, g_hi**2, D]` of the tiles of `seg_layout.seg_images()`, or `None`.
            seg_layout: the batch's [`SegmentationLayout`].
            with_aux: also return the auxiliary low-resolution logits (training).
        Returns:
            `pred_masks` (list of `[n_seg, H, W]` per sample) and, with `with_aux`, the low-resolution logits in the
            same layout (else `None`).
        """
        flat_hidden = hidden_states.flatten(0, 1)
        seg_vectors = self.seg_head.seg_embeddings(flat_hidden[self.seg_state_index(seg_tokens, seg_layout)])
        tokens = self.config.tokens_per_tile_side**2
        image_index = first_true_indices(image_tokens.flatten(), image_features.shape[0] * tokens).view(-1, tokens)

        tile_ranges = seg_layout.tile_ranges()
        seg_starts = [sum(seg_layout.seg_counts[:b]) for b in range(len(seg_layout.seg_counts))]
        seg_images = seg_layout.seg_images()
        hq_start, offset = {}, 0  # where each image's tiles start in image_features_hq
        for i in seg_images:
            hq_start[i], offset = offset, offset + tile_ranges[i][1] - tile_ranges[i][0]
        empty = hidden_states.new_zeros(0, 1, 1)
        pred_masks = [empty] * len(seg_layout.seg_counts)
        aux_masks = [empty] * len(seg_layout.seg_counts) if with_aux else None
        for rows, cols in sorted({seg_layout.tile_grids[i] for i in seg_images}):
            group = [i for i in seg_images if seg_layout.tile_grids[i] == (rows, cols)]  # images, in order
            samples = [seg_layout.image_samples[i] for i in group]
            counts = [seg_layout.seg_counts[b] for b in samples]
            tiles = merge_ranges([tile_ranges[i] for i in group])
            llm_pixels = self.seg_head.llm_pixel_features(flat_hidden[gather_ranges(image_index, tiles)], rows, cols)
            hq = None
            if image_features_hq is not None:
                hq_tiles = [(hq_start[i], hq_start[i] + rows * cols) for i in group]
                hq = gather_ranges(image_features_hq, merge_ranges(hq_tiles))
            pixels = self.seg_head.pixel_features(llm_pixels, gather_ranges(image_features, tiles), hq, rows, cols)
            vectors = gather_ranges(seg_vectors, merge_ranges([(seg_starts[b], seg_starts[b] + n) for b, n in
                                                               zip(samples, counts)]))
            logits = self.seg_head.mask_logits(repeat_rows(pixels, counts), vectors).split(counts)
            for b, sample_logits in zip(samples, logits):
                pred_masks[b] = sample_logits
            if with_aux:
                low = self.seg_head.mask_logits(repeat_rows(llm_pixels, counts), vectors).split(counts)
                for b, sample_low in zip(samples, low):
                    aux_masks[b] = sample_low
        return pred_masks, aux_masks

    def seg_state_index(self, seg_tokens: torch.Tensor, seg_layout: SegmentationLayout) -> torch.LongTensor:
        """`[S]` flat positions (in the flattened `[B, L]` batch) of the hidden states that predict each `[SEG]`,
        sample-major: the token before each `[SEG]` (the `[SEG]` itself when it opens a row). `seg_tokens`: `[B, L]`
        bool, padding excluded ([`SelfieModel.token_masks`])."""
        seg_index = first_true_indices(seg_tokens.flatten(), sum(seg_layout.seg_counts))
        return seg_index - 1 + (seg_index % seg_tokens.shape[1] == 0).long()

    def presence_logits(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        seg_tokens: torch.Tensor,
        hidden_states: torch.Tensor,
        pred_masks: list[torch.Tensor],
        seg_layout: SegmentationLayout,
    ) -> list[torch.Tensor]:
        """Whether each `[SEG]`'s object is in the image: one `[n_seg]` logit tensor per sample.

        The logit of the mask's most confident pixel; with `config.presence_head`, the smaller of that and the
        head's logit for the hidden state that predicts the `[SEG]`; minus `UNKNOWN_TOKEN_PRESENCE_PENALTY` for
        every `config.unk_token_id` token before the `[SEG]` (a word the vocabulary lacks). So the score is below
        0.5 whenever the mask is empty at the default threshold, the head judges the object absent, or the query
        holds an unknown word.

        Args:
            input_ids, attention_mask: `[B, L]` (without `input_ids`, given embeddings, no unknown-word penalty).
            seg_tokens: `[B, L]` bool `[SEG]` mask, padding excluded ([`SelfieModel.token_masks`]).
            hidden_states: `[B, L, D]` final-norm LLM states.
            pred_masks: `predict_masks`' logits, `[n_seg, H, W]` per sample.
            seg_layout: the batch's [`SegmentationLayout`].
        """
        logits = torch.cat([masks.flatten(1).amax(1) for masks in pred_masks])  # sample-major, [S]
        predicting = self.seg_state_index(seg_tokens, seg_layout)
        if self.seg_head.presence is not None:
            states = hidden_states.flatten(0, 1)[predicting].to(self.seg_head.presence.weight.dtype)
            head = self.seg_head.presence(states)[:, 0]
            logits = torch.minimum(logits, head.to(logits.dtype))
        if self.config.unk_token_id is not None and input_ids is not None:
            unknown = input_ids == self.config.unk_token_id
            padding = padding_mask(attention_mask)  # a mask prebuilt for generation holds no [B, L] padding
            if padding is not None:
                unknown = unknown & padding
            logits = logits - UNKNOWN_TOKEN_PRESENCE_PENALTY * unknown.cumsum(1).flatten()[predicting].to(logits.dtype)
        return list(logits.split(list(seg_layout.seg_counts)))

    def iou_logits(self, pred_masks: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The mask-quality head's logits, one `[n_seg]` tensor per sample (`None` without `config.iou_head`):
        `sigmoid` of each is the predicted IoU of the `[SEG]`'s mask with the referred object (SAM's
        `iou_scores`), a calibration `w * log(q) + b` of the mask's own quality `q` ([`mask_quality`]: stability,
        confidence, one connected part). `w` and `b` are fitted after training, as the presence head is
        (`examples/fit_iou_head.py`).

        Args:
            pred_masks: `predict_masks`' logits, `[n_seg, H, W]` per sample.
        """
        if self.seg_head.iou is None:
            return None
        head = self.seg_head.iou
        return [head(log_mask_quality(masks).to(head.weight))[:, 0] for masks in pred_masks]

    def mask_loss(
        self, pred_masks: list[torch.Tensor], aux_masks: list[torch.Tensor], mask_labels: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed BCE and DICE over samples, masks and {full-res, aux}, normalised per the config."""
        if len(mask_labels) != len(pred_masks):
            raise ValueError(f"mask_labels has {len(mask_labels)} entries for a batch of {len(pred_masks)} samples.")
        bce_total = dice_total = pred_masks[0].new_zeros(()) if pred_masks else torch.zeros(())
        n_masks = 0
        for b, (pred, aux, target) in enumerate(zip(pred_masks, aux_masks, mask_labels)):
            if target.shape[0] != pred.shape[0]:
                raise ValueError(
                    f"mask_labels[{b}] holds {target.shape[0]} masks but sample {b} has {pred.shape[0]} [SEG] tokens."
                )
            if pred.shape[0] == 0:
                continue
            target = target.to(pred.device)
            bce, dice = mask_bce_and_dice(pred, target)
            aux_bce, aux_dice = mask_bce_and_dice(aux, target)
            weight = self.config.aux_mask_loss_weight
            bce_total = bce_total + bce.sum() + weight * aux_bce.sum()
            dice_total = dice_total + dice.sum() + weight * aux_dice.sum()
            n_masks += pred.shape[0]
        if self.config.mask_loss_normalization == "batch":
            denominator = len(pred_masks)
        else:
            denominator = max(n_masks, 1)
        return bce_total / denominator, dice_total / denominator

    @torch.inference_mode()
    def segment(
        self,
        processor,
        images,
        queries: str | list[str],
        query_kind: str = "phrase",
        mask_threshold: float = 0.0,
        presence_threshold: float = 0.5,
        return_logits: bool = False,
        return_scores: bool = False,
        return_iou_scores: bool = False,
    ) -> list[torch.Tensor] | tuple:
        """Segment each image from its query in one teacher-forced forward pass (prompt + "[SEG].").

        Args:
            processor: the model's [`SelfieProcessor`].
            images: one image or a list (PIL, numpy HWC or torch CHW), one per query; a single image is used for
                every query.
            queries: a phrase / instruction per image.
            query_kind: `"phrase"` or `"instruction"` (paper Sec. 9.2 templates).
            mask_threshold: logit threshold of the returned masks.
            presence_threshold: masks whose presence score is lower come back empty.
            return_logits: return the mask logits (float) instead of bool masks.
            return_scores: also return each mask's presence score, `sigmoid(presence_logit)` (see
                [`SelfieForSegmentation.presence_logits`]).
            return_iou_scores: also return each mask's predicted IoU, `sigmoid(iou_logit)` (see
                [`SelfieForSegmentation.iou_logits`]; `None` for each mask of a model without `config.iou_head`).
        Returns:
            One `[height, width]` mask per query, at its image's own size; with `return_scores`, `(masks, scores)`;
            with `return_iou_scores`, `(masks, iou_scores)`; with both, `(masks, scores, iou_scores)`.

        Queries are normalised as the processor's `query_normalization` says; words the vocabulary lacks are named in
        one [`UnknownWordsWarning`].
        """
        from .processing_selfie import image_size_of, post_process_masks

        processor.check_model(self.config)
        queries = [queries] if isinstance(queries, str) else list(queries)
        images = list(images) if isinstance(images, (list, tuple)) else [images] * len(queries)
        if len(images) != len(queries):
            raise ValueError(f"{len(images)} images for {len(queries)} queries: give one image per query.")
        inputs = processor(images=images, queries=queries, query_kind=query_kind)
        processor.warn_unknown_words(queries, query_kind)
        layout = SegmentationLayout.from_inputs(self.config, inputs["input_ids"], inputs["attention_mask"],
                                                inputs["tile_grid"])  # on the CPU: no device read in the forward
        inputs = inputs.to(self.input_device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self(**inputs, seg_layout=layout, logits_to_keep=1)  # masks need no vocabulary logits
        sizes = [image_size_of(image) for image in images]
        masks, scores = post_process_masks(
            out.pred_masks, sizes, mask_threshold, not return_logits, out.presence_logits, presence_threshold,
            return_scores=True,
        )
        masks = [m[0] for m in masks]
        if not (return_scores or return_iou_scores):
            return masks
        scores = [float(score[0]) for score in scores]
        iou_scores = [None] * len(masks)
        if out.iou_logits is not None:
            iou_scores = [float(iou[0].float().sigmoid()) for iou in out.iou_logits]
        return (masks, *([scores] if return_scores else []), *([iou_scores] if return_iou_scores else []))

    @torch.inference_mode()
    def chat(
        self,
        processor,
        image,
        messages: list[dict],
        max_new_tokens: int = 64,
        mask_threshold: float = 0.0,
        **generate_kwargs,
    ) -> dict:
        """Answer freely, then segment every `[SEG]` the answer holds (generate-then-segment).

        `generate()` writes the answer with InternVL's causal attention; if it contains `[SEG]`, one extra forward
        over prompt + answer with the dual-pathway attention (the pattern the model was trained with) gives one
        mask per `[SEG]`. The teacher-forced path (`segment`, or `processor(queries=...)`) instead fixes the answer
        to "[SEG]." and needs a single forward: use it for benchmarks and batch segmentation, and `chat` when the
        model should decide what to say (and how many objects to segment).

        Args:
            processor: the model's [`SelfieProcessor`].
            image: the conversation's image (PIL, numpy HWC or torch CHW) or `None`.
            messages: the conversation so far, `{"role": "user" | "assistant", "content": str}` turns ending with a
                user turn; earlier turns are kept as history.
            max_new_tokens, generate_kwargs: passed to `generate` (greedy by default).
        Returns:
            `{"text": answer, "masks": bool [n_seg, H, W] at the image size (n_seg = [SEG] in this answer),
            "scores": presence scores [n_seg]}` (a mask is empty exactly when its score is below 0.5, see
            [`post_process_masks`]).
        """
        from .processing_selfie import image_size_of, post_process_masks

        processor.check_model(self.config)
        messages = [  # user turns written as the model's training text was (the processor's query_normalization)
            {**turn, "content": processor.normalize_query(turn["content"], "instruction")} if turn["role"] == "user"
            else turn
            for turn in messages
        ]
        prompt = processor.render_conversation(messages, with_image=image is not None, add_generation_prompt=True)
        inputs = processor(images=[image] if image is not None else None, text=[prompt]).to(self.input_device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        tile_grid = inputs.pop("tile_grid", None)
        end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        generate_kwargs = {"do_sample": False, "eos_token_id": end_id, **generate_kwargs}
        generated = self.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)[0]
        answer_ids = generated[inputs["input_ids"].shape[1] :].tolist()
        if end_id in answer_ids:
            answer_ids = answer_ids[: answer_ids.index(end_id) + 1]
        text = processor.tokenizer.decode([i for i in answer_ids if i != end_id], skip_special_tokens=False)
        n_seg = answer_ids.count(self.config.seg_token_id)
        empty = torch.zeros(0, *(image_size_of(image) if image is not None else (0, 0)), dtype=torch.bool)
        if n_seg == 0 or image is None:
            return {"text": text, "masks": empty, "scores": torch.zeros(0)}
        full = torch.cat([inputs["input_ids"][0], torch.tensor(answer_ids, device=self.input_device)])[None]
        out = self(input_ids=full, pixel_values=inputs["pixel_values"], tile_grid=tile_grid)
        logits, presence = out.pred_masks[0][-n_seg:], out.presence_logits[0][-n_seg:]
        (masks,), (scores,) = post_process_masks(
            [logits], [image_size_of(image)], mask_threshold, presence_logits=[presence], return_scores=True
        )
        return {"text": text, "masks": masks.cpu(), "scores": scores.float().cpu()}

    @can_return_tuple
    @deprecated_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        tile_grid: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        mask_labels: list[torch.Tensor] | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        seg_layout: SegmentationLayout | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SelfieSegmentationOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`): token ids with `<IMG_CONTEXT>` placeholders (or
                `inputs_embeds` `(B, L, D)`: image and `[SEG]` tokens are then found from their embeddings).
            pixel_values (`torch.FloatTensor` of shape `(T, 3, S, S)`): all tiles of all images, in order.
            attention_mask (`torch.Tensor` of shape `(B, L)`): 1 for real tokens, 0 for padding.
            tile_grid (`torch.LongTensor` of shape `(num_images, 2)`): (rows, cols) of tiles per image, as the
                processor returns it. Defaults to one tile per image.
            labels (`torch.LongTensor` of shape `(B, L)`): next-token targets, -100 = ignored.
            mask_labels (`list[torch.FloatTensor]`): one `[n_seg, h, w]` 0/1 tensor per sample (any h, w), the
                k-th mask for the k-th `[SEG]`.
            seg_layout ([`SegmentationLayout`]): the batch's `[SEG]` counts and tile grids on the host, built from
                the processor's outputs before they are moved to the device; then the forward reads no device values.
                Built from the inputs when not given (one device-to-host copy on an accelerator).

        Returns:
            [`SelfieSegmentationOutput`] with `logits`, `pred_masks` (when the batch has `[SEG]` and images) and the
            losses when `labels` / `mask_labels` are given.
        """
        token_masks = None
        if pixel_values is not None and self.config.seg_token_id is not None:
            token_masks = self.model.token_masks(input_ids, inputs_embeds, attention_mask)
            if seg_layout is None:
                seg_layout = SegmentationLayout.from_token_masks(self.config, *token_masks, tile_grid)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            cache=cache,
            seg_layout=seg_layout,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        pred_masks = aux_masks = presence_logits = iou_logits = None
        if seg_layout is not None and seg_layout.segmenting and outputs.image_features is not None:
            pred_masks, aux_masks = self.predict_masks(
                *token_masks,
                hidden_states,
                outputs.image_features,
                outputs.image_features_hq,
                seg_layout,
                with_aux=mask_labels is not None,
            )
            presence_logits = self.presence_logits(
                input_ids, attention_mask, token_masks[0], hidden_states, pred_masks, seg_layout
            )
            iou_logits = self.iou_logits(pred_masks)

        loss = text_loss = bce_loss = dice_loss = None
        if labels is not None:
            text_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
            loss = self.config.text_loss_weight * text_loss
        if mask_labels is not None:
            if pred_masks is None:
                pred_masks = aux_masks = [hidden_states.new_zeros(0, 1, 1) for _ in range(hidden_states.shape[0])]
            bce_loss, dice_loss = self.mask_loss(pred_masks, aux_masks, mask_labels)
            mask_loss = self.config.bce_loss_weight * bce_loss + self.config.dice_loss_weight * dice_loss
            loss = mask_loss if loss is None else loss + mask_loss

        return SelfieSegmentationOutput(
            loss=loss,
            logits=logits,
            **shared_fields(outputs, SelfieSegmentationOutput),
            pred_masks=pred_masks,
            presence_logits=presence_logits,
            iou_logits=iou_logits,
            text_loss=text_loss,
            mask_bce_loss=bce_loss,
            mask_dice_loss=dice_loss,
        )


# Remote code: save_pretrained copies the module files and writes `auto_map`, where `SelfieConfig.save_pretrained`
# names `SelfieForSegmentation` for both `AutoModel` and `AutoModelForImageTextToText`, as the package registers them.
SelfieModel.register_for_auto_class("AutoModel")
SelfieForSegmentation.register_for_auto_class("AutoModel")

__all__ = [
    "SegmentationLayout",
    "SelfieForSegmentation",
    "SelfieModel",
    "SelfieSegmentationHead",
    "SelfieSegmentationOutput",
]
