"""build_dataset / build_mixture over a data root in the real layout, the shipped recipes, and the check scripts
(one of them run as a real subprocess)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_selfie.data.registry import (
    CHECK_FAMILIES,
    DATASETS,
    build_dataset,
    build_mixture,
    check_main,
    load_recipe,
)
from modeling_selfie.data.sample import check_sample

from .data_fixtures import write_data_root, write_refer_dataset

REPO = Path(__file__).resolve().parent.parent
NAMES = ("refcoco", "refcoco+", "refcocog", "refclef", "grefcoco", "reasonseg", "ade20k", "cocostuff", "pascal_part",
         "paco_lvis", "llava_instruct", "vqav2")  # fmt: skip
TASKS = {"refcoco": "referring", "refcoco+": "referring", "refcocog": "referring", "refclef": "referring",
         "grefcoco": "referring", "reasonseg": "reasoning", "ade20k": "semantic", "cocostuff": "semantic",
         "pascal_part": "semantic", "paco_lvis": "semantic", "llava_instruct": "vqa", "vqav2": "vqa"}  # fmt: skip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_data_root(tmp_path_factory.mktemp("dataset"))


def test_every_name_builds_its_loader(data_root):
    assert tuple(DATASETS) == NAMES + ("custom_referring", "custom_semantic")  # tests/test_data_custom.py
    for name in NAMES:
        for train in (False, True):
            dataset = build_dataset(name, "train", data_root, train=train)
            sample = check_sample(dataset[0], where=name)
            assert (sample["source"], sample["task"]) == (name, TASKS[name]) and len(dataset) > 0


def test_unknown_name_lists_the_known_ones(data_root):
    with pytest.raises(ValueError, match="Unknown dataset 'refcocoh'; choose one of refcoco, refcoco\\+, .*vqav2"):
        build_dataset("refcocoh", "train", data_root)
    with pytest.raises(ValueError, match="llava_instruct has only the split 'train'"):
        build_dataset("llava_instruct", "val", data_root)


def test_kwargs_reach_the_loader_and_override_locations(data_root):
    dataset = build_dataset("refcoco", "train", data_root, train=True, max_turns=1, seed=7)
    assert (dataset.max_turns, dataset.seed, dataset[0]["masks"].shape[0]) == (1, 7, 1)
    moved = build_dataset("vqav2", "train", data_root, image_root=data_root / "coco", question_suffix="")
    assert moved.image_root == data_root / "coco"


def test_shipped_recipes():
    seg, full = load_recipe("self1e-seg"), load_recipe("self1e")
    assert seg["sample_rates"] == {"semantic": 6, "referring": 20, "reasoning": 6, "vqa": 1}
    assert full["sample_rates"] == {"semantic": 1, "referring": 1, "reasoning": 1, "vqa": 1}
    for recipe in (seg, full):
        assert {entry["name"] for entry in recipe["datasets"]} <= set(DATASETS)
        assert {TASKS[entry["name"]] for entry in recipe["datasets"]} == set(TASKS.values())
        # the training block (the authors' command line) is checked in tests/test_training.py
        # the paper's Tab. 8; gRefCOCO is evaluated zero-shot (Tab. 2), so it is not trained on
        assert {entry["name"] for entry in recipe["datasets"]} == {
            "ade20k", "cocostuff", "pascal_part", "paco_lvis", "refcoco", "refcoco+", "refcocog", "reasonseg",
            "llava_instruct", "vqav2",
        }
    with pytest.raises(FileNotFoundError, match="self2e"):
        load_recipe("self2e")


def test_build_mixture_repeats_the_recipe_datasets(data_root):
    recipe = load_recipe("self1e-seg")
    mixture = build_mixture(recipe, data_root)
    rates = recipe["sample_rates"]
    expected = sum(
        len(build_dataset(entry["name"], entry["split"], data_root, train=True)) * rates[TASKS[entry["name"]]]
        for entry in recipe["datasets"]
    )
    assert len(mixture) == expected
    assert check_sample(mixture[0])["source"] in TASKS
    small = {"datasets": [{"name": "ade20k", "split": "train"}, {"name": "vqav2"}],
             "sample_rates": {"semantic": 2, "vqa": 3}}  # fmt: skip
    assert len(build_mixture(small, data_root)) == 2 * 2 + 2 * 3
    with pytest.raises(ValueError, match="vqav2 has task 'vqa', which has no rate in sample_rates"):
        build_mixture({"datasets": [{"name": "vqav2"}]}, data_root)


def test_check_script_lists_exactly_the_missing_paths_and_counts_the_complete_sets(tmp_path):
    refer_seg = tmp_path / "refer_seg"
    for dataset in ("refcoco", "refcoco+"):
        write_refer_dataset(refer_seg, dataset)
    (refer_seg / "refcoco+" / "instances.json").unlink()
    run = subprocess.run(
        [sys.executable, str(REPO / "processing" / "check_refer.py"), "--root", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert run.stdout.splitlines() == [
        "ok refcoco (train): 1 training samples, 1 data files",
        f"missing: {refer_seg / 'refcoco+' / 'instances.json'}",
        "error refcoco+ (train): 1 expected path(s) missing",
        f"missing: {refer_seg / 'refcocog' / 'refs(umd).p'}",
        f"missing: {refer_seg / 'refcocog' / 'instances.json'}",
        "error refcocog (train): 2 expected path(s) missing",
        f"missing: {refer_seg / 'refclef' / 'refs(unc).p'}",
        f"missing: {refer_seg / 'refclef' / 'instances.json'}",
        f"missing: {refer_seg / 'images' / 'saiapr_tc-12'}",
        "error refclef (train): 3 expected path(s) missing",
    ]


def test_every_family_checks_ok_then_reports_a_missing_data_file(tmp_path, capsys):
    root = write_data_root(tmp_path)
    for family in CHECK_FAMILIES:
        assert check_main(family, ["--root", str(root)]) == 0, capsys.readouterr().out
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(NAMES) and all(line.startswith("ok ") for line in lines)
    assert "ok vqav2 (train): 2 training samples, 2 data files" in lines
    image = root / "coco" / "train2017" / "000000052846.jpg"
    image.unlink()
    assert check_main("llava_instruct", ["--root", str(root)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"missing: {image}",
        "error llava_instruct (train): 1 of 2 data files missing",
    ]
    shutil.rmtree(root / "refer_seg" / "images" / "saiapr_tc-12")
    assert check_main("refer", ["--root", str(root), "--dataset", "refclef"]) == 1
    assert capsys.readouterr().out.splitlines()[0] == f"missing: {root / 'refer_seg' / 'images' / 'saiapr_tc-12'}"
    assert check_main("refer", ["--root", str(root), "--split", "testB", "--dataset", "refcoco"]) == 1
    assert "no ref in split 'testB'" in capsys.readouterr().out
