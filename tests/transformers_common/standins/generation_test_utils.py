"""Stand-in for transformers' `tests/generation/test_utils.py` (not in the release's source distribution).

The release's `GenerationTesterMixin` is not available from the package index; this one defines no tests. SELFIE's
generation paths are checked by `tests/test_generation_paths.py`."""


class GenerationTesterMixin:
    all_generative_model_classes = ()
