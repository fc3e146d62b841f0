"""Pieces shared by the dataset loaders: the base class, path checks, and image / mask readers.

Every loader is a [`SelfieDataset`]: it indexes its files once at construction into `items`, and builds a sample
dict (see `modeling_selfie.data.sample`) per item on access. Training loaders (`train=True`) draw sentences,
classes and prompt templates from a `random.Random` seeded by (source, seed, epoch, variant, index), so an item is
the same in every worker and every run, changes with [`SelfieDataset.set_epoch`], and differs between the copies
of a dataset that a mixture repeats (`variant`). Evaluation loaders (`train=False`) are fully deterministic and use
the validation prompt template.
"""

import json
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as coco_mask_utils

from ..io_utils import read_image
from .sample import check_sample


def missing_hint(path: Path, check_script: str) -> str:
    """The message of a `FileNotFoundError` for `path`: it names the check script that lists everything missing.
    `check_script` is a script path, whose command takes `--root <data root>`, or a whole command (with options)."""
    command = check_script if " " in check_script else f"{check_script} --root <data root>"
    return f"{path} does not exist; run `python {command}` to list every missing path."


def require_paths(paths: Iterable[Path], check_script: str) -> None:
    """Raise `FileNotFoundError` naming the first of `paths` that does not exist and the check script to run."""
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(missing_hint(path, check_script))


def read_json(path: Path, check_script: str):
    """Parse a JSON file (UTF-8, falling back to cp1252 as some ReasonSeg files are encoded)."""
    require_paths([path], check_script)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def load_image(path: Path, check_script: str) -> Image.Image:
    """Open an image file as RGB, as it is shown (`io_utils.read_image`: EXIF orientation, 16-bit scaled); a missing
    file raises `FileNotFoundError` naming it and the check script."""
    require_paths([path], check_script)
    return read_image(path)


def empty_masks(height: int, width: int) -> np.ndarray:
    """`uint8` masks of shape `[0, height, width]`, for samples without `[SEG]`."""
    return np.zeros((0, height, width), dtype=np.uint8)


