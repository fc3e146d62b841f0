"""Stand-in for transformers' `tests/exporters/test_export.py` (not in the release's source distribution).

`ExportTesterMixin` is a base of `ModelTesterMixin`; here it adds no tests (torch.export is not checked)."""


class ExportTesterMixin:
    pass
