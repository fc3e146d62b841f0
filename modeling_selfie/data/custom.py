"""Your own data: referring expressions with masks, and semantic label maps, in two small documented formats.

Referring segmentation (`custom_referring`): a JSON list or a JSONL file of records, one target per record:

    {"image": "images/0001.jpg",                      # relative to the annotation file's folder (or image_root)
     "expressions": ["the dog on the left", "brown dog"],
     "mask": "masks/0001_dog.png"}                    # the target, one of:
        # a PNG path (non-zero pixels are the target), relative like "image";
        # COCO polygons [[x0, y0, x1, y1, ...], ...] in pixels (their union);
        # a COCO RLE {"size": [height, width], "counts": "..." or [...]};
        # null: no target (the expression names nothing in the image: an empty mask).
    {"image": "images/0001.jpg", "expressions": ["both dogs"], "masks": ["masks/a.png", {"size": ..., "counts": ...}]}
        # "masks": several objects (any of the forms above each) answered by one mask, their union; [] = no target.

Semantic segmentation (`custom_semantic`): a JSON object with the class names and image / label-map pairs:

    {"classes": [null, "road", "car"],                # label value -> class name (null or absent: never asked);
                                                      # also {"1": "road", "2": "car"}
     "samples": [{"image": "images/0001.jpg", "label": "labels/0001.png"}, ...]}
        # label: a single-channel PNG of the image's size whose pixel values index "classes"

Training samples are built as for the paper's sets: referring samples take one image and up to `max_turns` of its
(target, expression) pairs, one user turn each (a random phrase template) answered with one `[SEG]`; semantic
samples ask up to `max_classes` classes present in the image. Evaluation samples (`train=False`) are one per
(record, expression) with the validation template, or the first `max_classes` classes present.

In a recipe, next to the paper's datasets (paths relative to `--data-root`, `rate` = copies per epoch, default: the
task's rate in `sample_rates`):

    {"name": "custom_referring", "annotations": "my_refs/train.jsonl", "rate": 4}
    {"name": "custom_semantic", "annotations": "my_scenes/train.json", "rate": 2}

`python processing/check_custom.py --annotations FILE` reads every record, image and mask and reports every problem
of the file in one run, masks that would decode empty by mistake included.
"""

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from ..processing_selfie import segmentation_answer, segmentation_question
from .common import SelfieDataset, coco_segmentation_mask, load_image, read_json, require_paths
from .semantic import LabelMapDataset

CHECK_SCRIPT = "processing/check_custom.py"


def _locations(annotations, root, image_root, source) -> tuple[Path, Path, str]:
    """(annotation file, image folder, source name) of a custom dataset: the file relative to `root` when given,
    images relative to the file's folder unless `image_root` is given, the source named after the file."""
    annotations = _resolve(annotations, Path(root) if root is not None else None)
    return annotations, Path(image_root) if image_root is not None else annotations.parent, source or annotations.stem


def _resolve(path: str | Path, base: Path | None) -> Path:
    """`path` itself if absolute, else relative to `base` (when given)."""
    path = Path(path)
    return path if path.is_absolute() or base is None else base / path


def check_command(annotations: Path) -> str:
    """The check command that missing-file errors name: the checker with this annotation file."""
    return f"{CHECK_SCRIPT} --annotations {annotations}"


def read_records(path: Path, problems: list[str] | None = None) -> list:
    """The records of a JSON list or a JSONL file (blank lines skipped); errors name the file and line. With
    `problems`, a JSONL line that is not JSON is added to it and skipped instead of raising."""
    require_paths([path], check_command(path))
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    _report(problems, ValueError(f"{path}:{number} is not valid JSON: {error}"))
        return records
    return read_json(path, check_command(path))


def _report(problems: list[str] | None, error: Exception) -> None:
    """Raise `error`, or add it to `problems` when the caller collects them (the checker reports them all)."""
    if problems is None:
        raise error
    problems.append(str(error))


def _check_mask_spec(spec, where: str) -> None:
    """Raise `ValueError` unless `spec` is a PNG path, COCO polygons or a COCO RLE."""
    if isinstance(spec, str):
        return
    if isinstance(spec, dict):
        if not {"size", "counts"} <= set(spec):
            raise ValueError(f"{where}: an RLE mask needs 'size' and 'counts', got the keys {sorted(spec)}.")
        return
    if isinstance(spec, list) and spec and all(isinstance(polygon, list) for polygon in spec):
        for polygon in spec:
            if len(polygon) < 6 or len(polygon) % 2 or not all(isinstance(v, (int, float)) for v in polygon):
                raise ValueError(f"{where}: a polygon is a flat list [x0, y0, x1, y1, ...] of 3 or more points.")
        return
    raise ValueError(
        f"{where}: a mask is a PNG path, COCO polygons [[x0, y0, ...], ...] or an RLE {{'size', 'counts'}}, "
        f"got {spec!r:.80}."
    )


