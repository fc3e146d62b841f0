"""Atomic outputs: a failed write never replaces a good file or folder, and results get the usual permissions."""

import os

import pytest

from modeling_selfie.io_utils import atomic_output_dir, atomic_output_file


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_failed_writes_keep_the_old_output(tmp_path):
    target, folder = tmp_path / "out.json", tmp_path / "model"
    target.write_text("good")
    folder.mkdir()
    (folder / "weights").write_text("good")
    with pytest.raises(RuntimeError), atomic_output_file(target) as staging:
        staging.write_text("half")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError), atomic_output_dir(folder, overwrite=True) as staging:
        (staging / "weights").write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "good" and (folder / "weights").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out.json"]  # no staging left behind
    with pytest.raises(FileExistsError, match="overwrite"), atomic_output_dir(folder):
        pass


def test_outputs_get_the_permissions_of_a_plain_write(tmp_path, umask_022):
    with atomic_output_file(tmp_path / "mask.png") as staging:
        staging.write_bytes(b"png")
    with atomic_output_dir(tmp_path / "model") as staging:
        (staging / "config.json").write_text("{}")
    assert (tmp_path / "mask.png").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755
