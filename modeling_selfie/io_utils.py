"""Reading images as people see them, and writing outputs so that a half-written file or folder never replaces a
good one."""

import contextlib
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Pillow modes of 16-bit grayscale files (PNG, TIFF, PGM); "I" (32-bit) is how some formats open them too.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
EXIF_ORIENTATION = 0x0112
JPEG_REDUCTIONS = (2, 4, 8)  # the scales libjpeg decodes at directly (`Image.draft`)


class ImageTooLargeError(ValueError):
    """An image file holds more pixels than `read_image` reads (see there)."""


def rgb_image(image: Image.Image) -> Image.Image:
    """`image` as it is shown, in 8-bit RGB: its EXIF orientation applied, 16-bit grayscale scaled to 0-255,
    transparent parts (an alpha channel, a palette's or a colour's transparency) laid over white.

    Pillow's own `convert("RGB")` clips 16-bit values at 255 (a 16-bit PNG turns white), ignores the EXIF
    orientation tag (a phone photo comes out lying on its side) and drops transparency (what was transparent shows
    its hidden colour, often black). Returns `image` itself when it already is RGB without an orientation tag.
    """
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        image = Image.fromarray(np.round(values / 257).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def shown_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) of `rgb_image(image)`, without converting it: swapped for the EXIF orientations that turn
    the picture by 90 degrees."""
    turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    return (image.width, image.height) if turned else (image.height, image.width)


def read_image(path: str | os.PathLike) -> Image.Image:
    """The image file at `path` as `rgb_image` gives it (the first frame of an animation), opened by
    [`open_image`] (see there for the size limit). Raises what `open_image` raises, or Pillow's `OSError` for a
    file it cannot decode."""
    with open_image(path) as image:
        rgb = rgb_image(image)
        return rgb.copy() if rgb is image else rgb  # a copy outlives the closed file


def open_image(path: str | os.PathLike) -> Image.Image:
    """The image file at `path`, opened (its header read, nothing decoded yet) and checked against the size limit.

    Size limit: Pillow's `Image.MAX_IMAGE_PIXELS` (89,478,485 pixels unless changed, e.g. 9459x9459), where
    Pillow itself starts warning of a decompression bomb. A larger JPEG (up to twice the limit, beyond which Pillow
    opens no file) is set to decode at 1/2, 1/4 or 1/8 of its width and height, the largest that fits (libjpeg
    scales while decoding, so the full size is never held); any other larger image is refused with an
    `ImageTooLargeError` naming its size and the limit.

    Raises `FileNotFoundError`, `ImageTooLargeError`, or Pillow's `UnidentifiedImageError` / `OSError` for a file
    it cannot open.
    """
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked here, against `limit`
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as error:  # over twice the limit: Pillow refuses to open it
            pixels = re.search(r"\((\d+) pixels\)", str(error))
            raise too_large(path, f"{int(pixels[1]):,} pixels" if pixels else "over twice as many pixels") from error
    if limit and image.width * image.height > limit and image.format == "JPEG":
        image.draft(image.mode, reduced_size(image.size, limit))
    if limit and image.width * image.height > limit:
        size = f"{image.width}x{image.height} = {image.width * image.height:,} pixels"
        image.close()
        raise too_large(path, size)
    return image


def too_large(path: str | os.PathLike, size: str) -> ImageTooLargeError:
    return ImageTooLargeError(f"{path} is too large: {size}, more than the limit of {Image.MAX_IMAGE_PIXELS:,} "
                              "(Pillow's Image.MAX_IMAGE_PIXELS); downscale it first")


def reduced_size(size: tuple[int, int], limit: int) -> tuple[int, int]:
    """The (width, height) of `size` reduced by the smallest of `JPEG_REDUCTIONS` that brings it to `limit`
    pixels or fewer (the largest reduction when none does)."""
    width, height = size
    factor = next((f for f in JPEG_REDUCTIONS if -(-width // f) * -(-height // f) <= limit), JPEG_REDUCTIONS[-1])
    return -(-width // factor), -(-height // factor)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _give_default_permissions(path: Path) -> None:
    """`tempfile` makes staging files 0600 and folders 0700; give the result the modes a plain write would have."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename, on error it is removed.

    Raises `FileExistsError` if `path` exists and `overwrite` is false.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _give_default_permissions(staging)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_output_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        yield Path(staging)
        _give_default_permissions(Path(staging))
        os.replace(staging, path)
    except BaseException:  # the write, or the rename (a folder in the way): no staging file is left behind
        Path(staging).unlink(missing_ok=True)
        raise