def check_referring_record(record, where: str) -> None:
    """Raise `ValueError` naming `where` unless `record` follows the referring format (module docstring)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a {type(record).__name__}, not an object with image, expressions and mask.")
    unknown = set(record) - {"image", "expressions", "mask", "masks"}
    if unknown:
        raise ValueError(
            f"{where} has unknown key(s) {sorted(unknown)}; the keys are image, expressions, mask / masks."
        )
    if not isinstance(record.get("image"), str):
        raise ValueError(f"{where} lacks 'image' (a path).")
    expressions = record.get("expressions")
    if not isinstance(expressions, list) or not expressions:
        raise ValueError(f"{where} needs 'expressions', a non-empty list of strings.")
    if not all(isinstance(text, str) and text.strip() for text in expressions):
        raise ValueError(f"{where} has an empty or non-string expression.")
    if ("mask" in record) == ("masks" in record):
        raise ValueError(f"{where} needs exactly one of 'mask' (one target or null) and 'masks' (several objects).")
    specs = record_mask_specs(record)
    for i, spec in enumerate(specs):
        _check_mask_spec(spec, f"{where} mask {i}" if "masks" in record else where)


def record_mask_specs(record: dict) -> list:
    """The mask specs of a record's objects (`[]`: no target)."""
    if "masks" in record:
        if not isinstance(record["masks"], list):
            raise ValueError("'masks' must be a list of masks (PNG paths, polygons or RLEs).")
        return record["masks"]
    return [] if record["mask"] is None else [record["mask"]]


def decode_mask(spec, height: int, width: int, base: Path | None, check: str = CHECK_SCRIPT) -> np.ndarray:
    """One mask spec as `uint8` `[height, width]` 0/1 (a PNG path is read relative to `base`; `check`: the command
    a missing file's error names). Masks that would come out empty by mistake are errors: a polygon that covers no
    pixel of the image (outside it, or of no area), an uncompressed RLE whose run lengths do not add up to
    height x width."""
    if isinstance(spec, str):
        path = _resolve(spec, base)
        require_paths([path], check)
        with Image.open(path) as image:
            mask = np.asarray(image.convert("L")) > 0
        if mask.shape != (height, width):
            raise ValueError(f"{path} has size {mask.shape} but its image has {(height, width)}.")
        return mask.astype(np.uint8)
    if isinstance(spec, dict) and isinstance(spec["counts"], list) and list(spec["size"]) == [height, width]:
        if sum(spec["counts"]) != height * width:
            raise ValueError(
                f"an uncompressed RLE's run lengths add up to {sum(spec['counts'])}, not height x width = "
                f"{height} x {width} = {height * width} (COCO RLEs run down the columns, from a run of zeros)."
            )
    if isinstance(spec, list):
        for i, polygon in enumerate(spec):
            xs, ys = polygon[0::2], polygon[1::2]
            if max(xs) < 0 or min(xs) > width or max(ys) < 0 or min(ys) > height:
                raise ValueError(
                    f"polygon {i} lies wholly outside the {width} x {height} image (x {min(xs)} to {max(xs)}, y "
                    f"{min(ys)} to {max(ys)}; a polygon is [x0, y0, x1, y1, ...] in pixels)."
                )
    mask = coco_segmentation_mask(spec, height, width)
    if isinstance(spec, list) and not mask.any():
        raise ValueError("the polygons cover no pixel (no area); give null for an expression that names nothing.")
    return mask


