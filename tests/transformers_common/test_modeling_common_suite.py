"""transformers' `ModelTesterMixin` and `ConfigTester` of the installed release on SELFIE, with inputs that hold a
`[SEG]` per sample and inputs that do not, and on InternVL with the same tester (the control).

`GenerationTesterMixin` is the stand-in of `fetch.py` (the release's generate tests are not in its source
distribution); `tests/test_generation_paths.py` checks SELFIE's generation."""

import unittest
from unittest import mock

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLModel
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    MODEL_MAPPING,
    MODEL_MAPPING_NAMES,
)
from transformers.testing_utils import torch_device
from transformers_release_tests.generation.test_utils import GenerationTesterMixin
from transformers_release_tests.test_configuration_common import ConfigTester
from transformers_release_tests.test_modeling_common import ModelTesterMixin

from modeling_selfie import SelfieConfig, SelfieForSegmentation, SelfieModel

from .testers import InternVLTester, SelfieTester

class TransformersConventionMapping:
    """While a SELFIE test class runs, SELFIE is entered in transformers' tables as an in-tree model would be: the
    mixins find a model's task (labels for `test_training`, the base model for `test_base_model_prefix_...`,
    `test_torch_save_load`) in the class-name tables, which list only in-tree models, and take `AutoModel`'s class
    for the base model. The package maps `AutoModel` to `SelfieForSegmentation`, the model that segments; these
    tests map it to the base `SelfieModel`, transformers' convention, for themselves only."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        patches = [
            mock.patch.dict(MODEL_MAPPING_NAMES, {"selfie": "SelfieModel"}),
            mock.patch.dict(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, {"selfie": "SelfieForSegmentation"}),
            mock.patch.dict(MODEL_MAPPING._extra_content, {SelfieConfig: SelfieModel}),
        ]
        for patch in patches:
            patch.start()
            cls.addClassCleanup(patch.stop)


class VisionTextModelTest(ModelTesterMixin, GenerationTesterMixin):
    """What transformers' InternVL test adds to the mixins: the config tester, and `inputs_embeds` tests that drop
    `pixel_values` (image features cannot be merged into given embeddings)."""

    config_class = None
    test_resize_embeddings = True

    def make_tester(self):
        raise NotImplementedError

    def setUp(self):
        self.model_tester = self.make_tester()
        self.config_tester = ConfigTester(self, config_class=self.config_class, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    def model_and_text_inputs(self, model_class):
        """An eval model, its inputs without `pixel_values` and `input_ids`, and the `input_ids`."""
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        model = model_class(config).to(torch_device).eval()
        inputs = self._prepare_for_class(inputs_dict, model_class)
        del inputs["pixel_values"]
        return model, inputs, inputs.pop("input_ids")

    def test_inputs_embeds(self):
        for model_class in self.all_model_classes:
            model, inputs, input_ids = self.model_and_text_inputs(model_class)
            with torch.no_grad():
                model(inputs_embeds=model.get_input_embeddings()(input_ids), **inputs)

    def test_inputs_embeds_matches_input_ids(self):
        for model_class in self.all_model_classes:
            model, inputs, input_ids = self.model_and_text_inputs(model_class)
            with torch.no_grad():
                out_ids = model(input_ids=input_ids, **inputs)[0]
                out_embeds = model(inputs_embeds=model.get_input_embeddings()(input_ids), **inputs)[0]
            torch.testing.assert_close(out_embeds, out_ids)


class SelfieWithSegModelTest(TransformersConventionMapping, VisionTextModelTest, unittest.TestCase):
    """Every sample holds a `[SEG]`: the forward also predicts masks."""

    all_model_classes = (SelfieForSegmentation, SelfieModel)
    all_generative_model_classes = (SelfieForSegmentation,)
    config_class = SelfieConfig
    # The mixin runs this only for models whose config file carries a copyright year >= 2023 (SELFIE's has none).
    test_can_init_all_missing_weights_before_2023 = True

    def make_tester(self):
        return SelfieTester(self, with_seg=True)

    @unittest.skip("SELFIE has no entry in transformers' conversion_mapping: it reads InternVL's key layouts through "
                   "from_pretrained(key_mapping=INTERNVL_KEY_MAPPING), which tests/test_loading_internvl.py checks")
    def test_reverse_loading_mapping(self):
        pass

    @unittest.skip("SELFIE has no entry in transformers' conversion_mapping (see test_reverse_loading_mapping)")
    def test_can_load_from_already_mapped_keys(self):
        pass

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        """With labels, also one ground-truth mask per `[SEG]` (`mask_labels`), so the mask loss trains the head."""
        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels)
        if return_labels and model_class is SelfieForSegmentation and self.model_tester.with_seg:
            generator = torch.Generator().manual_seed(0)
            inputs["mask_labels"] = [
                torch.randint(0, 2, (1, 16, 16), generator=generator).float() for _ in range(len(inputs["input_ids"]))
            ]
        return inputs


class SelfieWithoutSegModelTest(SelfieWithSegModelTest):
    """No `[SEG]`: SELFIE is InternVL."""

    test_all_params_have_gradient = False  # no [SEG], no mask: the segmentation head takes no part in the loss

    def make_tester(self):
        return SelfieTester(self, with_seg=False)


class InternVLControlModelTest(VisionTextModelTest, unittest.TestCase):
    """The control: transformers' own InternVL classes under the same files and tester."""

    all_model_classes = (InternVLForConditionalGeneration, InternVLModel)
    all_generative_model_classes = (InternVLForConditionalGeneration,)
    config_class = InternVLConfig

    def make_tester(self):
        return InternVLTester(self)
