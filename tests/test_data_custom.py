"""Your own data (modeling_selfie/data/custom.py): referring records with PNG / polygon / RLE masks, several objects
and no target; semantic label maps with class names; a recipe mixing them with rates; processing/check_custom.py.
Inputs are written by hand: PNGs with PIL, RLEs with pycocotools."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from modeling_selfie.data.custom import (
    CustomReferringDataset,
    CustomSemanticDataset,
    check_custom,
    compressed_rle_run_lengths,
)
from modeling_selfie.data.registry import build_mixture
from modeling_selfie.data.sample import check_sample

REPO = Path(__file__).resolve().parent.parent
H, W = 40, 60


def box(top: int, left: int, height: int, width: int) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[top : top + height, left : left + width] = 1
    return mask


def compressed_rle(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed form: run lengths in column-major order, starting with a run of zeros."""
    flat, counts, value, run = mask.flatten(order="F"), [], 0, 0
    for pixel in flat:
        if pixel == value:
            run += 1
        else:
            counts.append(run)
            value, run = pixel, 1
    counts.append(run)
    return {"size": [H, W], "counts": counts}


POLYGON = [[10, 5, 30, 5, 30, 25, 10, 25]]  # x, y pixels of a square


def polygon_mask() -> np.ndarray:
    return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(POLYGON, H, W)))


