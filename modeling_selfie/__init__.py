"""SELFIE (SELF1E) for Hugging Face transformers: an InternVL3 MLLM that segments with one `[SEG]` token.

Importing this package registers the `selfie` model type with `AutoConfig`, `AutoModel` (the base
`SelfieModel`, as transformers' convention is), `AutoModelForImageTextToText` (`SelfieForSegmentation`),
`AutoImageProcessor` and `AutoProcessor`, and the `referring-segmentation` pipeline task.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .compat import AutoImageProcessor

from .configuration_selfie import SelfieConfig
from .modeling_selfie import (
    SegmentationLayout,
    SelfieForSegmentation,
    SelfieModel,
    SelfieSegmentationHead,
    SelfieSegmentationOutput,
)
from .pipeline_selfie import ReferringSegmentationPipeline
from .processing_selfie import SelfieImageProcessor, SelfieProcessor

AutoConfig.register("selfie", SelfieConfig, exist_ok=True)
AutoModel.register(SelfieConfig, SelfieModel, exist_ok=True)
AutoModelForImageTextToText.register(SelfieConfig, SelfieForSegmentation, exist_ok=True)
AutoImageProcessor.register(SelfieConfig, image_processor_classes={"pil": SelfieImageProcessor}, exist_ok=True)
AutoProcessor.register(SelfieConfig, SelfieProcessor, exist_ok=True)

__all__ = [
    "ReferringSegmentationPipeline",
    "SegmentationLayout",
    "SelfieConfig",
    "SelfieForSegmentation",
    "SelfieImageProcessor",
    "SelfieModel",
    "SelfieProcessor",
    "SelfieSegmentationHead",
    "SelfieSegmentationOutput",
]
