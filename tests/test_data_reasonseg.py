"""ReasonSeg loader: target / ignore / flag polygons, query kinds, one sample per query in evaluation, and the
authors' OpenCV drawing (`--protocol self1e`)."""

import numpy as np
import pytest

from modeling_selfie.data.common import polygon_mask
from modeling_selfie.data.rasterize import opencv_polygon_mask
from modeling_selfie.data.reasonseg import ReasonSegDataset
from modeling_selfie.data.sample import check_sample
from modeling_selfie.processing_selfie import ANSWERS, segmentation_answer, segmentation_question

from .data_fixtures import box_mask, inside_box, training_questions, write_image, write_json, write_reasonseg


@pytest.fixture
def reasonseg(tmp_path):
    return tmp_path, write_reasonseg(tmp_path, "val")


def test_target_mask_leaves_out_ignore_regions_and_flags(reasonseg):
    root, written = reasonseg
    sample = check_sample(ReasonSegDataset(root, "val")[0])
    target, ignore = sample["masks"][0], sample["ignore_masks"][0]
    assert sample["masks"].shape == sample["ignore_masks"].shape == (1, 32, 48)
    assert inside_box(ignore, *written["ignore"])
    assert inside_box(target | ignore, *written["target"])  # the flag box (36..44) is in neither
    assert not (target & ignore).any()
    assert target[6, 6] == 1 and target[13, 13] == 0


def test_evaluation_samples_are_one_per_query_with_the_kind_of_the_file(reasonseg):
    root, _ = reasonseg
    dataset = ReasonSegDataset(root, "val")
    assert len(dataset) == 3
    queries = [(dataset[i]["query"], dataset[i]["query_kind"]) for i in range(3)]
    assert queries == [
        ("What in this kitchen keeps food cold?", "instruction"),
        ("Which object would you open to get milk?", "instruction"),
        ("the red cup", "phrase"),
    ]
    sample = dataset[2]
    assert sample["conversation"][0]["content"] == segmentation_question("the red cup", "phrase")
    assert sample["conversation"][1]["content"] == segmentation_answer()
    assert sample["task"] == "reasoning" and sample["masks"][0, 3, 3] == 1 and sample["masks"][0, 15, 25] == 0
    assert not sample["ignore_masks"].any()


def test_training_samples_are_one_per_image_with_the_instruction_templates(reasonseg):
    root, _ = reasonseg
    dataset = ReasonSegDataset(root, "val", train=True, seed=1)
    assert len(dataset) == 2
    sample = check_sample(dataset[0])
    asked = sample["conversation"][0]["content"]
    assert asked in training_questions("What in this kitchen keeps food cold?", "instruction") | training_questions(
        "Which object would you open to get milk?", "instruction"
    )
    assert sample["conversation"][1]["content"] in ANSWERS and "query" not in sample
    assert dataset[1]["conversation"][0]["content"] in training_questions("the red cup", "phrase")


def test_missing_split_and_missing_json_are_named(reasonseg):
    root, written = reasonseg
    with pytest.raises(FileNotFoundError, match=r"ReasonSeg/test.*processing/check_reasonseg\.py"):
        ReasonSegDataset(root, "test")
    (written["folder"] / "b.json").unlink()
    dataset = ReasonSegDataset(root, "val", train=True)
    assert written["folder"] / "b.json" in dataset.data_files()
    with pytest.raises(FileNotFoundError, match=r"b\.json.*processing/check_reasonseg\.py"):
        dataset[1]


def test_box_mask_helper_matches_polygon_fill(reasonseg):
    root, _ = reasonseg
    mask = ReasonSegDataset(root, "val")[0]["ignore_masks"][0]
    assert (mask == box_mask(32, 48, 10, 10, 17, 17)).all()  # PIL fills the outline too: 10..16 inclusive


def test_first_query_only_gives_one_evaluation_sample_per_image(reasonseg):
    root, written = reasonseg
    (written["folder"] / "c.jpg").write_bytes((written["folder"] / "b.jpg").read_bytes())
    (written["folder"] / "c.json").write_text('{"text": [], "is_sentence": false, "shapes": []}')  # nothing asked
    dataset = ReasonSegDataset(root, "val", first_query_only=True)
    queries = [dataset[i]["query"] for i in range(len(dataset))]
    assert queries == ["What in this kitchen keeps food cold?", "the red cup"]
    with pytest.raises(ValueError, match="first_query_only selects evaluation samples"):
        ReasonSegDataset(root, "val", train=True, first_query_only=True)


def test_opencv_polygons_truncate_points_and_follow_opencv_lines_and_scanlines():
    """Computed by hand from OpenCV's rules (points cast to int32; 8-connected lines; rows y0 <= y < y1 of each
    edge filled pairwise from ceil(left) to floor(right))."""
    # (1.7, 1.2), (6.9, 1.2), (1.7, 5.9) -> (1, 1), (6, 1), (1, 5). The edge (6, 1)-(1, 5), drawn left to right
    # from (1, 5): minor steps at k with (8k + 4) // 10 -> (1,5) (2,4) (3,3) (4,3) (5,2) (6,1). Scanlines between
    # x = 1 and x = 6 - 1.25 (y - 1): rows 1..4 fill 1-6, 1-4, 1-3, 1-2; row 5 holds the outline only.
    expected = np.zeros((8, 8), np.uint8)
    for row, last in ((1, 6), (2, 5), (3, 4), (4, 2), (5, 1)):
        expected[row, 1 : last + 1] = 1
    triangle = [[1.7, 1.2], [6.9, 1.2], [1.7, 5.9]]
    assert np.array_equal(opencv_polygon_mask(triangle, 8, 8), expected)
    assert not np.array_equal(polygon_mask(triangle, 8, 8), expected)  # PIL on the float points differs
    # a box past the right border: lines and fill clipped to the image, columns 2..5 of rows 1..4
    clipped = np.zeros((6, 6), np.uint8)
    clipped[1:5, 2:6] = 1
    assert np.array_equal(opencv_polygon_mask([[2, 1], [9, 1], [9, 4], [2, 4]], 6, 6), clipped)


def test_self1e_reasonseg_targets_are_drawn_as_opencv_does(tmp_path):
    folder = tmp_path / "reason_seg" / "ReasonSeg" / "val"
    write_image(folder / "c.jpg", 8, 8, seed=5)
    shapes = [{"label": "target", "points": [[1.7, 1.2], [6.9, 1.2], [1.7, 5.9]], "shape_type": "polygon"}]
    write_json(folder / "c.json", {"text": ["The Cup"], "is_sentence": False, "shapes": shapes})
    default = ReasonSegDataset(tmp_path, "val")[0]
    self1e = ReasonSegDataset(tmp_path, "val", first_query_only=True, opencv_polygons=True)[0]
    assert self1e["masks"][0].sum() == 18 and default["masks"][0].sum() != 18
    assert self1e["query"] == default["query"] == "The Cup"  # ReasonSeg text as written