@pytest.fixture
def referring_root(tmp_path):
    """images/{a,b}.png; a.png has a PNG-mask target, a polygon target and a two-object target; b.png an RLE target
    and a no-target expression."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name, colour in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
        Image.new("RGB", (W, H), colour).save(tmp_path / "images" / f"{name}.png")
    Image.fromarray(box(0, 0, 10, 10) * 255).save(tmp_path / "masks" / "a_left.png")
    Image.fromarray(box(30, 50, 10, 10) * 7).save(tmp_path / "masks" / "a_corner.png")  # any non-zero value
    records = [
        {"image": "images/a.png", "expressions": ["left thing", "the top left block"], "mask": "masks/a_left.png"},
        {"image": "images/a.png", "expressions": ["square"], "mask": POLYGON},
        {"image": "images/a.png", "expressions": ["both blocks"],
         "masks": ["masks/a_left.png", "masks/a_corner.png"]},
        {"image": "images/b.png", "expressions": ["middle bar"], "mask": compressed_rle(box(15, 0, 10, 60))},
        {"image": "images/b.png", "expressions": ["right column"], "masks": [uncompressed_rle(box(0, 55, 40, 5))]},
        {"image": "images/b.png", "expressions": ["a cat"], "mask": None},
    ]  # fmt: skip
    (tmp_path / "refs.jsonl").write_text("\n".join(json.dumps(record) for record in records) + "\n")
    return tmp_path


def expected_masks() -> dict[str, np.ndarray]:
    """The mask each expression of `referring_root` targets."""
    return {
        "left thing": box(0, 0, 10, 10),
        "the top left block": box(0, 0, 10, 10),
        "square": polygon_mask(),
        "both blocks": box(0, 0, 10, 10) | box(30, 50, 10, 10),
        "middle bar": box(15, 0, 10, 60),
        "right column": box(0, 55, 40, 5),
        "a cat": np.zeros((H, W), np.uint8),
    }


def test_referring_evaluation_samples_decode_every_mask_form(referring_root):
    dataset = CustomReferringDataset(referring_root / "refs.jsonl", train=False)
    assert len(dataset) == 7 and dataset.source == "refs"
    seen = {}
    for i in range(len(dataset)):
        sample = check_sample(dataset[i], where=str(i))
        assert sample["task"] == "referring" and sample["masks"].shape == (1, H, W)
        seen[sample["query"]] = sample["masks"][0]
    expected = expected_masks()
    assert set(seen) == set(expected)
    for query, mask in expected.items():
        np.testing.assert_array_equal(seen[query], mask, err_msg=query)
    assert "What is left thing in this image?" in dataset[0]["conversation"][0]["content"]


def test_referring_training_samples_ask_several_targets_of_one_image(referring_root):
    dataset = CustomReferringDataset(referring_root / "refs.jsonl", train=True, max_turns=2)
    assert len(dataset) == 2  # one sample per image
    for i in range(2):
        sample = check_sample(dataset[i], where=str(i))
        assert sample["masks"].shape == (2, H, W)
        assert [turn["role"] for turn in sample["conversation"]] == ["user", "assistant"] * 2


@pytest.mark.parametrize(
    "record, message",
    [
        ({"image": "images/a.png", "mask": None}, "record 0 needs 'expressions'"),
        ({"image": "images/a.png", "expressions": ["x"]}, "record 0 needs exactly one of 'mask'"),
        ({"image": "images/a.png", "expressions": ["x"], "mask": [[1, 2, 3]]}, "polygon is a flat list"),
        ({"image": "images/a.png", "expressions": ["x"], "mask": {"counts": "abc"}}, "needs 'size' and 'counts'"),
        ({"image": "images/a.png", "expressions": ["x"], "mask": None, "label": 3}, "unknown key"),
    ],
)
def test_referring_format_errors_name_the_record(referring_root, record, message):
    path = referring_root / "bad.jsonl"
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=message):
        CustomReferringDataset(path)


def test_mask_of_another_size_is_an_error_naming_the_record(referring_root):
    path = referring_root / "wrong.json"
    Image.fromarray(np.ones((10, 10), np.uint8)).save(referring_root / "masks" / "small.png")
    path.write_text(json.dumps([{"image": "images/a.png", "expressions": ["x"], "mask": "masks/small.png"}]))
    with pytest.raises(ValueError, match="wrong.json record 0: .*small.png has size"):
        CustomReferringDataset(path)[0]


@pytest.fixture
def semantic_root(tmp_path):
    """Two images with label maps (P-mode and L-mode PNGs); value 0 is unnamed, 255 is not a class."""
    (tmp_path / "scenes").mkdir()
    labels = np.zeros((H, W), np.uint8)
    labels[:20] = 1
    labels[30:, 40:] = 2
    labels[0, 0] = 255
    Image.new("RGB", (W, H)).save(tmp_path / "scenes" / "0.jpg")
    Image.new("RGB", (W, H)).save(tmp_path / "scenes" / "1.jpg")
    palette = Image.fromarray(labels, mode="L").convert("P")
    palette.save(tmp_path / "scenes" / "0.png")
    Image.fromarray(np.where(labels == 2, 0, labels).astype(np.uint8)).save(tmp_path / "scenes" / "1.png")
    data = {"classes": [None, "road", "car"],
            "samples": [{"image": "scenes/0.jpg", "label": "scenes/0.png"},
                        {"image": "scenes/1.jpg", "label": "scenes/1.png"}]}  # fmt: skip
    (tmp_path / "scenes.json").write_text(json.dumps(data))
    return tmp_path, labels


def test_semantic_samples_ask_the_named_classes_present(semantic_root):
    root, labels = semantic_root
    dataset = CustomSemanticDataset(root / "scenes.json", train=False)
    first, second = check_sample(dataset[0]), check_sample(dataset[1])
    assert first["task"] == "semantic" and first["masks"].shape == (2, H, W)
    assert "road" in first["conversation"][0]["content"] and "car" in first["conversation"][2]["content"]
    np.testing.assert_array_equal(first["masks"][0], labels == 1)
    np.testing.assert_array_equal(first["masks"][1], labels == 2)
    assert second["masks"].shape == (1, H, W)  # no car in the second image
    by_dict = json.loads((root / "scenes.json").read_text())
    by_dict["classes"] = {"2": "car"}
    (root / "cars.json").write_text(json.dumps(by_dict))
    cars = CustomSemanticDataset(root / "cars.json", train=False)
    assert cars.class_names == {2: "car"} and cars[0]["masks"].shape == (1, H, W)


def test_recipe_mixes_own_data_with_rates(referring_root, semantic_root):
    """Entries name the loaders, take annotation paths relative to the data root and a rate of their own."""
    semantic_dir, _ = semantic_root  # both fixtures use the same tmp_path
    assert semantic_dir == referring_root
    recipe = {
        "datasets": [
            {"name": "custom_referring", "annotations": "refs.jsonl", "rate": 3},
            {"name": "custom_semantic", "annotations": "scenes.json"},
        ],
        "sample_rates": {"semantic": 2},
    }
    mixture = build_mixture(recipe, referring_root)
    assert len(mixture) == 3 * 2 + 2 * 2
    assert {check_sample(mixture[i])["source"] for i in range(len(mixture))} == {"refs", "scenes"}
    with pytest.raises(ValueError, match="no rate in .*give the entry a 'rate'"):
        build_mixture({**recipe, "sample_rates": {}}, referring_root)


def test_check_script_reports_ok_then_the_broken_record(referring_root, semantic_root):
    script = [sys.executable, str(REPO / "processing" / "check_custom.py"), "--annotations"]
    ok = subprocess.run([*script, str(referring_root / "refs.jsonl")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip() == (
        f"ok {referring_root / 'refs.jsonl'} (referring): 6 records, 7 expressions, 1 no-target records, 2 images"
    )
    assert check_custom(referring_root / "scenes.json")[-1].startswith("ok ") and "(semantic): 2 images" in (
        check_custom(referring_root / "scenes.json")[-1]
    )
    (referring_root / "masks" / "a_corner.png").unlink()
    broken = subprocess.run([*script, str(referring_root / "refs.jsonl")], capture_output=True, text=True)
    lines = broken.stdout.strip().splitlines()
    assert broken.returncode == 1
    assert lines[0].startswith("record 2 mask 1: ") and "a_corner.png does not exist" in lines[0]
    assert lines[-1].startswith("error ") and "1 problem(s)" in lines[-1]


def test_check_reports_every_problem_of_a_file_in_one_run(referring_root):
    """Hand-written broken records: each is reported (structure, JSON, masks that would decode empty by mistake,
    missing files), the good record still counts, and a missing file's hint is a command the checker accepts."""
    lines = [
        json.dumps({"image": "images/a.png", "expressions": ["left thing"], "mask": "masks/a_left.png"}),
        json.dumps({"image": "images/a.png", "mask": None}),
        '{"image": "images/a.png", "expressions": ["x"]',
        json.dumps({"image": "images/a.png", "expressions": ["off the picture"],
                    "mask": [[100, 100, 120, 100, 120, 130, 100, 130]]}),
        json.dumps({"image": "images/b.png", "expressions": ["runs"], "mask": {"size": [H, W], "counts": [100, 50]}}),
        json.dumps({"image": "images/none.png", "expressions": ["x"], "mask": None}),
        json.dumps({"image": "images/a.png", "expressions": ["two"], "masks": ["masks/nope.png", POLYGON]}),
        json.dumps({"image": "images/a.png", "expressions": ["line"], "mask": [[5, 5, 20, 5, 35, 5]]}),
    ]  # fmt: skip
    path = referring_root / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = check_custom(path)
    assert report[0].startswith(f"{path}:3 is not valid JSON: ")
    assert report[1] == "record 1 needs 'expressions', a non-empty list of strings."
    assert report[2].startswith("record 2: polygon 0 lies wholly outside the 60 x 40 image (x 100 to 120, y 100")
    assert report[3].startswith("record 3: an uncompressed RLE's run lengths add up to 150, not height x width = 40 x")
    assert report[4].startswith("record 4: ") and "none.png does not exist" in report[4]
    assert report[5].startswith("record 5 mask 0: ") and "nope.png does not exist" in report[5]
    assert report[6] == "record 6: the polygons cover no pixel (no area); give null for an expression that names " \
        "nothing."
    counts = "1 records, 1 expressions, 0 no-target records, 3 images"
    assert report[7] == f"error {path} (referring): 7 problem(s); {counts}"
    hint = re.search(r"run `python (.*?)`", report[4]).group(1).split()
    assert hint[:2] == ["processing/check_custom.py", "--annotations"] and Path(hint[2]) == path
    rerun = subprocess.run([sys.executable, *hint], capture_output=True, text=True, cwd=REPO)
    assert rerun.returncode == 1 and rerun.stdout.strip().splitlines() == report, rerun.stderr  # not a usage error


