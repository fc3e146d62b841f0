"""Helpers shared by tests: paths of shipped fixtures and small synthetic inputs."""

import importlib.util
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "reference"
WORDS = ("red", "blue", "green", "circle", "square", "shape", "left", "the", "hello", "describe")
ROOT = Path(__file__).resolve().parents[1]


def load_script(path: Path):
    """A script that is not part of the package (`examples/`, `benchmarks/`), imported as a module of its own."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image of uniform random pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def coco_rle_text(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a 0/1 `[H, W]` mask written by pycocotools, `counts` as text (as a JSON or Arrow column
    holds it)."""
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def png_claiming(width: int, height: int) -> bytes:
    """A PNG file, written by hand, whose header claims `width` x `height` RGB pixels (its data holds a few)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(bytes(16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
