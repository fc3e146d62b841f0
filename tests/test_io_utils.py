"""Atomic outputs: a failed write never replaces a good file or folder, and results get the usual permissions.
Images read as shown: 16-bit grayscale scaled, EXIF orientation applied, transparency over white, by every reader;
images over the size limit refused or (JPEG) read reduced."""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from modeling_selfie.data.custom import CustomReferringDataset
from modeling_selfie.io_utils import (
    ImageTooLargeError,
    atomic_output_dir,
    atomic_output_file,
    read_image,
    rgb_image,
    shown_size,
)
from modeling_selfie.presets import tiny_model_and_processor

from .helpers import WORDS


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


# Images as people see them: files written by PIL/numpy directly, read by every reader of the project through
# `io_utils.read_image` / `rgb_image` (CLI and page in test_cli.py / examples/test_app.py).


def write_sixteen_bit_png(path, seed: int = 0):
    """A 16-bit grayscale PNG (numpy uint16 through PIL) whose 8-bit reading is known: `(png path, gray8 [H, W])`."""
    gray8 = np.random.default_rng(seed).integers(0, 256, (24, 40), dtype=np.uint16)
    Image.fromarray(gray8 * 257).save(path)  # 0..255 -> 0..65535 exactly
    assert Image.open(path).mode.startswith("I")  # Pillow opens it as 16-bit, not 8-bit
    return path, gray8.astype(np.uint8)


def write_rotated_jpeg(path, orientation: int = 6):
    """A 40x24 (W x H) JPEG of four flat quadrants whose EXIF tag says "turn 90 degrees clockwise to show":
    `(path, the quadrant colours as shown, clockwise from top left)`."""
    colours = np.array([[220, 30, 30], [30, 200, 30], [30, 30, 220], [230, 230, 30]], dtype=np.uint8)
    pixels = np.zeros((24, 40, 3), dtype=np.uint8)
    pixels[:12, :20], pixels[:12, 20:], pixels[12:, 20:], pixels[12:, :20] = colours
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, format="JPEG", quality=95, exif=exif)
    # turned clockwise, the bottom-left quadrant comes to the top left, and so on
    return path, colours[[3, 0, 1, 2]]


def quadrant_colours(image) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.int16)
    h, w = pixels.shape[0] // 4, pixels.shape[1] // 4
    return np.stack([pixels[h, w], pixels[h, 3 * w], pixels[3 * h, 3 * w], pixels[3 * h, w]])


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    path, gray8 = write_sixteen_bit_png(tmp_path / "gray16.png")
    expected = np.repeat(gray8[..., None], 3, axis=-1)
    assert not np.array_equal(np.asarray(Image.open(path).convert("RGB")), expected)  # Pillow alone clips at 255
    image = read_image(path)
    assert image.mode == "RGB" and image.size == (40, 24) and np.array_equal(np.asarray(image), expected)
    assert np.array_equal(np.asarray(rgb_image(Image.open(path))), np.asarray(image))


def test_exif_orientation_is_applied(tmp_path):
    path, shown = write_rotated_jpeg(tmp_path / "photo.jpg")
    assert Image.open(path).size == (40, 24)  # stored lying on its side
    image = read_image(path)
    assert image.size == (24, 40) and shown_size(Image.open(path)) == (40, 24)
    assert np.abs(quadrant_colours(image) - shown).max() < 12  # JPEG is lossy
    plain = Image.new("RGB", (5, 3))
    assert rgb_image(plain) is plain and shown_size(plain) == (3, 5)  # nothing to do: the image itself


def test_processor_and_segment_read_pil_images_as_shown(tmp_path):
    model, processor = tiny_model_and_processor(WORDS)
    path16, gray8 = write_sixteen_bit_png(tmp_path / "gray16.png")
    eight_bit = Image.fromarray(gray8).convert("RGB")
    assert torch.equal(processor(images=Image.open(path16), queries="red")["pixel_values"],
                       processor(images=eight_bit, queries="red")["pixel_values"])

    path, _ = write_rotated_jpeg(tmp_path / "photo.jpg")
    stored = np.asarray(Image.open(path).convert("RGB"))
    turned = Image.fromarray(np.ascontiguousarray(np.rot90(stored, k=-1)))  # clockwise, as the tag says
    assert model.segment(processor, Image.open(path), "red")[0].shape == (40, 24)
    logits = [model.segment(processor, image, "red", return_logits=True)[0] for image in (Image.open(path), turned)]
    assert torch.equal(*logits)