def test_masks_that_would_decode_empty_by_mistake_fail_in_training_too(referring_root):
    path = referring_root / "quiet.json"
    for mask in ([[100, 100, 120, 100, 120, 130]], {"size": [H, W], "counts": [H * W - 1]}):
        path.write_text(json.dumps([{"image": "images/a.png", "expressions": ["x"], "mask": mask}]))
        with pytest.raises(ValueError, match="quiet.json record 0: (polygon 0 lies wholly outside|an uncompressed)"):
            CustomReferringDataset(path)[0]


def test_compressed_rle_strings_written_by_pycocotools_decode_to_their_run_lengths():
    rng = np.random.default_rng(0)
    masks = [np.zeros((H, W), np.uint8), np.ones((H, W), np.uint8), box(3, 7, 20, 30), polygon_mask()]
    masks += [(rng.random((H, W)) < p).astype(np.uint8) for p in (0.05, 0.5, 0.95)]
    for mask in masks:
        counts = coco_mask.encode(np.asfortranarray(mask))["counts"]
        assert compressed_rle_run_lengths(counts) == uncompressed_rle(mask)["counts"]
        assert compressed_rle_run_lengths(counts.decode("ascii")) == uncompressed_rle(mask)["counts"]


# Hand-written compressed RLEs pycocotools would decode into uninitialised memory or past the mask: a character no
# encoder writes, a string ending inside a number ("b" continues), a negative run ("@": sign bit, no continuation),
# runs adding up to too few pixels ("?" is 15) or too many (an RLE of a wider mask)
BAD_COMPRESSED_RLES = [
    ("zzzz", "has 'z' at position 0; a COCO RLE string holds only the characters '0' to 'o'"),
    ("0b", "ends inside a run length"),
    ("@", "decodes to a negative run length at run 0"),
    ("", "decodes to run lengths that add up to 0, not height x width = 40 x 60 = 2400"),
    ("??", "decodes to run lengths that add up to 30, not height x width = 40 x 60 = 2400"),
]