def polygon_mask(points: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rasterise one polygon given as `[[x, y], ...]` pixel coordinates: `uint8` `[height, width]`, 1 inside
    the polygon and on its outline."""
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in points], fill=1, outline=1)
    return np.asarray(canvas, dtype=np.uint8)


OVERLAPPING_POLYGONS = ("keep", "drop")


def coco_segmentation_mask(
    segmentation, height: int, width: int, overlapping_polygons: str = "keep"
) -> np.ndarray:
    """Decode a COCO `segmentation` field to a `uint8` `[height, width]` 0/1 mask.

    Accepts a list of polygons `[[x0, y0, x1, y1, ...], ...]` (polygons of fewer than 3 points have no area and are
    skipped), an uncompressed RLE `{"size": [h, w], "counts": [int, ...]}`, or a compressed RLE whose `counts` is a
    `str` or `bytes`. An empty list gives an empty mask.

    Args:
        overlapping_polygons: pixels covered by two or more polygons of the list: `"keep"` (the polygons' union, as
            COCO's `annToMask`) or `"drop"` (left out of the mask: SELF1E's evaluation sums the polygon masks and
            counts only the pixels where the sum is 1, see `modeling_selfie.evaluation`). RLEs are unaffected.
    """
    if overlapping_polygons not in OVERLAPPING_POLYGONS:
        raise ValueError(f"overlapping_polygons must be one of {OVERLAPPING_POLYGONS}, got {overlapping_polygons!r}.")
    if isinstance(segmentation, list):
        polygons = [polygon for polygon in segmentation if len(polygon) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rles = coco_mask_utils.frPyObjects(polygons, height, width)
        if overlapping_polygons == "drop":
            covered = coco_mask_utils.decode(rles).sum(axis=2, dtype=np.int64)  # [H, W, n] -> polygons per pixel
            return (covered == 1).astype(np.uint8)
        rle = coco_mask_utils.merge(rles)
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            raise ValueError(f"RLE of size {segmentation['size']} for an image of size {[height, width]}.")
        if isinstance(segmentation["counts"], list):
            rle = coco_mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
    else:
        raise ValueError(f"Unsupported COCO segmentation of type {type(segmentation).__name__}: {segmentation!r:.80}")
    return np.ascontiguousarray(coco_mask_utils.decode(rle), dtype=np.uint8)


class CocoAnnotations:
    """The parts of a COCO-format JSON file (`images`, `annotations`, `categories`) the loaders use, indexed by id.

    Attributes:
        images: image id -> image record (`file_name`, `height`, `width`, ...).
        annotations: annotation id -> annotation record (`image_id`, `category_id`, `segmentation`, ...).
        categories: category id -> category record (`name`, ...).
        annotations_by_image: image id -> its annotation records, in file order.
    """

    def __init__(self, path: Path, check_script: str):
        data = read_json(path, check_script)
        for key in ("images", "annotations"):
            if key not in data:
                raise ValueError(f"{path} is not a COCO annotation file: it lacks the key {key!r}.")
        self.path = path
        self.images = {image["id"]: image for image in data["images"]}
        self.annotations = {annotation["id"]: annotation for annotation in data["annotations"]}
        self.categories = {category["id"]: category for category in data.get("categories", [])}
        self.annotations_by_image = defaultdict(list)
        for annotation in data["annotations"]:
            self.annotations_by_image[annotation["image_id"]].append(annotation)

    def mask(self, annotation_ids: Iterable[int], image_id: int, overlapping_polygons: str = "keep") -> np.ndarray:
        """Union of the masks of `annotation_ids` on image `image_id`: `uint8` `[height, width]` (all zero for no
        annotation). `overlapping_polygons` applies within each annotation, see [`coco_segmentation_mask`]."""
        image = self.images[image_id]
        mask = np.zeros((image["height"], image["width"]), dtype=np.uint8)
        for annotation_id in annotation_ids:
            if annotation_id not in self.annotations:
                raise KeyError(f"{self.path} has no annotation with id {annotation_id}.")
            mask |= coco_segmentation_mask(
                self.annotations[annotation_id]["segmentation"], image["height"], image["width"], overlapping_polygons
            )
        return mask


class SelfieDataset(torch.utils.data.Dataset):
    """Base of the loaders: a list of `items` indexed at construction and a per-item sample builder.

    Subclasses set `source` (the dataset name put in every sample), `task` and `check_script`, implement
    `expected_paths` (a classmethod taking the constructor's location arguments: the files and folders read at
    construction), `data_files` (the per-item files read on access) and `build_sample(item, rng)`. `build_sample`
    may return `None` for an item with nothing to ask about (e.g. an image without any labelled class); the next
    item is used instead.

    Args:
        items: what `build_sample` receives, one per sample.
        train: draw random sentences / classes / templates (`True`) or build the deterministic evaluation samples.
        seed: seeds the per-item random generators and the `max_samples` subset.
        max_samples: keep a random subset of at most this many items (`None`: all).
    """

    source: str
    task: str
    check_script: str

    def __init__(self, items: list, *, train: bool, seed: int = 0, max_samples: int | None = None):
        if max_samples is not None and len(items) > max_samples:
            kept = sorted(random.Random(f"{self.source}/subset/{seed}").sample(range(len(items)), max_samples))
            items = [items[i] for i in kept]
        self.items = items
        self.train = train
        self.seed = seed
        self.epoch = 0

    @classmethod
    def expected_paths(cls, **location) -> list[Path]:
        """The files and folders the loader reads at construction, given the constructor's location arguments."""
        raise NotImplementedError

    def data_files(self) -> list[Path]:
        """The per-item files (images, label maps, ...) the samples read, without duplicates."""
        raise NotImplementedError

    def build_sample(self, item, rng: random.Random | None) -> dict | None:
        """The sample dict of one item; `rng` is `None` in evaluation mode."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Training samples are redrawn for each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.get(index)

    def get(self, index: int, variant: int = 0) -> dict:
        """Sample `index`; `variant` tells apart the copies of this dataset that a mixture repeats."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.source} has {len(self)} samples; index {index} is out of range.")
        rng = random.Random(f"{self.source}/{self.seed}/{self.epoch}/{variant}/{index}") if self.train else None
        for offset in range(len(self)):
            position = (index + offset) % len(self)
            sample = self.build_sample(self.items[position], rng)
            if sample is not None:
                return check_sample(sample, where=f"{self.source}[{position}]")
        raise ValueError(f"No item of {self.source} has anything to segment.")
