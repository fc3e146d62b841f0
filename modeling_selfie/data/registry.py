"""Datasets by name under one data root, mixtures from recipe files, and the data check scripts.

Layout under `data_root` (LISA's / SELF1E's `dataset/` folder):

    refer_seg/{refcoco,refcoco+,refcocog,refclef,grefcoco}/, refer_seg/images/   refcoco ... refclef, grefcoco
    reason_seg/ReasonSeg/{train,val,test}/                                       reasonseg
    ADEChallengeData2016/{images,annotations}/{training,validation}/             ade20k
    cocostuff/{train,val}2017/ (label maps), coco/{train,val}2017/ (images)      cocostuff
    vlpart/pascal_part/{train.json,VOCdevkit/VOC2010/JPEGImages/}                pascal_part
    vlpart/paco/annotations/paco_lvis_v1_{split}.json, coco/                     paco_lvis
    llava_dataset/llava_instruct_150k.json, coco/train2017/                      llava_instruct (split "train")
    vqav2/vqav2_{split}.jsonl, image paths relative to data_root                 vqav2
    your own data (formats in modeling_selfie/data/custom.py), default {split}.jsonl / {split}.json
        (give "annotations": "path/relative/to/data_root" in the recipe entry)   custom_referring, custom_semantic

Keyword arguments of [`build_dataset`] go to the loader and override these locations (e.g. `image_dir=...`).
"""

import argparse
import importlib
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

MAX_LISTED = 20  # missing data files listed by the check scripts unless --list-all


@dataclass(frozen=True)
class DatasetEntry:
    """How a name maps to a loader: `loader_name` is the loader class as "module.Class" under
    `modeling_selfie.data` (imported when first used: the check scripts' `--help` needs no torch),
    `location(data_root, split)` gives the loader's location arguments (those of its `expected_paths`); `family`
    names the check script `processing/check_<family>.py`."""

    loader_name: str
    family: str
    location: Callable[[Path, str], dict]

    @property
    def loader(self) -> type:
        """The loader class (a `SelfieDataset`)."""
        module, _, name = self.loader_name.rpartition(".")
        return getattr(importlib.import_module(f".{module}", __package__), name)


def _refer(dataset: str) -> Callable[[Path, str], dict]:
    return lambda root, split: {"root": root / "refer_seg", "dataset": dataset, "split": split}


def _root_and_split(root: Path, split: str) -> dict:
    return {"root": root, "split": split}


def _llava_location(root: Path, split: str) -> dict:
    if split != "train":
        raise ValueError(f"llava_instruct has only the split 'train', not {split!r}.")
    return {"json_path": root / "llava_dataset" / "llava_instruct_150k.json", "image_dir": root / "coco" / "train2017"}


DATASETS = {
    "refcoco": DatasetEntry("refer.ReferringDataset", "refer", _refer("refcoco")),
    "refcoco+": DatasetEntry("refer.ReferringDataset", "refer", _refer("refcoco+")),
    "refcocog": DatasetEntry("refer.ReferringDataset", "refer", _refer("refcocog")),
    "refclef": DatasetEntry("refer.ReferringDataset", "refer", _refer("refclef")),
    "grefcoco": DatasetEntry("refer.ReferringDataset", "grefcoco", _refer("grefcoco")),
    "reasonseg": DatasetEntry("reasonseg.ReasonSegDataset", "reasonseg", _root_and_split),
    "ade20k": DatasetEntry("semantic.ADE20KDataset", "ade20k", _root_and_split),
    "cocostuff": DatasetEntry("semantic.CocoStuffDataset", "cocostuff", _root_and_split),
    "pascal_part": DatasetEntry("semantic.PascalPartDataset", "pascal_part", _root_and_split),
    "paco_lvis": DatasetEntry("semantic.PacoLvisDataset", "paco_lvis", _root_and_split),
    "llava_instruct": DatasetEntry("vqa.LlavaInstructDataset", "llava_instruct", _llava_location),
    "vqav2": DatasetEntry(
        "vqa.VQAJsonlDataset",
        "vqav2",
        lambda root, split: {"jsonl_path": root / "vqav2" / f"vqav2_{split}.jsonl", "image_root": root},
    ),
    "custom_referring": DatasetEntry(
        "custom.CustomReferringDataset", "custom", lambda root, split: {"root": root, "annotations": f"{split}.jsonl"}
    ),
    "custom_semantic": DatasetEntry(
        "custom.CustomSemanticDataset", "custom", lambda root, split: {"root": root, "annotations": f"{split}.json"}
    ),
}
# Families of `check_main` (`processing/check_custom.py` has its own command line: custom data has no fixed layout).
CHECK_FAMILIES = {
    family: tuple(name for name, entry in DATASETS.items() if entry.family == family)
    for family in dict.fromkeys(entry.family for entry in DATASETS.values())
    if family != "custom"
}


