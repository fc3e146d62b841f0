"""Referring segmentation: RefCOCO, RefCOCO+, RefCOCOg, refCLEF (REFER layout) and gRefCOCO.

Files under `root` (LISA's `refer_seg/` folder):

    root/<dataset>/refs(<split_by>).p     REFER refs, a pickle of plain dicts (gRefCOCO: grefs(unc).json)
    root/<dataset>/instances.json         COCO-format images, annotations (polygons or RLE) and categories
    root/images/mscoco/images/train2014/  COCO train2014 images (RefCOCO, RefCOCO+, RefCOCOg, gRefCOCO)
    root/images/saiapr_tc-12/             SAIAPR TC-12 images (refCLEF)

A ref is `{ref_id, ann_id, image_id, split, sentences: [{sent, raw, tokens, sent_id}], category_id, file_name}`;
its image file is the `file_name` of its image in `instances.json` (the ref's own `file_name` carries an
annotation suffix and names no file). In gRefCOCO `ann_id` is a list (its target is the union of those
annotations) and a ref with `no_target` (or `ann_id == [-1]`) targets nothing: its mask is empty.

Training samples (`train=True`) are one per image of the split, as in SELF1E's training: up to `max_turns`
sentences are drawn without replacement from all sentences of the image's refs, one user turn each (a random
phrase template) answered by a random answer with one `[SEG]`. Evaluation samples are one per (ref, sentence) of
the split, with the validation template, `query` (the sentence) and `query_kind="phrase"`.

Three options reproduce SELF1E's evaluation (`python -m modeling_selfie.evaluate --protocol self1e`):
`overlapping_polygons="drop"` leaves the pixels covered by two polygons of one annotation out of its target (their
RefCOCO branch sums the polygon masks; their gRefCOCO branch ORs them, which is `"keep"`), `lowercase=True`
lowercases the sentences, and `by_image=True` lists the evaluation samples image by image in the order of their
validation set (images as `list(set(image ids))` of the split's refs, each image's refs in file order), so one
image's expressions are consecutive (they are scored as one batch). Evaluation samples carry `image_id`.
"""

import pickle
import random
from pathlib import Path

import numpy as np

from ..processing_selfie import segmentation_answer, segmentation_question
from .common import OVERLAPPING_POLYGONS, CocoAnnotations, SelfieDataset, load_image, read_json, require_paths

# dataset -> the `split_by` values of its REFER release, the default first.
REFER_SPLIT_BY = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
    "refclef": ("unc", "berkeley"),
    "grefcoco": ("unc",),
}
COCO_IMAGE_DIR = "images/mscoco/images/train2014"
SAIAPR_IMAGE_DIR = "images/saiapr_tc-12"


class PlainUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds plain containers and scalars (dict, list, tuple, str, bytes, numbers, bool,
    None): `find_class` refuses every global, so a pickle cannot name any class or function to call."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}; only plain containers and scalars are allowed")


def load_plain_pickle(path: Path):
    """Load a pickle of plain containers and scalars (Python 2 `str` read as UTF-8), refusing anything else with a
    `pickle.UnpicklingError` that names `path`."""
    with path.open("rb") as file:
        try:
            return PlainUnpickler(file, encoding="utf-8").load()
        except pickle.UnpicklingError as error:
            raise pickle.UnpicklingError(f"Refusing to load {path}: {error}.") from error


def refs_file_name(dataset: str, split_by: str) -> str:
    """`refs(<split_by>).p`, or `grefs(<split_by>).json` for gRefCOCO."""
    return f"grefs({split_by}).json" if dataset == "grefcoco" else f"refs({split_by}).p"


