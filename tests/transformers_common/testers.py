"""Model testers for transformers' common suites, modelled on transformers' own InternVL test
(`tests/models/internvl/test_modeling_internvl.py`): a tiny Qwen2 + InternViT config, one 64 px image per sample
(64 image tokens after the 2x2 pixel shuffle) and a few random text tokens."""

import torch
from transformers import InternVLConfig
from transformers.testing_utils import torch_device
from transformers_release_tests.test_modeling_common import floats_tensor, ids_tensor

from modeling_selfie import SelfieConfig

TEXT_CONFIG = {
    "model_type": "qwen2",
    "vocab_size": 99,
    "hidden_size": 128,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
    "rope_theta": 10000,
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
}
VISION_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "image_size": 64,
    "patch_size": 4,
    "num_channels": 3,
    "hidden_act": "quick_gelu",
    "use_absolute_position_embeddings": True,
}


class InternVLTester:
    """Config and inputs of InternVL's tester: `batch_size` samples, each `image_seq_length` image tokens then
    `text_length` random text tokens."""

    config_class = InternVLConfig

    def __init__(self, parent, batch_size=3, text_length=7, image_seq_length=64, image_token_id=1):
        self.parent = parent
        self.is_training = True
        self.batch_size = batch_size
        self.image_seq_length = image_seq_length
        self.image_token_id = image_token_id
        self.seq_length = text_length + image_seq_length
        self.image_size = VISION_CONFIG["image_size"]
        self.vocab_size = TEXT_CONFIG["vocab_size"]
        self.hidden_size = TEXT_CONFIG["hidden_size"]
        self.num_hidden_layers = TEXT_CONFIG["num_hidden_layers"]
        self.num_attention_heads = TEXT_CONFIG["num_attention_heads"]
        self.pad_token_id = TEXT_CONFIG["pad_token_id"]

    def config_kwargs(self) -> dict:
        return {
            "text_config": dict(TEXT_CONFIG),
            "vision_config": dict(VISION_CONFIG),
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 0,
            "image_token_id": self.image_token_id,
            "image_seq_length": self.image_seq_length,
            "vision_feature_layer": -1,
        }

    def get_config(self):
        return self.config_class(**self.config_kwargs())

    def special_token_ids(self) -> list[int]:
        """Ids the random text must not hold."""
        return [self.image_token_id]

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        pixel_values = floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        for token_id in self.special_token_ids():
            input_ids[input_ids == token_id] = self.pad_token_id + 3
        input_ids[:, : self.image_seq_length] = self.image_token_id
        attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=torch_device)
        return config, {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


class SelfieTester(InternVLTester):
    """InternVL's tester for SELFIE: with `with_seg`, each sample ends with one `[SEG]` (so every forward also
    predicts masks through the dual-pathway attention); without, the inputs are InternVL's."""

    config_class = SelfieConfig

    def __init__(self, parent, with_seg: bool, seg_token_id=2, **kwargs):
        super().__init__(parent, **kwargs)
        self.with_seg = with_seg
        self.seg_token_id = seg_token_id

    def config_kwargs(self) -> dict:
        return {**super().config_kwargs(), "seg_token_id": self.seg_token_id, "seg_hidden_size": 16}

    def special_token_ids(self) -> list[int]:
        return [*super().special_token_ids(), self.seg_token_id]

    def prepare_config_and_inputs_for_common(self):
        config, inputs = super().prepare_config_and_inputs_for_common()
        if self.with_seg:
            inputs["input_ids"][:, -1] = self.seg_token_id
        return config, inputs
