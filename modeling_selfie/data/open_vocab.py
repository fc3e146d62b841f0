"""Readers of the open-vocabulary semantic segmentation benchmarks (paper Sec. 4.2.4), validation split only.

Each reader takes the data root (the folder that holds the dataset folder named below) and yields

    {"image": PIL.Image.Image (RGB), "label": np.ndarray int64 [H, W], "class_names": tuple[str, ...]}

where `label[y, x]` is a class index in `[0, len(class_names))` or the reader's `ignore_index`. Layouts:

* `ade150` (ADE20K-150, `ADE150Dataset`), as released (`ADEChallengeData2016.zip`):
  `ADEChallengeData2016/images/validation/*.jpg` and `ADEChallengeData2016/annotations/validation/*.png`
  (same stem). PNG value 0 ("other") is ignored, value k in 1..150 is class k-1 of `ADE150_CLASSES`.
* `pc59` (PASCAL-Context-59, `PascalContext59Dataset`), as the detectron2 / MaskFormer preparation writes it:
  `pascal_ctx_d2/images/validation/*.jpg` and `pascal_ctx_d2/annotations_ctx59/validation/*.png`.
  PNG value k in 0..58 is class k of `PASCAL_CONTEXT_59_CLASSES`; 255 (background) is ignored.
* `pc459` (PASCAL-Context-459, `PascalContext459Dataset`), same preparation:
  `pascal_ctx_d2/images/validation/*.jpg` and `pascal_ctx_d2/annotations_ctx459/validation/*.tif` (16-bit
  TIFF: value k in 0..458 is class k, 65535 = unlabelled, ignored). The 459 class names are read from
  `pascal_ctx_d2/labels.txt`, the `labels.txt` of the PASCAL-Context release (lines `index: name`, index 1..459
  in class order); a file of one name per line, in class order, works too.
* `voc20` (PASCAL VOC 2012 without background, `VOC20Dataset`), as the detectron2 preparation writes it:
  `VOC2012/JPEGImages/*.jpg` and `VOC2012/annotations_detectron2/val/*.png`; one sample per annotation file.
  PNG value k in 0..19 is class k of `VOC20_CLASSES`; 255 (background and object borders) is ignored.

Class names are the readable forms used as text queries ("potted plant", not "pottedplant"). Every reader has
`expected_paths(root)` (what it needs); a missing one raises `FileNotFoundError` naming it.
"""

import re
from pathlib import Path

import numpy as np
from PIL import Image

from ..io_utils import read_image
from .semantic import ADE20K_CLASSES

ADE150_CLASSES = ADE20K_CLASSES  # the 150 ADE20K classes, in label order (shared with training)

PASCAL_CONTEXT_59_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog", "door",
    "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain",
    "mouse", "person", "plate", "platform", "potted plant", "road", "rock", "sheep", "shelves", "sidewalk", "sign",
    "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tv monitor", "wall", "water", "window",
    "wood",
)  # fmt: skip

VOC20_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table", "dog",
    "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor",
)  # fmt: skip

_LABELS_LINE = re.compile(r"^\s*\d+\s*:\s*(.+?)\s*$")


def _require(paths: list[Path], dataset: str) -> None:
    """Raise `FileNotFoundError` naming every path of `paths` that does not exist."""
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise FileNotFoundError(f"{dataset}: missing {', '.join(missing)} (see modeling_selfie.data.open_vocab).")


def read_class_names(path: str | Path, expected: int) -> tuple[str, ...]:
    """Class names from a text file, one per line in class order, either `name` or `index: name`.

    Raises `ValueError` unless there are exactly `expected` names.
    """
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    names = tuple(match.group(1) if (match := _LABELS_LINE.match(line)) else line.strip() for line in lines)
    if len(names) != expected:
        raise ValueError(f"{path} holds {len(names)} class names, expected {expected}.")
    return names


