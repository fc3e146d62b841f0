"""Semantic (and part) segmentation sets: ADE20K, COCO-Stuff, PASCAL-Part, PACO-LVIS.

A sample is one image and up to `max_classes` of the classes present in it, as one multi-turn conversation: one
user turn per class (a phrase template around the class name) answered with one `[SEG]`, whose mask is every pixel
of that class. Training samples draw the classes and templates at random; evaluation samples take the first
`max_classes` present classes (by label value / category id) with the validation template. An image in which no
class is present is skipped (the next image is used).

Files (`root` is the data root):

    ADE20K       root/ADEChallengeData2016/images/{training,validation}/<name>.jpg
                 root/ADEChallengeData2016/annotations/{training,validation}/<name>.png   0 = other (ignored),
                                                                                          k = ADE20K_CLASSES[k-1]
    COCO-Stuff   root/cocostuff/{train,val}2017/<name>.png   stuffthingmaps: value = COCO category id - 1,
                 root/coco/{train,val}2017/<name>.jpg        255 = unlabeled
    PASCAL-Part  root/vlpart/pascal_part/train.json          COCO format, categories "object:part"
                 root/vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/
    PACO-LVIS    root/vlpart/paco/annotations/paco_lvis_v1_train.json   COCO format, "object" or "object:part"
                 root/coco/ + the images' file_name (train2017/<name>.jpg)

COCO-Stuff classes whose name has a hyphen ("wall-brick", "building-other", ...) are not asked about, as in
LISA / SELF1E training. Part categories ("dog:head", "trash_can:lid") read "dog head"; training samples say
"head of the dog" half of the time, as SELF1E does (the templates supply the leading "the"); "_(...)"
qualifiers are dropped and "_" reads as a space.
"""

import random
from pathlib import Path

import numpy as np
from PIL import Image

from ..processing_selfie import segmentation_answer, segmentation_question
from .common import CocoAnnotations, SelfieDataset, load_image, require_paths

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

# The 171 COCO-Stuff classes (80 things, 91 stuff) in category-id order; `COCO_STUFF_IDS` holds their ids.
COCO_STUFF_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush", "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard",
    "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone",
    "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel",
    "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud",
    "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper",
    "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other",
    "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone",
    "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip
_COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)  # ids 1..182 that no COCO-Stuff class uses
COCO_STUFF_IDS = tuple(i for i in range(1, 183) if i not in _COCO_UNUSED_IDS)
ADE20K_SPLITS = {"train": "training", "val": "validation"}
COCO_STUFF_SPLITS = ("train", "val")


def split_category_name(name: str) -> tuple[str, str | None]:
    """("dog", "head") for "dog:head", ("trash can", None) for "trash_can"; "_(...)" qualifiers are dropped."""
    parts = [part.split("_(")[0].replace("_", " ").strip() for part in name.strip().split(":")]
    if len(parts) > 2:
        raise ValueError(f"Category name {name!r} has more than one ':'.")
    return parts[0], parts[1] if len(parts) == 2 else None


def part_prompt_name(object_name: str, part_name: str | None, rng: random.Random | None) -> str:
    """"dog head"; with `rng`, half of the time "head of the dog"."""
    if part_name is None:
        return object_name
    if rng is not None and rng.random() < 0.5:
        return f"{part_name} of the {object_name}"
    return f"{object_name} {part_name}"


def choose_classes(present: list, max_classes: int, rng: random.Random | None) -> list:
    """Up to `max_classes` of `present`: a random draw with `rng`, the first ones without."""
    count = min(max_classes, len(present))
    return rng.sample(present, count) if rng is not None else present[:count]


def semantic_sample(image: Image.Image, names: list[str], masks: list[np.ndarray], rng, source: str) -> dict:
    """One user turn per class name, each answered with one `[SEG]`; `masks` `[H, W]` in the same order."""
    conversation = []
    for name in names:
        conversation.append({"role": "user", "content": segmentation_question(name, "phrase", rng)})
        conversation.append({"role": "assistant", "content": segmentation_answer(rng)})
    return {
        "image": image,
        "conversation": conversation,
        "masks": np.stack(masks).astype(np.uint8),
        "task": "semantic",
        "source": source,
    }