class CustomReferringDataset(SelfieDataset):
    """Referring expressions with masks in the format of the module docstring.

    Args:
        annotations: the JSON / JSONL file (relative to `root` when given and relative).
        root: the data root relative paths in a recipe are read from.
        image_root: folder the records' image and PNG paths are relative to (default: the annotation file's folder).
        source: name in samples and logs (default: the annotation file's stem).
        train: training samples (one per image, random expressions and templates) or evaluation samples.
        max_turns: most (target, expression) turns per training sample.
        seed, max_samples: see [`SelfieDataset`].
    """

    task = "referring"

    def __init__(
        self,
        annotations: str | Path,
        root: str | Path | None = None,
        image_root: str | Path | None = None,
        source: str | None = None,
        *,
        train: bool = False,
        max_turns: int = 3,
        seed: int = 0,
        max_samples: int | None = None,
    ):
        self.annotations, self.image_root, self.source = _locations(annotations, root, image_root, source)
        self.check_script = check_command(self.annotations)
        self.max_turns = max_turns
        records = read_records(self.annotations)
        if not isinstance(records, list) or not records:
            raise ValueError(f"{self.annotations} holds no records: give a JSON list or JSONL of objects.")
        for i, record in enumerate(records):
            check_referring_record(record, f"{self.annotations} record {i}")
        self.records = records
        if train:
            by_image = {}
            for i, record in enumerate(records):
                by_image.setdefault(record["image"], []).append(i)
            items = list(by_image.items())
        else:
            items = [(i, text) for i, record in enumerate(records) for text in record["expressions"]]
        super().__init__(items, train=train, seed=seed, max_samples=max_samples)

    @classmethod
    def expected_paths(cls, annotations, root=None, image_root=None, source=None) -> list[Path]:
        return [_resolve(annotations, Path(root) if root is not None else None)]

    def image_ids(self) -> list[str]:
        """The `image_id` of each sample (its image path as written), without loading any (evaluation groups an
        image's samples by it)."""
        return [item[0] if self.train else self.records[item[0]]["image"] for item in self.items]

    def data_files(self) -> list[Path]:
        files = {}
        for record in self.records:
            files[_resolve(record["image"], self.image_root)] = None
            for spec in record_mask_specs(record):
                if isinstance(spec, str):
                    files[_resolve(spec, self.image_root)] = None
        return list(files)

    def record_mask(self, index: int, height: int, width: int) -> np.ndarray:
        """The target of record `index`: the union of its objects, `uint8` `[height, width]`."""
        mask = np.zeros((height, width), dtype=np.uint8)
        for spec in record_mask_specs(self.records[index]):
            try:
                mask |= decode_mask(spec, height, width, self.image_root, self.check_script)
            except ValueError as error:
                raise ValueError(f"{self.annotations} record {index}: {error}") from error
        return mask

    def build_sample(self, item, rng: random.Random | None) -> dict:
        if rng is None:
            index, text = item
            image_name, turns = self.records[index]["image"], [(index, text)]
        else:
            image_name, indices = item
            pool = [(i, text) for i in indices for text in self.records[i]["expressions"]]
            turns = rng.sample(pool, min(self.max_turns, len(pool)))
        image = load_image(_resolve(image_name, self.image_root), self.check_script)
        conversation, masks = [], []
        for index, text in turns:
            conversation.append({"role": "user", "content": segmentation_question(text.strip(), "phrase", rng)})
            conversation.append({"role": "assistant", "content": segmentation_answer(rng)})
            masks.append(self.record_mask(index, image.height, image.width))
        sample = {
            "image": image,
            "conversation": conversation,
            "masks": np.stack(masks),
            "task": self.task,
            "source": self.source,
        }
        if rng is None:
            sample.update(query=text.strip(), query_kind="phrase", image_id=image_name)
        return sample


def read_class_names(classes, where: str) -> dict[int, str]:
    """`{label value: name}` from a list (index = value, null skipped) or a `{"value": name}` object."""
    if isinstance(classes, list):
        pairs = [(value, name) for value, name in enumerate(classes) if name is not None]
    elif isinstance(classes, dict):
        try:
            pairs = [(int(value), name) for value, name in classes.items() if name is not None]
        except ValueError as error:
            raise ValueError(f"{where}: 'classes' keys must be label values such as \"1\".") from error
    else:
        raise ValueError(f"{where} needs 'classes', a list of class names by label value or a {{value: name}} object.")
    if not pairs or not all(isinstance(name, str) and name.strip() for _, name in pairs):
        raise ValueError(f"{where}: 'classes' needs at least one class and non-empty names.")
    return {value: name.strip() for value, name in pairs}


def semantic_pairs(data, where: str, image_root: Path, problems: list[str] | None = None) -> list[tuple[Path, Path]]:
    """The (image, label map) paths of a semantic file's `samples`; a malformed sample raises, or with `problems`
    is added to it and left out."""
    if not isinstance(data, dict) or not isinstance(data.get("samples"), list) or not data["samples"]:
        raise ValueError(f"{where} needs an object with 'classes' and 'samples' (a non-empty list).")
    pairs = []
    for i, sample in enumerate(data["samples"]):
        if isinstance(sample, dict) and isinstance(sample.get("image"), str) and isinstance(sample.get("label"), str):
            pairs.append((_resolve(sample["image"], image_root), _resolve(sample["label"], image_root)))
        else:
            _report(problems, ValueError(f"{where} sample {i} needs 'image' and 'label' (paths)."))
    return pairs


