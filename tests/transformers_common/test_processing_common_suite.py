"""transformers' `ProcessorTesterMixin` of the installed release on `SelfieProcessor`: a Qwen2-style byte-level BPE
tokenizer with InternVL's image tokens (written by `tests/internvl_artifacts.py` with `tokenizers`) and SELFIE's
image processor with 56 px tiles."""

import tempfile
import unittest
from pathlib import Path

from transformers import AutoTokenizer
from transformers_release_tests.test_processing_common import ProcessorTesterMixin

from modeling_selfie import SelfieImageProcessor, SelfieProcessor

from ..internvl_artifacts import write_qwen2_internvl_tokenizer


class SelfieProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    maxDiff = None
    processor_class = SelfieProcessor

    @classmethod
    def _setup_tokenizer(cls):
        with tempfile.TemporaryDirectory() as folder:
            write_qwen2_internvl_tokenizer(Path(folder))
            return AutoTokenizer.from_pretrained(folder)

    @classmethod
    def _setup_image_processor(cls):
        return SelfieImageProcessor(size={"height": 56, "width": 56})

    @staticmethod
    def prepare_processor_dict():
        return {"image_seq_length": 4}