def resolve_split_by(dataset: str, split_by: str | None) -> str:
    """Check `dataset` / `split_by` against `REFER_SPLIT_BY`; `None` gives the dataset's default."""
    if dataset not in REFER_SPLIT_BY:
        raise ValueError(f"Unknown referring dataset {dataset!r}; choose one of {tuple(REFER_SPLIT_BY)}.")
    if split_by is None:
        return REFER_SPLIT_BY[dataset][0]
    if split_by not in REFER_SPLIT_BY[dataset]:
        raise ValueError(f"{dataset} has no split_by {split_by!r}; choose one of {REFER_SPLIT_BY[dataset]}.")
    return split_by


def default_image_dir(root: Path, dataset: str) -> Path:
    """SAIAPR TC-12 images for refCLEF, COCO train2014 images otherwise."""
    return root / (SAIAPR_IMAGE_DIR if dataset == "refclef" else COCO_IMAGE_DIR)


def ref_annotation_ids(ref: dict) -> list[int]:
    """The annotation ids a ref targets: `[]` for a gRefCOCO no-target ref (`no_target` or `ann_id == [-1]`)."""
    if ref.get("no_target"):
        return []
    ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
    return [annotation_id for annotation_id in ids if annotation_id != -1]


class ReferringDataset(SelfieDataset):
    """RefCOCO / RefCOCO+ / RefCOCOg / refCLEF / gRefCOCO, one split (see the module docstring).

    Args:
        root: the folder holding `<dataset>/` and `images/` (LISA's `refer_seg/`).
        dataset: `refcoco`, `refcoco+`, `refcocog`, `refclef` or `grefcoco`.
        split: a split of the refs file (e.g. `train`, `val`, `testA`, `testB`, `test`).
        split_by: which refs file (`REFER_SPLIT_BY`); `None` gives unc (umd for RefCOCOg).
        image_dir: the image folder; `None` gives `root/images/mscoco/images/train2014` (refCLEF:
            `root/images/saiapr_tc-12`).
        train: training samples (one per image, random sentences and templates) or evaluation samples.
        max_turns: most sentences (turns, `[SEG]` tokens) per training sample.
        overlapping_polygons: `"keep"` (the union of an annotation's polygons) or `"drop"` (pixels covered by two
            or more polygons of one annotation are not target, as in SELF1E's evaluation); see
            [`coco_segmentation_mask`].
        lowercase: lowercase the sentences (SELF1E's loader does).
        by_image: evaluation samples image by image, in SELF1E's validation order (module docstring).
        seed, max_samples: see [`SelfieDataset`].

    Samples: `image` RGB, `masks` `uint8` `[n_turns, H, W]`.
    """

    task = "referring"

    def __init__(
        self,
        root: str | Path,
        dataset: str = "refcoco",
        split: str = "train",
        split_by: str | None = None,
        image_dir: str | Path | None = None,
        *,
        train: bool = False,
        max_turns: int = 3,
        overlapping_polygons: str = "keep",
        lowercase: bool = False,
        by_image: bool = False,
        seed: int = 0,
        max_samples: int | None = None,
    ):
        if overlapping_polygons not in OVERLAPPING_POLYGONS:
            raise ValueError(
                f"overlapping_polygons must be one of {OVERLAPPING_POLYGONS}, got {overlapping_polygons!r}."
            )
        root = Path(root)
        self.source = dataset
        self.check_script = "processing/check_grefcoco.py" if dataset == "grefcoco" else "processing/check_refer.py"
        self.split_by = resolve_split_by(dataset, split_by)
        self.image_dir = Path(image_dir) if image_dir is not None else default_image_dir(root, dataset)
        self.max_turns = max_turns
        self.overlapping_polygons = overlapping_polygons
        self.lowercase = lowercase
        require_paths(self.expected_paths(root, dataset, split, self.split_by, self.image_dir), self.check_script)

        refs = self._read_refs(root / dataset / refs_file_name(dataset, self.split_by), split)
        self.coco = CocoAnnotations(root / dataset / "instances.json", self.check_script)
        if train:
            refs_by_image = {}
            for ref in refs:
                refs_by_image.setdefault(ref["image_id"], []).append(ref)
            items = sorted(refs_by_image.items())
        else:
            if by_image:
                images = list(set([ref["image_id"] for ref in refs]))  # noqa: C403 (their REFER.getImgIds, same order)
                order = {image_id: rank for rank, image_id in enumerate(images)}
                refs = sorted(refs, key=lambda ref: order[ref["image_id"]])  # stable: file order within an image
            items = [(ref, sentence) for ref in refs for sentence in ref["sentences"]]
        super().__init__(items, train=train, seed=seed, max_samples=max_samples)

    @classmethod
    def expected_paths(
        cls,
        root: str | Path,
        dataset: str = "refcoco",
        split: str = "train",
        split_by: str | None = None,
        image_dir: str | Path | None = None,
    ) -> list[Path]:
        """The refs file, `instances.json` and the image folder (`split` selects refs inside the refs file, so it
        does not change the paths)."""
        root = Path(root)
        split_by = resolve_split_by(dataset, split_by)
        image_dir = Path(image_dir) if image_dir is not None else default_image_dir(root, dataset)
        return [root / dataset / refs_file_name(dataset, split_by), root / dataset / "instances.json", image_dir]

    def _read_refs(self, path: Path, split: str) -> list[dict]:
        """The refs of `split` in the refs file at `path` (restricted pickle, or JSON for gRefCOCO)."""
        refs = read_json(path, self.check_script) if path.suffix == ".json" else load_plain_pickle(path)
        if not isinstance(refs, list) or not all(isinstance(ref, dict) for ref in refs):
            raise ValueError(f"{path} holds a {type(refs).__name__}, not a list of ref dicts.")
        selected = [ref for ref in refs if ref["split"] == split]
        if not selected:
            splits = sorted({str(ref["split"]) for ref in refs})
            raise ValueError(f"{path} has no ref in split {split!r}; its splits are {splits}.")
        return selected

    def image_path(self, image_id: int) -> Path:
        """The image file of `image_id`, from its `file_name` in `instances.json`."""
        if image_id not in self.coco.images:
            raise KeyError(f"{self.coco.path} has no image with id {image_id}.")
        return self.image_dir / self.coco.images[image_id]["file_name"]

    def ref_mask(self, ref: dict) -> np.ndarray:
        """The target of a ref: `uint8` `[H, W]`, the union of its annotations (empty for a no-target ref)."""
        return self.coco.mask(ref_annotation_ids(ref), ref["image_id"], self.overlapping_polygons)

    def image_ids(self) -> list[int]:
        """The `image_id` of each sample, without loading any (evaluation groups an image's samples by it)."""
        return [item[0] if self.train else item[0]["image_id"] for item in self.items]

    def data_files(self) -> list[Path]:
        return [self.image_path(image_id) for image_id in sorted(set(self.image_ids()))]

    def build_sample(self, item, rng: random.Random | None) -> dict:
        if rng is None:
            ref, sentence = item
            image_id, turns = ref["image_id"], [(ref, sentence)]
        else:
            image_id, refs = item
            pool = [(ref, sentence) for ref in refs for sentence in ref["sentences"]]
            turns = rng.sample(pool, min(self.max_turns, len(pool)))
        conversation, masks = [], []
        for ref, sentence in turns:
            text = sentence["sent"].strip()
            text = text.lower() if self.lowercase else text
            conversation.append({"role": "user", "content": segmentation_question(text, "phrase", rng)})
            conversation.append({"role": "assistant", "content": segmentation_answer(rng)})
            masks.append(self.ref_mask(ref))
        sample = {
            "image": load_image(self.image_path(image_id), self.check_script),
            "conversation": conversation,
            "masks": np.stack(masks),
            "task": self.task,
            "source": self.source,
        }
        if rng is None:
            sample.update(query=text, query_kind="phrase", image_id=image_id)
        return sample
