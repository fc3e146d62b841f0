"""Processor of SELFIE: InternVL's processor plus the reference tiling, the paper's prompts, mask targets and
`post_process_masks`."""

import random
import re
import warnings
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import AddedToken
from transformers import InternVLProcessor
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ImageInput,
    PILImageResampling,
    SizeDict,
)
from transformers.tokenization_utils_base import PreTokenizedInput, TextInput
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from .io_utils import rgb_image, shown_size
from .queries import QUERY_NORMALIZATIONS, normalize_query, shorten

SEG_TOKEN = "[SEG]"
UNKNOWN_WORDS_NAMED = 10  # unknown words an `UnknownWordsWarning` names (the others are counted)
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
SELF1E_SYSTEM_MESSAGE = "You are an helpful assistant."  # (sic) the released SELF1E's system turn
# How the first user turn starts (the authors' evaluation writes "<image>\n "
# and the query as its dataset gives it: their RefCOCO loader lowercases, ReasonSeg text stays as written;
# InternVL's chat format writes "<image>\n").
PROMPT_STYLES = {
    "self1e": {"image_prefix": "{image}\n "},
    "internvl": {"image_prefix": "{image}\n"},
}
# InternVL's image tokens, for tokenizers whose config does not name them (the original InternVL3 folders).
IMAGE_TOKEN_ROLES = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
}

# Paper Sec. 9: prompt templates.
SHORT_QUESTIONS = (
    "Can you segment the {text} in this image?",
    "Please segment the {text} in this image.",
    "What is {text} in this image? Please respond with segmentation mask.",
    "What is {text} in this image? Please output segmentation mask.",
)
LONG_QUESTIONS = (
    "{text} Please respond with segmentation mask.",
    "{text} Please output segmentation mask.",
)
ANSWERS = (
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
)
VALIDATION_QUESTIONS = {
    "phrase": "What is {text} in this image? Please output segmentation mask.",
    "instruction": "{text} Please output segmentation mask.",
}
VALIDATION_ANSWER = "[SEG]."
# InternVL's chat format for `apply_chat_template`: `<|im_start|>` turns, each image as `<IMG_CONTEXT>` + newline
# (the processor expands it to the image's tokens).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def hub_kwargs(kwargs: dict, pop: bool = False) -> dict:
    """The entries of `kwargs` that say where and how to fetch a Hub folder (`HUB_KWARGS`); removed from `kwargs`
    with `pop`."""
    return {key: kwargs.pop(key) if pop else kwargs[key] for key in HUB_KWARGS if key in kwargs}


def segmentation_question(text: str, kind: str = "phrase", rng: random.Random | None = None) -> str:
    """The user turn for one segmentation query (paper Sec. 9).

    Args:
        text: an object name / referring expression (`kind="phrase"`) or a full-sentence instruction
            (`kind="instruction"`).
        rng: `None` gives the validation template; a `random.Random` samples a training template (the long list
            for instructions, the short list for phrases).
    """
    if kind not in VALIDATION_QUESTIONS:
        raise ValueError(f"Unknown query kind {kind!r}: use 'phrase' or 'instruction'.")
    if rng is None:
        return VALIDATION_QUESTIONS[kind].format(text=text)
    return rng.choice(LONG_QUESTIONS if kind == "instruction" else SHORT_QUESTIONS).format(text=text)


class UnknownWordsWarning(UserWarning):
    """A query holds words the model's word-level vocabulary lacks (its tokenizer reads them as `<unk>`)."""


def segmentation_answer(rng: random.Random | None = None) -> str:
    """The assistant turn: "[SEG]." for validation, a random training answer with `rng`."""
    return VALIDATION_ANSWER if rng is None else rng.choice(ANSWERS)


@lru_cache(maxsize=64)
def _candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(cols, rows) grids with min_tiles <= cols*rows <= max_tiles, ordered by tile count; among equal counts the
    order is the iteration order of InternVL's candidate set, which decides exact ties as the reference does."""
    candidates = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return sorted(candidates, key=lambda grid: grid[0] * grid[1])


