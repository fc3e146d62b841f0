"""ReasonSeg reasoning segmentation.

Files: `root/reason_seg/ReasonSeg/<split>/<name>.jpg` (split `train`, `val` or `test`), each with `<name>.json`:

    {"text": [query, ...], "is_sentence": bool,
     "shapes": [{"label": "target" | "ignore", "points": [[x, y], ...], "shape_type": "polygon"}, ...]}

All queries of an image describe the same target. Sentence queries (`is_sentence`) use the "instruction"
templates, the others the "phrase" templates (paper Sec. 9.1).

Masks: the polygons are filled largest first, each over the ones beneath, so a small polygon inside a large one
wins: a shape whose label contains "ignore" paints ignore, a "flag" shape (a deprecated annotation) is skipped,
any other paints target. The target mask holds the target pixels; the ignore pixels are left out of it and
returned as `sample["ignore_masks"]` (`uint8` `[1, H, W]`, 1 = pixels to leave out of the loss and the metrics).

Training samples (`train=True`) are one per image, with a random query and random templates; evaluation samples
are one per (image, query), with the validation template, `query`, `query_kind` and `image_id` (the file stem), or
one per image with `first_query_only=True` (its first query: SELF1E's evaluation, `--protocol self1e`).

`opencv_polygons=True` draws the polygons as SELF1E's loader does (`--protocol self1e`): points truncated to int32,
OpenCV's outline and scanline fill (`modeling_selfie.data.rasterize`, in numpy), painted in the order of
`np.argsort(areas)[::-1]`; the default draws them with PIL on the float points (outline included), ties in area in
file order.
"""

import random
from pathlib import Path

import numpy as np

from ..processing_selfie import segmentation_answer, segmentation_question
from .common import SelfieDataset, load_image, polygon_mask, read_json, require_paths
from .rasterize import opencv_polygon_mask

IGNORE, TARGET = 2, 1


def reasonseg_label_map(shapes: list[dict], height: int, width: int, opencv_polygons: bool = False) -> np.ndarray:
    """Paint the polygons of a ReasonSeg JSON, largest first: `uint8` `[height, width]` with 0 background,
    `TARGET` and `IGNORE`; `opencv_polygons` draws and orders them as SELF1E's loader (module docstring)."""
    draw = opencv_polygon_mask if opencv_polygons else polygon_mask
    values, regions = [], []
    for shape in shapes:
        label = shape["label"].lower()
        if label == "flag":
            continue
        regions.append(draw(shape["points"], height, width).astype(bool))
        values.append(IGNORE if "ignore" in label else TARGET)
    areas = [int(region.sum()) for region in regions]
    if opencv_polygons:
        order = np.argsort(areas)[::-1]
    else:
        order = sorted(range(len(areas)), key=areas.__getitem__, reverse=True)
    label_map = np.zeros((height, width), dtype=np.uint8)
    for index in order:
        label_map[regions[index]] = values[index]
    return label_map


class ReasonSegDataset(SelfieDataset):
    """ReasonSeg, one split (see the module docstring).

    Args:
        root: the folder holding `reason_seg/ReasonSeg/`.
        split: `train`, `val` or `test`.
        train: training samples (one per image) or evaluation samples (one per query).
        first_query_only: evaluation samples for the first query of each image only (as SELF1E scores ReasonSeg).
        opencv_polygons: draw the polygons as SELF1E's loader (module docstring).
        seed, max_samples: see [`SelfieDataset`].

    Samples: `masks` and `ignore_masks` `uint8` `[1, H, W]`.
    """

    source = "reasonseg"
    task = "reasoning"
    check_script = "processing/check_reasonseg.py"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        train: bool = False,
        first_query_only: bool = False,
        opencv_polygons: bool = False,
        seed: int = 0,
        max_samples: int | None = None,
    ):
        (folder,) = self.expected_paths(root, split)
        require_paths([folder], self.check_script)
        images = sorted(folder.glob("*.jpg"))
        if not images:
            raise ValueError(f"{folder} holds no .jpg image.")
        if train and first_query_only:
            raise ValueError("first_query_only selects evaluation samples; it cannot be combined with train=True.")
        if train:
            items = [(image, None) for image in images]
        else:
            items = []
            for image in images:
                queries = len(read_json(image.with_suffix(".json"), self.check_script)["text"])
                items += [(image, query) for query in range(min(queries, 1) if first_query_only else queries)]
        self.opencv_polygons = opencv_polygons
        super().__init__(items, train=train, seed=seed, max_samples=max_samples)

    @classmethod
    def expected_paths(cls, root: str | Path, split: str = "train") -> list[Path]:
        """The split folder."""
        return [Path(root) / "reason_seg" / "ReasonSeg" / split]

    def image_ids(self) -> list[str]:
        """The `image_id` of each sample (the image file's stem), without loading any (evaluation groups an image's
        samples by it)."""
        return [image.stem for image, _ in self.items]

    def data_files(self) -> list[Path]:
        images = sorted({image for image, _ in self.items})
        return [path for image in images for path in (image, image.with_suffix(".json"))]

    def build_sample(self, item, rng: random.Random | None) -> dict:
        image_path, query = item
        annotation = read_json(image_path.with_suffix(".json"), self.check_script)
        texts = annotation["text"]
        if not texts:
            raise ValueError(f"{image_path.with_suffix('.json')} has no query in 'text'.")
        text = (texts[query] if rng is None else rng.choice(texts)).strip()
        kind = "instruction" if annotation["is_sentence"] else "phrase"
        image = load_image(image_path, self.check_script)
        label_map = reasonseg_label_map(annotation["shapes"], image.height, image.width, self.opencv_polygons)
        sample = {
            "image": image,
            "conversation": [
                {"role": "user", "content": segmentation_question(text, kind, rng)},
                {"role": "assistant", "content": segmentation_answer(rng)},
            ],
            "masks": (label_map == TARGET)[None].astype(np.uint8),
            "ignore_masks": (label_map == IGNORE)[None].astype(np.uint8),
            "task": self.task,
            "source": self.source,
        }
        if rng is None:
            sample.update(query=text, query_kind=kind, image_id=image_path.stem)
        return sample
