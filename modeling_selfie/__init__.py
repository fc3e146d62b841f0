"""SELFIE (SELF1E) for Hugging Face transformers: an InternVL3 MLLM that segments with one `[SEG]` token.

Importing this package registers the `selfie` model type with `AutoConfig`, `AutoModel` and
`AutoModelForImageTextToText` (both `SelfieForSegmentation`, the model that segments; `SelfieModel` is its base
model), `AutoImageProcessor` and `AutoProcessor`, and the `referring-segmentation` pipeline task
([`register_auto_classes`]). The package's own command lines (`python -m modeling_selfie.<module>`, the `selfie-*`
scripts, `python -m selfie_segment`,
`processing/check_*.py`) import it without loading torch, so that `--help` and argument errors answer at once; there
the classes load, and register, when first used (`modeling_selfie.loading`, which every command loads its model
with, registers them first).
"""

import importlib
import sys
from pathlib import Path

# public name -> the module that defines it
_EXPORTS = {
    "SelfieConfig": ".configuration_selfie",
    "SegmentationLayout": ".modeling_selfie",
    "SelfieForSegmentation": ".modeling_selfie",
    "SelfieModel": ".modeling_selfie",
    "SelfieSegmentationHead": ".modeling_selfie",
    "SelfieSegmentationOutput": ".modeling_selfie",
    "ReferringSegmentationPipeline": ".pipeline_selfie",
    "SelfieImageProcessor": ".processing_selfie",
    "SelfieProcessor": ".processing_selfie",
}
OWN_SCRIPTS = ("selfie-train", "selfie-evaluate", "selfie-convert", "selfie-segment", "selfie_segment.py")


def register_auto_classes() -> None:
    """Register the `selfie` model type with transformers' Auto classes and the pipeline task (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    from .compat import AutoImageProcessor
    from .configuration_selfie import SelfieConfig
    from .modeling_selfie import SelfieForSegmentation
    from .pipeline_selfie import ReferringSegmentationPipeline  # noqa: F401  (registers the pipeline task)
    from .processing_selfie import SelfieImageProcessor, SelfieProcessor

    AutoConfig.register("selfie", SelfieConfig, exist_ok=True)
    AutoModel.register(SelfieConfig, SelfieForSegmentation, exist_ok=True)
    AutoModelForImageTextToText.register(SelfieConfig, SelfieForSegmentation, exist_ok=True)
    AutoImageProcessor.register(SelfieConfig, image_processor_classes={"pil": SelfieImageProcessor}, exist_ok=True)
    AutoProcessor.register(SelfieConfig, SelfieProcessor, exist_ok=True)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register_auto_classes()
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def _running_own_command() -> bool:
    """Whether this process runs one of the package's command lines: `python -m modeling_selfie.<module>` (while
    Python imports the package to find the module, `sys.argv[0]` is "-m"), a script of `OWN_SCRIPTS` (`selfie-*`, and
    `selfie_segment.py` run as `python -m selfie_segment`), or a `processing/check_*.py` script."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    is_check = program.parent.name == "processing" and program.name.startswith("check_")
    return bool(sys.argv) and (sys.argv[0] == "-m" or program.name in OWN_SCRIPTS or is_check)


if not _running_own_command():
    register_auto_classes()

__all__ = ["register_auto_classes", *_EXPORTS]