class LabelMapDataset(SelfieDataset):
    """Base of the sets annotated with per-pixel label maps: `items` are (image file, label map file) pairs and
    `class_names` maps a label value to its class name (values not in it are not asked about)."""

    task = "semantic"
    class_names: dict[int, str]

    def __init__(
        self, pairs: list[tuple[Path, Path]], *, train: bool, max_classes: int, seed: int, max_samples: int | None
    ):
        self.max_classes = max_classes
        super().__init__(pairs, train=train, seed=seed, max_samples=max_samples)

    def data_files(self) -> list[Path]:
        return [path for pair in self.items for path in pair]

    def read_label_map(self, label_path: Path) -> np.ndarray:
        """The label values of a single-channel label map file, `[H, W]`."""
        require_paths([label_path], self.check_script)
        with Image.open(label_path) as label_image:
            labels = np.asarray(label_image)
        if labels.ndim != 2:
            raise ValueError(f"{label_path} is not a single-channel label map (shape {labels.shape}).")
        return labels

    def build_sample(self, item, rng: random.Random | None) -> dict | None:
        image_path, label_path = item
        labels = self.read_label_map(label_path)
        present = [value for value in np.unique(labels).tolist() if value in self.class_names]
        if not present:
            return None
        image = load_image(image_path, self.check_script)
        if labels.shape != (image.height, image.width):
            size = (image.height, image.width)
            raise ValueError(f"{label_path} has size {labels.shape} but {image_path} has {size}.")
        values = choose_classes(present, self.max_classes, rng)
        masks = [labels == value for value in values]
        return semantic_sample(image, [self.class_names[value] for value in values], masks, rng, self.source)


class ADE20KDataset(LabelMapDataset):
    """ADE20K (SceneParsing, 150 classes), one split.

    Args:
        root: the folder holding `ADEChallengeData2016/`.
        split: `train` / `training` or `val` / `validation`.
        train, max_classes, seed, max_samples: see the module docstring and [`SelfieDataset`].
    """

    source = "ade20k"
    check_script = "processing/check_ade20k.py"
    class_names = {value + 1: name for value, name in enumerate(ADE20K_CLASSES)}

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        train: bool = False,
        max_classes: int = 3,
        seed: int = 0,
        max_samples: int | None = None,
    ):
        image_dir, label_dir = self.expected_paths(root, split)
        require_paths([image_dir, label_dir], self.check_script)
        pairs = [(image, label_dir / f"{image.stem}.png") for image in sorted(image_dir.glob("*.jpg"))]
        super().__init__(pairs, train=train, max_classes=max_classes, seed=seed, max_samples=max_samples)

    @classmethod
    def expected_paths(cls, root: str | Path, split: str = "train") -> list[Path]:
        """The image folder and the annotation folder of the split."""
        folder = ADE20K_SPLITS.get(split, split)
        if folder not in ADE20K_SPLITS.values():
            raise ValueError(f"Unknown ADE20K split {split!r}; choose one of {tuple(ADE20K_SPLITS)}.")
        base = Path(root) / "ADEChallengeData2016"
        return [base / "images" / folder, base / "annotations" / folder]


class CocoStuffDataset(LabelMapDataset):
    """COCO-Stuff 164k (`stuffthingmaps_trainval2017` label maps over COCO 2017 images), one split.

    Args:
        root: the folder holding `cocostuff/`.
        split: `train` or `val`.
        image_dir: the COCO 2017 images of the split; `None` gives `root/coco/<split>2017`.
        train, max_classes, seed, max_samples: see the module docstring and [`SelfieDataset`].
    """

    source = "cocostuff"
    check_script = "processing/check_cocostuff.py"
    class_names = {
        category_id - 1: name for category_id, name in zip(COCO_STUFF_IDS, COCO_STUFF_CLASSES) if "-" not in name
    }

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        image_dir: str | Path | None = None,
        *,
        train: bool = False,
        max_classes: int = 3,
        seed: int = 0,
        max_samples: int | None = None,
    ):
        label_dir, image_dir = self.expected_paths(root, split, image_dir)
        require_paths([label_dir, image_dir], self.check_script)
        pairs = [(image_dir / f"{label.stem}.jpg", label) for label in sorted(label_dir.glob("*.png"))]
        super().__init__(pairs, train=train, max_classes=max_classes, seed=seed, max_samples=max_samples)

    @classmethod
    def expected_paths(cls, root: str | Path, split: str = "train", image_dir: str | Path | None = None) -> list[Path]:
        """The label-map folder and the image folder of the split."""
        if split not in COCO_STUFF_SPLITS:
            raise ValueError(f"Unknown COCO-Stuff split {split!r}; choose one of {COCO_STUFF_SPLITS}.")
        root = Path(root)
        return [root / "cocostuff" / f"{split}2017", Path(image_dir) if image_dir else root / "coco" / f"{split}2017"]