def dataset_entry(name: str) -> DatasetEntry:
    """The registry entry of `name`; an unknown name raises `ValueError` listing the known ones."""
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    return DATASETS[name]


def dataset_location(name: str, split: str, data_root: str | Path, **overrides) -> dict:
    """The location arguments of `name`'s loader under `data_root`, updated with `overrides`."""
    return {**dataset_entry(name).location(Path(data_root), split), **overrides}


def build_dataset(name: str, split: str, data_root: str | Path, train: bool = False, **kwargs):
    """The loader of dataset `name` (one of `DATASETS`) for `split` under `data_root` (layout in the module
    docstring). `kwargs` go to the loader (e.g. `seed`, `max_turns`, `max_classes`, `max_samples`, `image_dir`)."""
    return dataset_entry(name).loader(**{**dataset_location(name, split, data_root), **kwargs}, train=train)


def load_recipe(recipe: dict | str | Path, _seen: tuple[str, ...] = ()) -> dict:
    """A recipe dict, read from a JSON file path or, for a bare name such as "self1e-seg", from the shipped
    `configuration/recipes/<name>.json`.

    A recipe with `"extends": BASE` (a shipped name, or a file relative to the recipe's folder) is BASE with the
    recipe's keys on top: its `training` block is merged key by key into BASE's, every other key it gives
    (`datasets`, `sample_rates`, `seed`, ...) replaces BASE's; BASE's `description` and `notes` are not kept.
    """
    if isinstance(recipe, dict):
        data, folder = dict(recipe), Path.cwd()
    else:
        path = Path(recipe)
        if path.is_file():
            text, folder = path.read_text(encoding="utf-8"), path.parent
        else:
            shipped = resources.files("modeling_selfie.configuration").joinpath("recipes", f"{recipe}.json")
            if not shipped.is_file():
                raise FileNotFoundError(
                    f"Recipe {str(recipe)!r} is neither a file nor a shipped recipe ({', '.join(shipped_recipes())})."
                )
            text, folder = shipped.read_text(encoding="utf-8"), None
        from .vqa import read_json_line

        data = read_json_line(text, f"Recipe {str(recipe)!r}")
    base_name = data.pop("extends", None)
    if base_name is None:
        return data
    if not isinstance(base_name, str) or base_name in _seen:
        raise ValueError(f"Recipe {data.get('name', str(recipe))!r}: bad \"extends\" {base_name!r} (a recipe name "
                         "or file, not extending itself).")
    base_path = folder / base_name if folder is not None and (folder / base_name).is_file() else base_name
    base = load_recipe(base_path, (*_seen, base_name))
    base.pop("description", None)
    base.pop("notes", None)
    training = {**base.get("training", {}), **data.pop("training", {})}
    return {**base, **data, **({"training": training} if training else {})}


def shipped_recipes() -> list[str]:
    """Names of the recipes in `configuration/recipes/`."""
    folder = resources.files("modeling_selfie.configuration").joinpath("recipes")
    return sorted(entry.name[: -len(".json")] for entry in folder.iterdir() if entry.name.endswith(".json"))