def test_check_rejects_compressed_rles_that_do_not_cover_the_image_exactly(referring_root):
    half = compressed_rle(box(0, 0, H, W // 2))
    too_long = {"size": [H, W], "counts": coco_mask.encode(np.asfortranarray(np.ones((H, W + 1), np.uint8)))["counts"]
                .decode("ascii")}  # fmt: skip
    records = [{"image": "images/b.png", "expressions": ["ok"], "mask": half},
               {"image": "images/b.png", "expressions": ["wider"], "mask": too_long}]  # fmt: skip
    records += [{"image": "images/b.png", "expressions": ["x"], "masks": [half, {"size": [H, W], "counts": counts}]}
                for counts, _ in BAD_COMPRESSED_RLES]  # fmt: skip
    path = referring_root / "bad_rle.json"
    path.write_text(json.dumps(records))
    report = check_custom(path)
    assert report[0].startswith("record 1: the compressed RLE 'counts' ")
    assert "add up to 2440, not height x width = 40 x 60 = 2400" in report[0]
    for line, (index, (counts, message)) in zip(report[1:], enumerate(BAD_COMPRESSED_RLES, start=2)):
        assert line.startswith(f"record {index} mask 1: the compressed RLE 'counts' ") and message in line, line
    assert report[-1] == f"error {path} (referring): 6 problem(s); 1 records, 1 expressions, 0 no-target records, " \
        "1 images"
    assert check_custom(path) == report  # deterministic: nothing is decoded from a bad string
    script = subprocess.run([sys.executable, "processing/check_custom.py", "--annotations", str(path)],
                            capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert script.returncode == 1 and script.stdout.strip().splitlines() == report, script.stderr
    for index in range(1, len(records)):
        with pytest.raises(ValueError, match=f"bad_rle.json record {index}: the compressed RLE 'counts' "):
            CustomReferringDataset(path).record_mask(index, H, W)


def test_check_reports_every_bad_sample_of_a_semantic_file(semantic_root):
    root, _ = semantic_root
    data = {"classes": [None, "road"],
            "samples": [{"image": "scenes/0.jpg", "label": "scenes/0.png"}, {"image": "scenes/1.jpg"},
                        {"image": "scenes/missing.jpg", "label": "scenes/missing.png"}, "scenes/2.jpg"]}  # fmt: skip
    (root / "bad.json").write_text(json.dumps(data))
    report = check_custom(root / "bad.json")
    assert report[0] == f"{root / 'bad.json'} sample 1 needs 'image' and 'label' (paths)."
    assert report[1] == f"{root / 'bad.json'} sample 3 needs 'image' and 'label' (paths)."
    assert report[2].startswith("sample 1: ") and "missing.png does not exist" in report[2]
    assert "--annotations" in report[2] and "--root" not in report[2]
    summary = "3 problem(s); 1 images, 0 images without a named class, 1 classes"
    assert report[3] == f"error {root / 'bad.json'} (semantic): {summary}"
