"""ReasonSeg loader: target / ignore / flag polygons, query kinds, one sample per query in evaluation."""

import pytest

from modeling_selfie.data.reasonseg import ReasonSegDataset
from modeling_selfie.data.sample import check_sample
from modeling_selfie.processing_selfie import ANSWERS, segmentation_answer, segmentation_question

from .data_fixtures import box_mask, inside_box, training_questions, write_reasonseg


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
