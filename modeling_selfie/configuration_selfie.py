"""Configuration of SELFIE (SELF1E): an InternVL3 MLLM that segments with a single `[SEG]` token."""

from huggingface_hub.dataclasses import strict
from transformers import InternVLConfig

RESIDUAL_MODES = ("none", "rfr", "rfa")
SEG_ATTENTION_MODES = ("causal", "image_bidirectional", "image_to_seg", "image_to_text", "bidirectional")
MASK_LOSS_NORMALIZATIONS = ("batch", "mask")


# The Auto classes a saved folder's remote code maps to a model class (`auto_map`): the model that segments.
REMOTE_CODE_MODELS = {
    "AutoModel": "modeling_selfie.SelfieForSegmentation",
    "AutoModelForImageTextToText": "modeling_selfie.SelfieForSegmentation",
}


@strict
class SelfieConfig(InternVLConfig):
    r"""
    Configuration of [`SelfieForSegmentation`]. Everything of [`InternVLConfig`] plus the settings of the
    segmentation path. The defaults are the released SELF1E model.

    seg_token_id (`int`, *optional*):
        Id of the `[SEG]` token. `None` on a plain InternVL checkpoint: `SelfieForSegmentation.from_pretrained`
        then appends `[SEG]` to the vocabulary (id = old vocabulary size).
    seg_hidden_size (`int`, *optional*, defaults to 64):
        Width C of the mask embedding space: the dot product of pixel features and the `[SEG]` vector is taken in
        C dimensions and divided by sqrt(C). The two unshuffle MLPs output `C * (1 / downsample_ratio) ** 2`.
    use_hq_features (`bool`, *optional*, defaults to `True`):
        Use the self-replicated, full-resolution ViT features F_V1^HQ (paper Sec. 3.3, Tab. 5 "HR").
    residual_mode (`str`, *optional*, defaults to `"rfa"`):
        How the LLM's residual on image tokens reaches the pixel features (Tab. 5 / 6):
        `"none"` (no residual), `"rfr"` (Residual Features Refilling, Eq. 2-3: chunk-averaged features at the
        ViT grid) or `"rfa"` (Residual Features Amplifier, Eq. 4-5: MLP-with-pixel-unshuffle, masks at twice the
        ViT grid). `"rfr"` needs `use_hq_features`.
    seg_attention (`str`, *optional*, defaults to `"image_to_seg"`):
        Attention in samples that contain `[SEG]` (Tab. 7): `"causal"`, `"image_bidirectional"` (image tokens see
        each other), `"image_to_seg"` (and every `[SEG]`, the dual pathway), `"image_to_text"` (image tokens see
        the whole sample) or `"bidirectional"` (every token sees the whole sample). Samples without `[SEG]` are
        always causal.
    text_loss_weight, bce_loss_weight, dice_loss_weight (`float`, *optional*, defaults to 1.0, 2.0, 0.5):
        Weights of the next-token cross entropy and of the mask BCE and DICE terms in `loss`.
    aux_mask_loss_weight (`float`, *optional*, defaults to 1.0):
        Weight of the auxiliary low-resolution mask (LLM features only) inside the BCE and DICE terms.
    mask_loss_normalization (`str`, *optional*, defaults to `"batch"`):
        `"batch"` divides the summed mask losses by the number of sequences in the batch (the released
        training), `"mask"` by the number of masks.
    presence_head (`bool`, *optional*, defaults to `False`):
        Add a presence head: a linear map of the hidden state that predicts each `[SEG]` to a presence logit (is
        the referred object in the image at all?). Without it a mask's presence logit is its most confident pixel.
        See `SelfieForSegmentation.presence_logits`.
    iou_head (`bool`, *optional*, defaults to `False`):
        Add a mask-quality head (as SAM's IoU prediction): a logit, calibrated from the mask's own stability,
        confidence and connectedness, whose sigmoid is the mask's predicted IoU with the referred object. It says
        how far to trust a mask that is there; whether a mask is empty stays the presence score's decision. See
        `SelfieForSegmentation.iou_logits`.
    unk_token_id (`int`, *optional*):
        Id of the tokenizer's unknown-word token (`<unk>`) for a word-level vocabulary: every `<unk>` before a
        `[SEG]` lowers that mask's presence logit by `UNKNOWN_TOKEN_PRESENCE_PENALTY`, so a query the model cannot
        read scores low. `None` (subword tokenizers, which have no unknown words) leaves the logits alone.
    """

    model_type = "selfie"

    seg_token_id: int | None = None
    seg_hidden_size: int = 64
    use_hq_features: bool = True
    residual_mode: str = "rfa"
    seg_attention: str = "image_to_seg"
    text_loss_weight: float = 1.0
    bce_loss_weight: float = 2.0
    dice_loss_weight: float = 0.5
    aux_mask_loss_weight: float = 1.0
    mask_loss_normalization: str = "batch"
    presence_head: bool = False
    iou_head: bool = False
    unk_token_id: int | None = None
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "SelfieConfig":
        """Also reads a plain InternVL config (model_type `internvl`): the start of a SELFIE fine-tuning. Its fields
        keep InternVL's meaning, so a `tie_word_embeddings` it leaves out takes InternVL's default, not SELFIE's."""
        return super().from_dict(cls._from_internvl(config_dict), **kwargs)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        """The folder's config dict, an InternVL one already read as SELFIE's (`from_pretrained` then has no
        model-type mismatch to warn about: starting SELFIE from InternVL is what it is for)."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return cls._from_internvl(config_dict), kwargs

    @classmethod
    def _from_internvl(cls, config_dict: dict) -> dict:
        if config_dict.get("model_type") != "internvl":
            return config_dict
        tied = InternVLConfig.__dataclass_fields__["tie_word_embeddings"].default
        return {"tie_word_embeddings": tied, **config_dict, "model_type": cls.model_type}

    def validate_selfie(self):
        """Part of `@strict` validation: every SELFIE switch names a known setting."""
        choices = {
            "residual_mode": RESIDUAL_MODES,
            "seg_attention": SEG_ATTENTION_MODES,
            "mask_loss_normalization": MASK_LOSS_NORMALIZATIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"SelfieConfig.{name}={getattr(self, name)!r} is not one of {allowed}.")
        if self.residual_mode == "rfr" and not self.use_hq_features:
            raise ValueError(
                "SelfieConfig.residual_mode='rfr' refills the high-resolution features F_V1^HQ and needs "
                "use_hq_features=True."
            )
        if self.vision_feature_select_strategy != "default":
            raise ValueError(
                "SelfieConfig.vision_feature_select_strategy must be 'default' (the CLS token is dropped), got "
                f"{self.vision_feature_select_strategy!r}."
            )
        if self.seg_hidden_size <= 0:
            raise ValueError(f"SelfieConfig.seg_hidden_size must be positive, got {self.seg_hidden_size}.")

    @property
    def unshuffle_factor(self) -> int:
        """Side of the pixel (un)shuffle block: 2 for InternVL's `downsample_ratio=0.5`."""
        return round(1 / self.downsample_ratio)

    @property
    def tokens_per_tile_side(self) -> int:
        """g_lo: side of the LLM token grid of one tile (16 for a 448 px tile with 14 px patches)."""
        image_size = self.vision_config.image_size[0]
        patch_size = self.vision_config.patch_size[0]
        return image_size // patch_size // self.unshuffle_factor


    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """As `PreTrainedConfig.save_pretrained`; where the saved `auto_map` names a model class (remote code, written
        by a model's `save_pretrained`), `AutoModel` and `AutoModelForImageTextToText` both name
        `SelfieForSegmentation`, the model that segments, as `modeling_selfie.register_auto_classes` maps them."""
        auto_map = getattr(self, "auto_map", None)
        if auto_map and set(auto_map) - {"AutoConfig"}:
            self.auto_map = {**auto_map, **REMOTE_CODE_MODELS}
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)


SelfieConfig.register_for_auto_class()  # save_pretrained writes auto_map + this file (remote code)

__all__ = ["SelfieConfig"]