class CocoPartsDataset(SelfieDataset):
    """Base of the COCO-format part sets: a class is a category, its mask the union of the category's annotations
    in the image. `items` are the ids of the images with at least one annotation. Subclasses define
    `expected_paths(root, split, image_dir) -> [annotation_file, image_dir]`."""

    task = "semantic"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        image_dir: str | Path | None = None,
        *,
        train: bool = False,
        max_classes: int = 3,
        seed: int = 0,
        max_samples: int | None = None,
    ):
        annotation_file, image_dir = self.expected_paths(root, split, image_dir)
        require_paths([annotation_file, image_dir], self.check_script)
        self.coco = CocoAnnotations(annotation_file, self.check_script)
        self.image_dir = image_dir
        self.max_classes = max_classes
        self.category_names = {
            category_id: split_category_name(category["name"]) for category_id, category in self.coco.categories.items()
        }
        items = [image_id for image_id in sorted(self.coco.images) if self._annotations(image_id)]
        super().__init__(items, train=train, seed=seed, max_samples=max_samples)

    def _annotations(self, image_id: int) -> list[dict]:
        """The image's annotations with a known category and a non-empty segmentation."""
        return [
            annotation
            for annotation in self.coco.annotations_by_image.get(image_id, [])
            if annotation["category_id"] in self.category_names and annotation["segmentation"]
        ]

    def data_files(self) -> list[Path]:
        return [self.image_dir / self.coco.images[image_id]["file_name"] for image_id in self.items]

    def build_sample(self, image_id: int, rng: random.Random | None) -> dict:
        annotations = self._annotations(image_id)
        categories = choose_classes(sorted({a["category_id"] for a in annotations}), self.max_classes, rng)
        image = load_image(self.image_dir / self.coco.images[image_id]["file_name"], self.check_script)
        names, masks = [], []
        for category_id in categories:
            names.append(part_prompt_name(*self.category_names[category_id], rng))
            ids = [a["id"] for a in annotations if a["category_id"] == category_id]
            masks.append(self.coco.mask(ids, image_id))
        return semantic_sample(image, names, masks, rng, self.source)


class PascalPartDataset(CocoPartsDataset):
    """PASCAL-Part as released by VLPart (COCO format, "object:part" categories).

    Args:
        root: the folder holding `vlpart/`.
        split: the annotation file `vlpart/pascal_part/<split>.json` (`train`).
        image_dir: `None` gives `root/vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages`.
        train, max_classes, seed, max_samples: see the module docstring and [`SelfieDataset`].
    """

    source = "pascal_part"
    check_script = "processing/check_pascal_part.py"

    @classmethod
    def expected_paths(cls, root: str | Path, split: str = "train", image_dir: str | Path | None = None) -> list[Path]:
        """The annotation file and the image folder."""
        base = Path(root) / "vlpart" / "pascal_part"
        return [base / f"{split}.json", Path(image_dir) if image_dir else base / "VOCdevkit" / "VOC2010" / "JPEGImages"]


class PacoLvisDataset(CocoPartsDataset):
    """PACO-LVIS (COCO format; "object" and "object:part" categories) over COCO 2017 images.

    Args:
        root: the folder holding `vlpart/`.
        split: the annotation file `vlpart/paco/annotations/paco_lvis_v1_<split>.json` (`train`, `val`, `test`).
        image_dir: the folder the images' `file_name` (e.g. `train2017/000000000009.jpg`) is relative to; `None`
            gives `root/coco`.
        train, max_classes, seed, max_samples: see the module docstring and [`SelfieDataset`].
    """

    source = "paco_lvis"
    check_script = "processing/check_paco_lvis.py"

    @classmethod
    def expected_paths(cls, root: str | Path, split: str = "train", image_dir: str | Path | None = None) -> list[Path]:
        """The annotation file and the image folder."""
        root = Path(root)
        annotation_file = root / "vlpart" / "paco" / "annotations" / f"paco_lvis_v1_{split}.json"
        return [annotation_file, Path(image_dir) if image_dir else root / "coco"]
