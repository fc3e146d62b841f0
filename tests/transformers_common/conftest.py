"""transformers' common test suites (`ModelTesterMixin`, `ConfigTester`, `ProcessorTesterMixin`) of the installed
release, unpacked by `fetch.py`; the unpacked files and the stand-ins are imported by the test modules, not
collected themselves."""

import sys

from .fetch import release_tests_path

collect_ignore_glob = ["release/*", "standins/*", "fetch.py"]

sys.path.insert(0, str(release_tests_path()))


def pytest_configure(config):
    """The marks transformers' test files use (registered in transformers' own pytest configuration)."""
    for mark in ("flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "torch_compile_test", "torch_export_test",
                 "generate", "is_training_test", "is_tensor_parallel_test", "is_pipeline_test", "is_staging_test",
                 "accelerate_tests", "not_device_test", "training_ci"):
        config.addinivalue_line("markers", f"{mark}: a mark of transformers' own test files")