def test_datasets_read_images_as_shown(tmp_path):
    path16, gray8 = write_sixteen_bit_png(tmp_path / "gray16.png")
    path, shown = write_rotated_jpeg(tmp_path / "photo.jpg")
    records = [{"image": "gray16.png", "expressions": ["red"], "mask": None},
               {"image": "photo.jpg", "expressions": ["blue"], "mask": [[0, 0, 10, 0, 10, 30, 0, 30]]}]
    (tmp_path / "refs.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    dataset = CustomReferringDataset(tmp_path / "refs.jsonl", train=False)
    gray, photo = dataset[0], dataset[1]
    assert np.array_equal(np.asarray(gray["image"])[..., 0], gray8)
    assert photo["image"].size == (24, 40) and photo["masks"].shape == (1, 40, 24)
    assert np.abs(quadrant_colours(photo["image"]) - shown).max() < 12


def test_the_pipeline_reads_files_and_pil_images_as_shown(tmp_path):
    model, processor = tiny_model_and_processor(WORDS)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    segmenter = pipeline("referring-segmentation", model=str(tmp_path / "model"))
    path16, gray8 = write_sixteen_bit_png(tmp_path / "gray16.png")
    path, _ = write_rotated_jpeg(tmp_path / "photo.jpg")
    stored = np.asarray(Image.open(path).convert("RGB"))
    shown = {path16: Image.fromarray(gray8).convert("RGB"),
             path: Image.fromarray(np.ascontiguousarray(np.rot90(stored, k=-1)))}
    for file, image in shown.items():
        expected = model.segment(processor, image, "red")[0]
        for given in (str(file), Image.open(file)):
            (result,) = segmenter(given, text=["red"])
            assert result["mask"].size == image.size
            assert (torch.from_numpy(np.array(result["mask"])) > 0).equal(expected), (file, type(given))


def test_images_over_the_size_limit_are_refused_or_read_reduced(tmp_path, monkeypatch):
    """Pillow's `Image.MAX_IMAGE_PIXELS` is the limit (lowered here so that small files written by PIL exceed it):
    a larger JPEG decodes reduced by libjpeg, any other larger image is refused with its size and the limit, and
    Pillow prints no decompression-bomb warning."""
    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", quality=95)
    Image.fromarray(pixels).save(tmp_path / "scan.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 70_000)  # 120,000 pixels: over it, under twice it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reduced = read_image(tmp_path / "photo.jpg")
        with pytest.raises(ImageTooLargeError, match=r"scan.png is too large: 400x300 = 120,000 pixels, more than the "
                                                     r"limit of 70,000 \(Pillow's Image.MAX_IMAGE_PIXELS\)"):
            read_image(tmp_path / "scan.png")
    assert reduced.size == (200, 150)  # halved: the largest reduction that fits
    halved = np.asarray(Image.fromarray(pixels).resize((200, 150), Image.Resampling.BOX), dtype=np.int16)
    assert np.abs(np.asarray(reduced, dtype=np.int16) - halved).mean() < 12  # the same picture, smaller
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # over twice the limit: Pillow opens nothing
    for name in ("photo.jpg", "scan.png"):
        with pytest.raises(ImageTooLargeError, match=f"{name} is too large: 120,000 pixels, more than the limit of "
                                                     "20,000"):
            read_image(tmp_path / name)


def test_transparent_images_are_laid_over_white():
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 0], rgba[0, 0, 3], rgba[0, 1, 3] = 200, 255, 0  # red; opaque, transparent, transparent
    shown = np.asarray(rgb_image(Image.fromarray(rgba, "RGBA")))
    assert shown[0, 0].tolist() == [200, 0, 0] and shown[0, 1].tolist() == [255, 255, 255]
    gray = Image.fromarray(np.dstack([np.full((2, 2), 40, np.uint8), np.array([[255, 0], [0, 255]], np.uint8)]), "LA")
    assert np.asarray(rgb_image(gray))[..., 0].tolist() == [[40, 255], [255, 40]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 90, 90, 90])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow warns when such a palette image is converted to RGB directly
        assert np.asarray(rgb_image(palette)).tolist() == [[[10, 20, 30], [255, 255, 255]]]