class CustomSemanticDataset(LabelMapDataset):
    """Semantic label maps with class names in the format of the module docstring.

    Args:
        annotations: the JSON file (relative to `root` when given and relative).
        root, image_root, source: as for [`CustomReferringDataset`].
        train, max_classes, seed, max_samples: see `modeling_selfie.data.semantic` and [`SelfieDataset`].
        problems: a list that malformed samples are added to (and left out) instead of raising (the checker).
    """

    def __init__(
        self,
        annotations: str | Path,
        root: str | Path | None = None,
        image_root: str | Path | None = None,
        source: str | None = None,
        *,
        train: bool = False,
        max_classes: int = 3,
        seed: int = 0,
        max_samples: int | None = None,
        problems: list[str] | None = None,
    ):
        self.annotations, self.image_root, self.source = _locations(annotations, root, image_root, source)
        self.check_script = check_command(self.annotations)
        data = read_json(self.annotations, self.check_script)
        pairs = semantic_pairs(data, str(self.annotations), self.image_root, problems)
        self.class_names = read_class_names(data.get("classes"), str(self.annotations))
        super().__init__(pairs, train=train, max_classes=max_classes, seed=seed, max_samples=max_samples)

    @classmethod
    def expected_paths(cls, annotations, root=None, image_root=None, source=None) -> list[Path]:
        return [_resolve(annotations, Path(root) if root is not None else None)]


def _check_referring(path: Path, image_root: Path, problems: list[str]) -> Counter:
    """Check every record of a referring file, adding each problem to `problems`; the counts of the summary."""
    counts = Counter()
    records = read_records(path, problems)
    if not isinstance(records, list) or not records:
        problems.append(f"{path} holds no records: give a JSON list or JSONL of objects.")
        return counts
    check = check_command(path)
    for index, record in enumerate(records):
        where = f"record {index}"
        try:
            check_referring_record(record, where)
            image = load_image(_resolve(record["image"], image_root), check)
        except (ValueError, FileNotFoundError, OSError) as error:
            problems.append(str(error) if str(error).startswith(where) else f"{where}: {error}")
            continue
        specs, ok, empty = record_mask_specs(record), True, True
        for i, spec in enumerate(specs):
            try:
                empty &= not decode_mask(spec, image.height, image.width, image_root, check).any()
            except (ValueError, FileNotFoundError, OSError) as error:
                ok = False
                problems.append(f"{where}{f' mask {i}' if 'masks' in record else ''}: {error}")
        if ok:
            counts["records"] += 1
            counts["expressions"] += len(record["expressions"])
            counts["no-target records"] += empty
    counts["images"] = len({record["image"] for record in records if isinstance(record, dict) and "image" in record})
    return counts


def _check_semantic(path: Path, image_root: Path, problems: list[str]) -> Counter:
    """Check the classes and every sample of a semantic file, adding each problem to `problems`; the counts."""
    counts = Counter()
    try:
        dataset = CustomSemanticDataset(path, image_root=image_root, problems=problems)
    except ValueError as error:
        problems.append(str(error))
        return counts
    for index, pair in enumerate(dataset.items):
        try:
            sample = dataset.build_sample(pair, None)
        except (ValueError, FileNotFoundError, OSError) as error:
            problems.append(f"sample {index}: {error}")
            continue
        counts["images"] += 1
        counts["images without a named class"] += sample is None
    counts["classes"] = len(dataset.class_names)
    return counts


def check_custom(annotations: str | Path, kind: str | None = None, image_root: str | Path | None = None) -> list[str]:
    """The report of `processing/check_custom.py`: one line per problem (every one of the file: each record or
    sample, each mask), then a summary line starting with "ok" (counts) or "error". Reads every record, image, mask
    and label map."""
    path = Path(annotations)
    folder = Path(image_root) if image_root is not None else path.parent
    problems = []
    try:
        if kind is None:
            semantic = path.suffix == ".json" and isinstance(read_json(path, check_command(path)), dict)
            kind = "semantic" if semantic else "referring"
        counts = (_check_semantic if kind == "semantic" else _check_referring)(path, folder, problems)
    except (ValueError, FileNotFoundError) as error:
        return [*problems, f"error {path}: {error}"]
    summary = ", ".join(f"{value} {name}" for name, value in counts.items())
    if problems:
        return problems + [f"error {path} ({kind}): {len(problems)} problem(s); {summary}"]
    return [f"ok {path} ({kind}): {summary}"]