def select_tile_grid(width: int, height: int, tile_size: int, min_tiles: int = 1, max_tiles: int = 12) -> tuple[int, int]:
    """The tile grid InternVL's dynamic preprocessing picks for an image, as (rows, cols).

    The grid whose aspect ratio cols/rows is closest to width/height wins; on an exact tie a later (larger)
    candidate replaces it only while the image area exceeds half the grid's pixel area.
    """
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in _candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best[1], best[0]


class SelfieImageProcessor(GotOcr2ImageProcessorPil):
    r"""
    Tiles images as the released SELF1E does: the whole image is resized (bicubic) to a grid of `size` tiles chosen
    by [`select_tile_grid`] and cut into row-major tiles, with no thumbnail; ImageNet mean/std normalisation.

    `max_patches=1` (the default, as the released model was trained and evaluated) squashes the whole image into one
    448x448 tile. Returns `pixel_values` `[T, 3, S, S]`, `num_patches` per image and `tile_grid` `[num_images, 2]`
    as (rows, cols).
    """

    size = {"height": 448, "width": 448}
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    resample = PILImageResampling.BICUBIC
    crop_to_patches = True
    min_patches = 1
    max_patches = 1
    model_input_names = ["pixel_values", "tile_grid"]

    def __init__(self, **kwargs):
        kwargs.pop("auto_map", None)  # where remote code finds the class, not a setting (save_pretrained rewrites it)
        super().__init__(**kwargs)

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """Tiles of an image of this size: the grid of [`select_tile_grid`], no thumbnail."""
        images_kwargs = images_kwargs or {}
        size = images_kwargs.get("size") or self.size
        tile = size["height"] if isinstance(size, dict) else size.height
        min_patches = images_kwargs.get("min_patches", self.min_patches)
        max_patches = images_kwargs.get("max_patches", self.max_patches)
        rows, cols = select_tile_grid(width, height, tile, min_patches, max_patches)
        return rows * cols

    def _preprocess(
        self,
        images: list[np.ndarray],
        size: SizeDict,
        resample,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        return_tensors=None,
        min_patches: int = 1,
        max_patches: int = 1,
        **kwargs,
    ) -> BatchFeature:
        mean = np.asarray(image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(image_std, dtype=np.float32)[:, None, None]
        divisor = np.float32(1 / rescale_factor)  # 255 exactly for the default 1/255: the released preprocessing
        tiles, num_patches, tile_grid = [], [], []
        for image in images:  # CHW uint8
            height, width = image.shape[-2:]
            rows, cols = select_tile_grid(width, height, size.height, min_patches, max_patches)
            resized = self.resize(image, SizeDict(height=size.height * rows, width=size.width * cols), resample)
            for t in range(rows * cols):
                r, c = divmod(t, cols)
                tile = resized[:, r * size.height : (r + 1) * size.height, c * size.width : (c + 1) * size.width]
                tile = tile.astype(np.float32) / divisor if do_rescale else tile.astype(np.float32)
                tiles.append((tile - mean) / std if do_normalize else tile)
            num_patches.append(rows * cols)
            tile_grid.append([rows, cols])
        data = {"pixel_values": tiles, "num_patches": num_patches, "tile_grid": tile_grid}
        return BatchFeature(data=data, tensor_type=return_tensors)


class SelfieProcessor(InternVLProcessor):
    r"""
    InternVL's processor with what segmentation needs:

    * registers `[SEG]` (adds it to a tokenizer that lacks it);
    * tiles with [`SelfieImageProcessor`] and returns `tile_grid` `[num_images, 2]` (rows, cols);
    * `queries=` builds the paper's validation prompt for each query, answered "[SEG]." (one teacher-forced
      forward gives the masks); `conversations=` renders any chat (training data, several `[SEG]`);
    * `masks=` turns ground-truth masks into `mask_labels`, `return_labels=True` supervises the assistant turns;
    * [`post_process_masks`] brings mask logits back to each image's own size.

    Args:
        system_message (`str`, *optional*, defaults to the released SELF1E's): system turn of the chat (`""` leaves
            it out).
        prompt_style (`str`, *optional*, defaults to `"self1e"`): `"self1e"` writes the first user turn as the
            authors' evaluation does (`<image>\n ` then the question, the query stripped); `"internvl"`
            as InternVL's chat format (`<image>\n`, phrases as given). Saved with the processor, so a model keeps the
            prompt it was trained with.
        query_normalization (`str`, *optional*): how every query (and `chat` user turn) is rewritten first, as the
            model's training text was written: `None` (as given) or `"words"` (lower-case words, no punctuation;
            see [`normalize_query`]). Saved with the processor; independent of `prompt_style`.

    `SelfieProcessor.from_pretrained` also reads InternVL3 folders (`-hf` or original): SELFIE tiling with the
    folder's tile size and normalisation, its tokenizer with `[SEG]` added.

    Without a `chat_template`, `apply_chat_template` uses InternVL's chat format (`CHAT_TEMPLATE`: `<|im_start|>` turns,
    an image as `<IMG_CONTEXT>` and a newline); `render_conversation` adds SELFIE's system turn and prompt style.
    """

    images_kwargs = {}  # SelfieImageProcessor's own defaults (one tile, no thumbnail) apply

    @property
    def videos_kwargs(self):
        """SELFIE takes no video: InternVL's video defaults are not inherited."""
        raise AttributeError("SelfieProcessor has no videos_kwargs: SELFIE takes no video input.")

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_seq_length: int = 256,
        chat_template=None,
        system_message: str = SELF1E_SYSTEM_MESSAGE,
        prompt_style: str = "self1e",
        query_normalization: str | None = None,
        **kwargs,
    ):
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style={prompt_style!r} is not one of {list(PROMPT_STYLES)}.")
        if query_normalization not in QUERY_NORMALIZATIONS:
            raise ValueError(
                f"query_normalization={query_normalization!r} is not one of {list(QUERY_NORMALIZATIONS)}."
            )
        if tokenizer is not None and tokenizer.convert_tokens_to_ids(SEG_TOKEN) in (None, tokenizer.unk_token_id):
            tokenizer.add_tokens([AddedToken(SEG_TOKEN, special=True, normalized=False)], special_tokens=True)
        # InternVLProcessor.__init__ also takes a video processor, which needs torchvision; SELFIE has no video
        # input, so the processor is set up with an image processor and a tokenizer only.
        chat_template = CHAT_TEMPLATE if chat_template is None else chat_template
        kwargs.pop("auto_map", None)  # where remote code finds the classes, not a setting (save_pretrained rewrites it)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_seq_length = image_seq_length
        self.start_image_token, self.start_image_token_id = image_token(tokenizer, "start_image_token")
        self.end_image_token, self.end_image_token_id = image_token(tokenizer, "end_image_token")
        self.image_token, self.image_token_id = image_token(tokenizer, "context_image_token")
        self.multimodal_pattern = re.compile(f"(?P<image>{re.escape(self.image_token)})")
        self.system_message = system_message
        self.prompt_style = prompt_style
        self.query_normalization = query_normalization
        self.seg_token = SEG_TOKEN
        self.seg_token_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
        self._assistant_header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        self._turn_end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "SelfieProcessor":
        """A saved SELFIE processor, or a new one from an InternVL3 folder (see [`SelfieProcessor.from_internvl`])."""
        processor_dict, _ = cls.get_processor_dict(pretrained_model_name_or_path, **hub_kwargs(kwargs))
        if processor_dict.get("processor_class") == cls.__name__:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls.from_internvl(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_internvl(cls, pretrained_model_name_or_path, **kwargs) -> "SelfieProcessor":
        """A SELFIE processor for a plain InternVL3 folder (the `-hf` layout or the original `internvl_chat` one).

        Keeps the folder's tokenizer (adding `[SEG]`, at the id `SelfieForSegmentation.from_pretrained` gives it on
        the same folder: `seg_token_id_in`), tile size, normalisation and image tokens per tile; tiles as SELFIE does
        (`SelfieImageProcessor`: one tile by default, no thumbnail, `tile_grid`). `kwargs` may set `system_message`,
        `prompt_style`, `image_seq_length`.
        """
        from transformers import AutoTokenizer, PretrainedConfig
        from transformers.image_processing_base import ImageProcessingMixin

        fetch = hub_kwargs(kwargs, pop=True)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **fetch)
        config, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **fetch)
        try:
            image_dict, _ = ImageProcessingMixin.get_image_processor_dict(pretrained_model_name_or_path, **fetch)
        except OSError:
            image_dict = {}
        processor_dict, _ = cls.get_processor_dict(pretrained_model_name_or_path, **fetch)
        tile = internvl_tile_size(config, image_dict)
        kwargs.setdefault(
            "image_seq_length",
            processor_dict.get("image_seq_length") or config.get("image_seq_length") or internvl_tokens_per_tile(config),
        )
        image_processor = SelfieImageProcessor(
            size={"height": tile, "width": tile},
            image_mean=image_dict.get("image_mean", IMAGENET_DEFAULT_MEAN),
            image_std=image_dict.get("image_std", IMAGENET_DEFAULT_STD),
        )
        return cls(image_processor=image_processor, tokenizer=tokenizer, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `ProcessorMixin.save_pretrained`, which writes `auto_map` (remote code) into the saved configs and also
        sets it on the processor and its image processor: saving leaves them unchanged here, so that a processor
        equals the one loaded back from its folder."""
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            for component in (self, self.image_processor):
                component.__dict__.pop("auto_map", None)

    def check_model(self, config) -> None:
        """Raise a `ValueError` if this processor and a model (its `SelfieConfig`) disagree on the `[SEG]` or image
        token ids or on the image tokens per tile: inputs built by one would be misread by the other."""
        checks = {
            "[SEG] token id": (self.seg_token_id, config.seg_token_id),
            "image token id (<IMG_CONTEXT>)": (self.image_token_id, config.image_token_id),
            "image tokens per tile": (self.image_seq_length, config.tokens_per_tile_side**2),
        }
        wrong = [f"{name}: processor {ours}, model {theirs}" for name, (ours, theirs) in checks.items() if ours != theirs]
        if wrong:
            raise ValueError(
                "The processor does not match the model (" + "; ".join(wrong) + "). Load both from the same folder, "
                "or build the processor for this model's tokenizer."
            )

    def render_conversation(
        self, turns: Sequence[dict], with_image: bool = True, add_generation_prompt: bool = False
    ) -> str:
        """InternVL chat text of `turns` (`{"role": "user" | "assistant", "content": str}`), the image placeholder
        at the start of the first user turn, every assistant turn closed (teacher forcing) and, with
        `add_generation_prompt`, an open assistant turn at the end (for `generate`)."""
        parts = [f"<|im_start|>system\n{self.system_message}<|im_end|>\n"] if self.system_message else []
        image_prefix = PROMPT_STYLES[self.prompt_style]["image_prefix"].format(image=self.image_token)
        image_pending = with_image
        for turn in turns:
            role, content = turn["role"], turn["content"]
            if role not in ("user", "assistant"):
                raise ValueError(f"Conversation turn role must be 'user' or 'assistant', got {role!r}.")
            if role == "user" and image_pending:
                content, image_pending = image_prefix + content, False
            parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)

    def normalize_query(self, query: str, kind: str = "phrase") -> str:
        """`query` as this processor's `query_normalization` writes it (see [`normalize_query`])."""
        return normalize_query(query, kind, self.query_normalization)

    def unknown_words(self, query: str, kind: str = "phrase") -> list[str]:
        """The words of the (normalised) query that the tokenizer reads as its unknown token, in order, once each:
        words a word-level vocabulary lacks. Empty for tokenizers without an unknown token (byte-level BPE has no
        unknown words) and for slow tokenizers, which give no character offsets."""
        text = self.normalize_query(query, kind)
        unknown_id = self.tokenizer.unk_token_id
        if unknown_id is None or not self.tokenizer.is_fast:
            return []
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = [span for token, span in zip(encoding["input_ids"], encoding["offset_mapping"]) if token == unknown_id]
        return list(dict.fromkeys(text[start:end] for start, end in spans))

    def warn_unknown_words(self, queries: Sequence[str], kind: str = "phrase") -> list[str]:
        """Issue one [`UnknownWordsWarning`] naming the words of `queries` the vocabulary lacks (none: no warning);
        returns the words. The message names each word once (a long one shortened) and at most
        `UNKNOWN_WORDS_NAMED` of them, never the whole query."""
        words = list(dict.fromkeys(word for query in queries for word in self.unknown_words(query, kind)))
        if words:
            named = ", ".join(repr(shorten(word, 30)) for word in words[:UNKNOWN_WORDS_NAMED])
            more = f" and {len(words) - UNKNOWN_WORDS_NAMED} more" if len(words) > UNKNOWN_WORDS_NAMED else ""
            warnings.warn(
                f"the model does not know the word(s) {named}{more}: it reads them as <unk>, so those masks are "
                "guesses and their presence scores are lowered",
                UnknownWordsWarning,
                stacklevel=3,
            )
        return words

    def segmentation_conversation(self, query: str, kind: str = "phrase") -> list[dict]:
        """The paper's validation conversation for one query (Sec. 9.2), answered "[SEG].". The query is first
        normalised as `query_normalization` says, then stripped (as the authors' loaders do; lowercasing RefCOCO
        sentences is their loader's, `ReferringDataset(lowercase=True)`)."""
        query = self.normalize_query(query, kind).strip()
        return [
            {"role": "user", "content": segmentation_question(query, kind)},
            {"role": "assistant", "content": segmentation_answer()},
        ]

    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | PreTokenizedInput | list[TextInput] | list[PreTokenizedInput] | None = None,
        queries: str | Sequence[str] | None = None,
        query_kind: str | None = None,
        conversations: Sequence[Sequence[dict]] | None = None,
        masks=None,
        return_labels: bool | None = None,
        **kwargs: Unpack[ProcessingKwargs],
    ) -> BatchFeature:
        r"""
        Args:
            images: one image per sample (PIL, numpy or torch); with `conversations=`, `None` marks a text-only
                sample.
            text: raw text with `<IMG_CONTEXT>` placeholders (InternVL behaviour).
            queries: a phrase / instruction per sample; builds the validation prompt answered "[SEG].".
            query_kind: `"phrase"` (the default: "What is {x} in this image? ...") or `"instruction"`
                ("{x} Please output ...").
            conversations: per sample, a list of `{"role", "content"}` turns (assistant turns may hold `[SEG]`).
            masks: per sample, the ground-truth masks of its `[SEG]` tokens in order: `[n_seg, H, W]` arrays or
                tensors, or a list of 2D masks. Returned as `mask_labels` (float 0/1).
            return_labels: also return `labels` (assistant tokens supervised, the rest -100).

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask`, `pixel_values` `[T, 3, S, S]`, `tile_grid`
            `[num_images, 2]` and, when asked, `labels` and `mask_labels`.
        """
        given = [name for name, value in (("text", text), ("queries", queries), ("conversations", conversations))
                 if value is not None]
        if len(given) != 1:
            raise ValueError(f"Pass exactly one of text=, queries=, conversations= (got {given or 'none'}).")
        if queries is not None:
            queries = [queries] if isinstance(queries, str) else list(queries)
            for i, query in enumerate(queries):
                if not isinstance(query, str) or not query.strip():
                    raise ValueError(f"queries[{i}] is empty: give a phrase or an instruction to segment.")
            conversations = [self.segmentation_conversation(query, query_kind or "phrase") for query in queries]
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if images is not None:  # PIL images as shown: EXIF orientation applied, 16-bit scaled to 8-bit RGB
            images = [rgb_image(image) if isinstance(image, Image.Image) else image for image in images]
        if conversations is not None:
            has_image = [image is not None for image in images] if images is not None else [False] * len(conversations)
            if images is not None and len(images) != len(conversations):
                raise ValueError(
                    f"{len(images)} images for {len(conversations)} conversations: give one image (or None) per sample."
                )
            text = [self.render_conversation(turns, with_image=seen) for turns, seen in zip(conversations, has_image)]
            if images is not None:
                images = [image for image in images if image is not None] or None
        return_tensors = kwargs.pop("return_tensors", "pt")
        if all("padding" not in given for given in (kwargs, kwargs.get("text_kwargs", {}), self.tokenizer.init_kwargs)):
            kwargs["padding"] = True  # a batch of prompts of different lengths is the common case
        inputs = super().__call__(images=images, text=text, return_tensors=return_tensors, **kwargs)
        if return_labels:
            inputs["labels"] = self.assistant_labels(inputs["input_ids"], inputs["attention_mask"])
        if masks is not None:
            inputs["mask_labels"] = self.mask_labels(masks, inputs["input_ids"])
        return inputs

    def assistant_labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`[B, L]` labels: each assistant turn's tokens up to and including `<|im_end|>`, the rest -100."""
        labels = torch.full_like(input_ids, -100)
        header = self._assistant_header
        for b, ids in enumerate(input_ids.tolist()):
            supervised = False
            for i, token in enumerate(ids):
                if not attention_mask[b, i]:
                    continue
                if supervised:
                    labels[b, i] = token
                    supervised = token != self._turn_end_id
                elif ids[i - len(header) + 1 : i + 1] == header:
                    supervised = True
        return labels

    def mask_labels(self, masks, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Ground-truth masks as a list of float `[n_seg, H, W]` tensors, checked against the `[SEG]` count."""
        if len(masks) != len(input_ids):
            raise ValueError(f"masks has {len(masks)} entries for {len(input_ids)} samples.")
        labels = []
        for b, sample_masks in enumerate(masks):
            if isinstance(sample_masks, (list, tuple)):
                sample_masks = np.stack([np.asarray(m) for m in sample_masks]) if len(sample_masks) else np.zeros((0, 1, 1))
            target = torch.as_tensor(np.asarray(sample_masks)).float()
            if target.dim() == 2:
                target = target[None]
            n_seg = int((input_ids[b] == self.seg_token_id).sum())
            if target.dim() != 3 or target.shape[0] != n_seg:
                raise ValueError(
                    f"masks[{b}] has shape {tuple(target.shape)} but sample {b} has {n_seg} [SEG] token(s): give "
                    "one [H, W] mask per [SEG]."
                )
            labels.append((target > 0.5).float())
        return labels

    def post_process_masks(
        self,
        pred_masks: Sequence[torch.Tensor],
        original_sizes: Sequence[tuple[int, int]],
        mask_threshold: float = 0.0,
        binarize: bool = True,
        presence_logits: Sequence[torch.Tensor] | None = None,
        presence_threshold: float = 0.5,
        return_scores: bool = False,
    ):
        """Masks at each image's own size (and their presence scores); see [`post_process_masks`]."""
        return post_process_masks(
            pred_masks, original_sizes, mask_threshold, binarize, presence_logits, presence_threshold, return_scores
        )


def post_process_masks(
    pred_masks: Sequence[torch.Tensor],
    original_sizes: Sequence[tuple[int, int]],
    mask_threshold: float = 0.0,
    binarize: bool = True,
    presence_logits: Sequence[torch.Tensor] | None = None,
    presence_threshold: float = 0.5,
    return_scores: bool = False,
) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Bring mask logits back to each image's own size (bilinear, `align_corners=False`), threshold them and score
    them, so that a mask is empty exactly when its presence score is below `presence_threshold`.

    A mask's presence score is `sigmoid(min(presence_logit, its largest logit at the image's size))`: the model's
    presence logit is taken on the low-resolution logits, and resizing to a small image (a 2x2 one) can lose
    their peak. A mask whose score is below `presence_threshold` comes back empty; a mask left with no pixel above
    `mask_threshold` scores just below `presence_threshold` at most (at the default thresholds its score is at
    most 0.5 anyway).

    Args:
        pred_masks: `SelfieSegmentationOutput.pred_masks`, one `[n_seg, H, W]` logit tensor per sample.
        original_sizes: (height, width) of each sample's image.
        mask_threshold: logit threshold (0.0 = probability 0.5).
        binarize: return bool masks; `False` returns the resized logits (unthresholded; the scores are the same).
        presence_logits: `SelfieSegmentationOutput.presence_logits` (one `[n_seg]` tensor per sample); without
            it the scores come from the masks' logits alone.
        presence_threshold: masks scoring lower come back empty.
        return_scores: also return the presence scores.
    Returns:
        One `[n_seg, height, width]` tensor per sample (bool, or float logits without `binarize`); with
        `return_scores`, `(masks, scores)` with one float64 `[n_seg]` score tensor per sample, on the CPU.
    """
    if len(pred_masks) != len(original_sizes):
        raise ValueError(f"{len(pred_masks)} mask sets but {len(original_sizes)} original sizes.")
    below = float(np.nextafter(presence_threshold, 0.0))  # the largest score below the threshold
    results, all_scores = [], []
    for b, (masks, (height, width)) in enumerate(zip(pred_masks, original_sizes)):
        size = (int(height), int(width))
        if masks.shape[0] == 0 or 0 in size:
            resized = masks.new_zeros(masks.shape[0], *size, dtype=torch.float32)
        else:
            resized = F.interpolate(masks[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
        logits = resized.flatten(1).amax(1) if 0 not in size else resized.new_full(resized.shape[:1], -torch.inf)
        if presence_logits is not None:
            logits = torch.minimum(logits, presence_logits[b].to(logits.device, torch.float32))
        scores = logits.detach().cpu().double().sigmoid()  # float64 (on the CPU: MPS has none) tells 0.5 from below
        present = (scores >= presence_threshold).to(resized.device)
        binary = (resized > mask_threshold) & present[:, None, None]
        scores = torch.where(binary.flatten(1).any(1).cpu(), scores, scores.clamp(max=below))
        results.append(binary if binarize else resized)
        all_scores.append(scores)
    return (results, all_scores) if return_scores else results


def seg_token_id_in(tokenizer) -> int:
    """The id of `[SEG]` in `tokenizer`, or the id it gets when added (the tokenizer's length)."""
    if SEG_TOKEN in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    return len(tokenizer)


def image_token(tokenizer, role: str) -> tuple[str, int]:
    """(token, id) of one of InternVL's image tokens: the tokenizer's named role, else InternVL's literal token."""
    token = getattr(tokenizer, role, None) or IMAGE_TOKEN_ROLES[role]
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"The tokenizer has no {token} token ({role}): it is not an InternVL tokenizer.")
    return token, token_id


def internvl_tile_size(config: dict, image_processor_dict: dict) -> int:
    """Side of one tile in an InternVL3 folder: the image processor's size (`-hf`: `{"height", "width"}`, original:
    CLIP `crop_size` / `size`), else config.json's `force_image_size` or vision `image_size`."""
    for key in ("size", "crop_size"):
        size = image_processor_dict.get(key)
        if isinstance(size, dict) and size.get("height"):
            return int(size["height"])
        if isinstance(size, int):
            return size
    size = config.get("force_image_size") or config.get("vision_config", {}).get("image_size", 448)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def internvl_tokens_per_tile(config: dict) -> int:
    """LLM image tokens per tile of an InternVL3 config.json: (tile / patch)^2 * downsample_ratio^2."""
    vision = config.get("vision_config", {})
    patch = vision.get("patch_size", 14)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    tile = internvl_tile_size(config, {})
    return round((tile // patch) ** 2 * config.get("downsample_ratio", 0.5) ** 2)


def image_size_of(image) -> tuple[int, int]:
    """(height, width) of a PIL image (as shown: turned by its EXIF orientation), HWC numpy array or CHW tensor."""
    if isinstance(image, Image.Image):
        return shown_size(image)
    if isinstance(image, torch.Tensor):
        return tuple(image.shape[-2:])
    return tuple(np.asarray(image).shape[:2])


SelfieImageProcessor.register_for_auto_class("AutoImageProcessor")  # remote code: auto_map + this file
SelfieProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "SELF1E_SYSTEM_MESSAGE",
    "SelfieImageProcessor",
    "SelfieProcessor",
    "UnknownWordsWarning",
    "image_size_of",
    "normalize_query",
    "post_process_masks",
    "segmentation_question",
    "select_tile_grid",
]