class _SemanticFolderDataset:
    """Images and label maps paired by file stem. Subclasses set the class attributes and `_convert_label`.

    Attributes:
        folder: the dataset folder under the data root.
        image_dir, label_dir: relative to `folder`.
        label_suffix: extension of the label files.
        index_by_labels: list the samples from the label folder (else from the image folder).
        ignore_index: label value of ignored pixels in `label`.
    """

    name: str
    folder: str
    image_dir: str
    label_dir: str
    label_suffix = ".png"
    index_by_labels = False
    ignore_index = 255
    class_names: tuple[str, ...]

    def __init__(self, root: str | Path, split: str = "val"):
        if split not in ("val", "validation"):
            raise ValueError(f"{self.name} has readers for the validation split only ('val'), got {split!r}.")
        _require(self.expected_paths(root), self.name)
        base = Path(root) / self.folder
        self._image_root, self._label_root = base / self.image_dir, base / self.label_dir
        if self.index_by_labels:
            self.stems = sorted(path.stem for path in self._label_root.glob(f"*{self.label_suffix}"))
        else:
            self.stems = sorted(path.stem for path in self._image_root.glob("*.jpg"))
        if not self.stems:
            listed = self._label_root if self.index_by_labels else self._image_root
            raise FileNotFoundError(f"{self.name}: no samples in {listed}.")
        paths = (path for stem in self.stems for path in (self._image_path(stem), self._label_path(stem)))
        missing = [str(path) for path in paths if not path.exists()]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise FileNotFoundError(f"{self.name}: missing {', '.join(missing[:3])}{more}.")

    @classmethod
    def expected_paths(cls, root: str | Path) -> list[Path]:
        """The folders (and files) under `root` this reader needs."""
        base = Path(root) / cls.folder
        return [base / cls.image_dir, base / cls.label_dir]

    def _image_path(self, stem: str) -> Path:
        return self._image_root / f"{stem}.jpg"

    def _label_path(self, stem: str) -> Path:
        return self._label_root / f"{stem}{self.label_suffix}"

    def _convert_label(self, raw: np.ndarray) -> np.ndarray:
        """File values -> int64 class indices / `ignore_index` (identity unless overridden)."""
        return raw.astype(np.int64)

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> dict:
        stem = self.stems[index]
        image = read_image(self._image_path(stem))
        label = self._convert_label(np.asarray(Image.open(self._label_path(stem))))
        if label.shape != (image.height, image.width):
            raise ValueError(
                f"{self.name}: label {self._label_path(stem)} is {label.shape[1]}x{label.shape[0]} but its image "
                f"is {image.width}x{image.height}."
            )
        return {"image": image, "label": label, "class_names": self.class_names}


class ADE150Dataset(_SemanticFolderDataset):
    """ADE20K-150 validation (2000 images); PNG 0 is ignored, k -> class k-1."""

    name = "ade150"
    folder = "ADEChallengeData2016"
    image_dir = "images/validation"
    label_dir = "annotations/validation"
    class_names = ADE150_CLASSES

    def _convert_label(self, raw: np.ndarray) -> np.ndarray:
        label = raw.astype(np.int64) - 1
        label[raw == 0] = self.ignore_index
        return label


class PascalContext59Dataset(_SemanticFolderDataset):
    """PASCAL-Context-59 validation (5105 images); labels 0..58, 255 ignored."""

    name = "pc59"
    folder = "pascal_ctx_d2"
    image_dir = "images/validation"
    label_dir = "annotations_ctx59/validation"
    class_names = PASCAL_CONTEXT_59_CLASSES


class PascalContext459Dataset(_SemanticFolderDataset):
    """PASCAL-Context-459 validation (5105 images); 16-bit TIFF labels 0..458, 65535 ignored; class names read
    from `pascal_ctx_d2/labels.txt`."""

    name = "pc459"
    folder = "pascal_ctx_d2"
    image_dir = "images/validation"
    label_dir = "annotations_ctx459/validation"
    label_suffix = ".tif"
    ignore_index = 65535
    names_file = "labels.txt"

    def __init__(self, root: str | Path, split: str = "val"):
        super().__init__(root, split)
        self.class_names = read_class_names(Path(root) / self.folder / self.names_file, expected=459)

    @classmethod
    def expected_paths(cls, root: str | Path) -> list[Path]:
        return [*super().expected_paths(root), Path(root) / cls.folder / cls.names_file]


class VOC20Dataset(_SemanticFolderDataset):
    """PASCAL VOC 2012 validation without background (1449 images); labels 0..19, 255 ignored."""

    name = "voc20"
    folder = "VOC2012"
    image_dir = "JPEGImages"
    label_dir = "annotations_detectron2/val"
    index_by_labels = True
    class_names = VOC20_CLASSES


OPEN_VOCAB_DATASETS = {
    cls.name: cls for cls in (ADE150Dataset, PascalContext59Dataset, PascalContext459Dataset, VOC20Dataset)
}


def build_open_vocab_dataset(name: str, data_root: str | Path, split: str = "val") -> _SemanticFolderDataset:
    """The reader of benchmark `name` (`ade150`, `pc59`, `pc459`, `voc20`) on `data_root`."""
    if name not in OPEN_VOCAB_DATASETS:
        raise ValueError(f"Unknown open-vocabulary dataset {name!r}; choose one of {sorted(OPEN_VOCAB_DATASETS)}.")
    return OPEN_VOCAB_DATASETS[name](data_root, split)


__all__ = [
    "ADE150_CLASSES",
    "ADE150Dataset",
    "OPEN_VOCAB_DATASETS",
    "PASCAL_CONTEXT_59_CLASSES",
    "PascalContext459Dataset",
    "PascalContext59Dataset",
    "VOC20_CLASSES",
    "VOC20Dataset",
    "build_open_vocab_dataset",
    "read_class_names",
]
