"""Unpack transformers' own common test files of the INSTALLED release, for `tests/transformers_common`.

The source distribution of the installed transformers version (pip's ordinary client, `--no-binary :all:`) holds
`tests/test_modeling_common.py`, `tests/test_configuration_common.py` and `tests/test_processing_common.py`.
They are unpacked as the package `transformers_release_tests` under `release/<version>/` (ignored by git), so each
stack runs its own release's mixins. The sdist lacks four modules those files import; `standins/` provides them:

* `exporters/test_export.py`: `ExportTesterMixin` (a base of `ModelTesterMixin`) is empty, so the export tests of
  the release (torch.export / ExecuTorch) are not run;
* `generation/test_utils.py`: `GenerationTesterMixin` is a named stand-in without tests, so the release's generate
  tests are not run here; `tests/test_generation_paths.py` checks greedy, sampling, beam search, static cache and
  compiled generation instead;
* `utils/test_configuration_utils.py`: `config_common_kwargs` is empty (`ConfigTester` reads it only for configs
  without sub-configs, and SELFIE's and InternVL's configs have sub-configs);
* `utils/fetch_hub_objects_for_ci.py`: `url_to_local_path` maps the image URLs the processor mixin names to PNG
  files written here with PIL (no Hub access in CI); other URLs (video, audio) are returned unchanged.

Usage: `python tests/transformers_common/fetch.py` (the test modules call `release_tests_path()` themselves).
"""

import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
PACKAGE = "transformers_release_tests"
RELEASE_FILES = ("test_modeling_common.py", "test_configuration_common.py", "test_processing_common.py")
STANDINS = {
    "exporters/test_export.py": "test_export.py",
    "generation/test_utils.py": "generation_test_utils.py",
    "utils/test_configuration_utils.py": "test_configuration_utils.py",
}


def release_tests_path(version: str | None = None) -> Path:
    """The folder to put on `sys.path` to import `transformers_release_tests` of `version` (default: the installed
    transformers); downloads and unpacks the release's sdist the first time."""
    version = version or importlib.metadata.version("transformers")
    root = HERE / "release" / version
    if (root / PACKAGE / "__init__.py").exists():
        return root
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"transformers=={version}", "--dest", tmp],
            check=True,
        )
        (archive,) = Path(tmp).glob("transformers-*.tar.gz")
        staging = Path(tmp) / "staging"
        package = staging / PACKAGE
        with tarfile.open(archive) as tar:
            for name in RELEASE_FILES:
                member = tar.getmember(f"transformers-{version}/tests/{name}")
                package.mkdir(parents=True, exist_ok=True)
                (package / name).write_bytes(tar.extractfile(member).read())
        for target, source in STANDINS.items():
            (package / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(HERE / "standins" / source, package / target)
        for folder in [package, *(p for p in package.iterdir() if p.is_dir())]:
            (folder / "__init__.py").touch()
        # test_processing_common.py imports `fetch_hub_objects_for_ci` from `<its folder>/../utils`.
        (staging / "utils").mkdir()
        shutil.copy(HERE / "standins" / "fetch_hub_objects_for_ci.py", staging / "utils")
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.move(staging, root)  # whole or not at all
    return root


if __name__ == "__main__":
    print(release_tests_path())
