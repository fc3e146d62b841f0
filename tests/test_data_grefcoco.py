"""gRefCOCO through the referring loader: multi-target union, empty no-target masks."""

import numpy as np
import pytest

from modeling_selfie.data.refer import ReferringDataset
from modeling_selfie.data.sample import check_sample
from modeling_selfie.processing_selfie import segmentation_answer, segmentation_question

from .data_fixtures import box_mask, inside_box, write_grefcoco


@pytest.fixture
def grefcoco(tmp_path):
    return tmp_path, write_grefcoco(tmp_path)


def test_multi_target_union_single_target_and_no_target(grefcoco):
    root, written = grefcoco
    dataset = ReferringDataset(root, "grefcoco", "train")
    assert len(dataset) == 3
    both, nothing, cup = (check_sample(dataset[i]) for i in range(3))

    union = both["masks"][0]
    assert inside_box(union * box_mask(30, 40, 0, 0, 16, 14), *written["boxes"][11])
    assert inside_box(union * box_mask(30, 40, 16, 11, 40, 30), *written["boxes"][12])
    assert union.sum() > 0 and not union[:, 14:19].any()  # nothing between the two people

    assert nothing["masks"].shape == (1, 30, 40) and not nothing["masks"].any()
    assert nothing["conversation"][1]["content"] == segmentation_answer()  # still one [SEG], on an empty mask
    assert nothing["query"] == "the giraffe"
    assert np.array_equal(cup["masks"][0], written["masks"][13])
    assert cup["conversation"][0]["content"] == segmentation_question("the cup", "phrase")
    assert {s["source"] for s in (both, nothing, cup)} == {"grefcoco"}


def test_training_sample_of_the_image_asks_its_sentences(grefcoco):
    root, _ = grefcoco
    dataset = ReferringDataset(root, "grefcoco", "train", train=True, max_turns=3)
    assert len(dataset) == 1
    sample = check_sample(dataset[0])
    assert sample["masks"].shape == (3, 30, 40)
    empty = [k for k in range(3) if not sample["masks"][k].any()]
    assert len(empty) == 1 and "giraffe" in sample["conversation"][2 * empty[0]]["content"]


def test_missing_grefs_file_names_the_grefcoco_check_script(grefcoco):
    root, _ = grefcoco
    (root / "grefcoco" / "grefs(unc).json").unlink()
    with pytest.raises(FileNotFoundError, match=r"grefs\(unc\)\.json.*processing/check_grefcoco\.py"):
        ReferringDataset(root, "grefcoco", "val")