def build_mixture(recipe: dict | str | Path, data_root: str | Path, *, train: bool = True, shuffle: bool = True):
    """The training mixture of a recipe: every dataset of `recipe["datasets"]` (entries `{"name", "split", ...}`,
    the other keys going to [`build_dataset`]) repeated by its entry's `rate` or else by the rate of its task in
    `recipe["sample_rates"]`, seeded by `recipe["seed"]` (default 0)."""
    from .mixing import MixedDataset

    recipe = load_recipe(recipe)
    if "datasets" not in recipe:
        raise ValueError(f"Recipe {recipe.get('name', '<unnamed>')!r} lacks the key 'datasets'.")
    rates = recipe.get("sample_rates", {})
    seed = recipe.get("seed", 0)
    datasets, repeats = [], []
    for entry in recipe["datasets"]:
        options = {"seed": seed, **entry}
        name, split, rate = options.pop("name"), options.pop("split", "train"), options.pop("rate", None)
        dataset = build_dataset(name, split, data_root, train=train, **options)
        if rate is None and dataset.task not in rates:
            raise ValueError(
                f"{name} has task {dataset.task!r}, which has no rate in sample_rates {rates}: add one or give the "
                "entry a 'rate'."
            )
        datasets.append(dataset)
        repeats.append(rates[dataset.task] if rate is None else rate)
    return MixedDataset(datasets, repeats, seed=seed, shuffle=shuffle)


def check_dataset(name: str, split: str, data_root: str | Path, list_all: bool = False, **overrides) -> list[str]:
    """The report of the check scripts for one dataset: the lines "missing: <path>" (every missing expected path;
    then, once those exist, the missing data files: images, label maps...), then a summary line starting with
    "ok" when nothing is missing, or "error" otherwise.
    """
    entry = dataset_entry(name)
    where = f"{name} ({split})"
    try:
        location = dataset_location(name, split, data_root, **overrides)
        missing = [path for path in entry.loader.expected_paths(**location) if not path.exists()]
        if missing:
            summary = f"error {where}: {len(missing)} expected path(s) missing"
            return [f"missing: {path}" for path in missing] + [summary]
        dataset = entry.loader(**location, train=True)
        files = dataset.data_files()
    except (ValueError, KeyError, FileNotFoundError, pickle.UnpicklingError) as error:
        return [f"error {where}: {error}"]
    missing = [path for path in files if not path.exists()]
    lines = [f"missing: {path}" for path in (missing if list_all else missing[:MAX_LISTED])]
    if len(lines) < len(missing):
        lines.append(f"... and {len(missing) - len(lines)} more (--list-all lists them all)")
    if missing:
        return lines + [f"error {where}: {len(missing)} of {len(files)} data files missing"]
    return [f"ok {where}: {len(dataset)} training samples, {len(files)} data files"]


def check_main(family: str, argv: list[str] | None = None) -> int:
    """Command line of `processing/check_<family>.py`: print the report of [`check_dataset`] for every dataset of
    the family (or `--dataset`); exit status 1 when anything is missing."""
    names = CHECK_FAMILIES[family]
    parser = argparse.ArgumentParser(
        description=f"Check that the files of {', '.join(names)} are where the loaders expect them."
    )
    parser.add_argument("--root", required=True, help="the data root given to build_dataset (LISA's dataset/)")
    parser.add_argument("--split", default="train", help="the split to check (default: train)")
    parser.add_argument("--list-all", action="store_true", help=f"list every missing data file, not only {MAX_LISTED}")
    if len(names) > 1:
        parser.add_argument("--dataset", choices=names, help="check this dataset only (default: all of them)")
    if family in ("refer", "grefcoco"):
        parser.add_argument("--split-by", help="the refs file refs(<split-by>).p (default: unc, umd for refcocog)")
    args = parser.parse_args(argv)
    overrides = {"split_by": args.split_by} if getattr(args, "split_by", None) else {}
    status = 0
    for name in [args.dataset] if getattr(args, "dataset", None) else names:
        lines = check_dataset(name, args.split, args.root, list_all=args.list_all, **overrides)
        print("\n".join(lines))
        status |= not lines[-1].startswith("ok")
    return int(status)


def check_custom_main(argv: list[str] | None = None) -> int:
    """Command line of `processing/check_custom.py`; exit status 1 when anything is wrong."""
    parser = argparse.ArgumentParser(
        description="Check an annotation file of your own data (formats: modeling_selfie/data/custom.py, README)."
    )
    parser.add_argument("--annotations", required=True, help="the JSON / JSONL file")
    parser.add_argument("--kind", choices=("referring", "semantic"),
                        help="format (default: semantic for a JSON object with 'classes', else referring)")
    parser.add_argument("--image-root", help="folder image and mask paths are relative to (default: the file's)")
    args = parser.parse_args(argv)
    from .custom import check_custom

    lines = check_custom(args.annotations, args.kind, args.image_root)
    print("\n".join(lines))
    return int(not lines[-1].startswith("ok"))
