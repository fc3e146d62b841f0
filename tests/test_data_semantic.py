"""Semantic / part loaders: ADE20K and COCO-Stuff label maps, PASCAL-Part and PACO-LVIS COCO files."""

import numpy as np
import pytest

from modeling_selfie.data.sample import check_sample
from modeling_selfie.data.semantic import (
    ADE20K_CLASSES,
    COCO_STUFF_CLASSES,
    COCO_STUFF_IDS,
    ADE20KDataset,
    CocoStuffDataset,
    PacoLvisDataset,
    PascalPartDataset,
    split_category_name,
)
from modeling_selfie.processing_selfie import ANSWERS, segmentation_answer, segmentation_question

from .data_fixtures import (
    box_mask,
    inside_box,
    training_questions,
    write_ade20k,
    write_cocostuff,
    write_paco_lvis,
    write_pascal_part,
)


def asked_names(sample: dict) -> list[str]:
    """The class names of the user turns, read back through the validation template."""
    prefix, suffix = segmentation_question("\0", "phrase").split("\0")
    return [turn["content"][len(prefix) : -len(suffix)] for turn in sample["conversation"][::2]]


def test_class_tables():
    assert len(ADE20K_CLASSES) == len(set(ADE20K_CLASSES)) == 150
    assert (ADE20K_CLASSES[0], ADE20K_CLASSES[12], ADE20K_CLASSES[149]) == ("wall", "person", "flag")
    assert len(COCO_STUFF_CLASSES) == len(COCO_STUFF_IDS) == 171
    named = dict(zip(COCO_STUFF_IDS, COCO_STUFF_CLASSES))
    assert (named[1], named[90], named[92], named[157], named[169], named[182]) == (
        "person", "toothbrush", "banner", "sky-other", "tree", "wood",
    )  # fmt: skip
    assert split_category_name("trash_can:lid") == ("trash can", "lid")
    assert split_category_name("bowl_(dish)") == ("bowl", None)


def test_ade20k_evaluation_asks_the_present_classes_in_label_order(tmp_path):
    labels = write_ade20k(tmp_path)["labels"]
    dataset = ADE20KDataset(tmp_path, "train")
    assert len(dataset) == 2
    sample = check_sample(dataset[0])
    assert asked_names(sample) == ["sky", "person", "flag"]
    assert [turn["content"] for turn in sample["conversation"][1::2]] == [segmentation_answer()] * 3
    for mask, value in zip(sample["masks"], (3, 13, 150)):
        assert np.array_equal(mask, (labels == value).astype(np.uint8))
    assert sample["task"] == "semantic" and sample["source"] == "ade20k"
    # image 2 has only label 0 (other): the next image is used instead
    assert asked_names(dataset[1]) == ["sky", "person", "flag"]


def test_ade20k_training_draws_up_to_max_classes_with_training_templates(tmp_path):
    labels = write_ade20k(tmp_path)["labels"]
    dataset = ADE20KDataset(tmp_path, "training", train=True, max_classes=2, seed=4)
    sample = check_sample(dataset[0])
    assert sample["masks"].shape == (2, 24, 32)
    values = {"sky": 3, "person": 13, "flag": 150}
    for question, answer, mask in zip(sample["conversation"][::2], sample["conversation"][1::2], sample["masks"]):
        name = next(n for n in values if question["content"] in training_questions(n))
        assert np.array_equal(mask, (labels == values[name]).astype(np.uint8)) and answer["content"] in ANSWERS


def test_ade20k_bad_split_and_missing_annotation(tmp_path):
    write_ade20k(tmp_path)
    with pytest.raises(ValueError, match="Unknown ADE20K split 'test'"):
        ADE20KDataset(tmp_path, "test")
    label = tmp_path / "ADEChallengeData2016" / "annotations" / "training" / "ADE_train_00000001.png"
    label.unlink()
    with pytest.raises(FileNotFoundError, match=r"ADE_train_00000001\.png.*processing/check_ade20k\.py"):
        ADE20KDataset(tmp_path, "train")[0]


def test_cocostuff_maps_values_to_names_and_skips_unlabeled_and_hyphenated(tmp_path):
    labels = write_cocostuff(tmp_path)["labels"]
    sample = check_sample(CocoStuffDataset(tmp_path, "train")[0])
    assert asked_names(sample) == ["person", "tree"]  # 156 (sky-other) and 255 (unlabeled) are not asked
    assert np.array_equal(sample["masks"][0], box_mask(24, 32, 2, 2, 10, 12))
    assert np.array_equal(sample["masks"][1], (labels == 168).astype(np.uint8))


def test_pascal_part_unions_the_instances_of_a_part_category(tmp_path):
    boxes = write_pascal_part(tmp_path)["boxes"]
    dataset = PascalPartDataset(tmp_path)
    assert len(dataset) == 1  # 2008_000002 has no annotation
    sample = check_sample(dataset[0])
    assert asked_names(sample) == ["dog head", "dog torso"]
    heads = sample["masks"][0]
    assert inside_box(heads * box_mask(30, 40, 0, 0, 14, 30), *boxes[1])
    assert inside_box(heads * box_mask(30, 40, 14, 0, 40, 30), *boxes[2])
    assert inside_box(sample["masks"][1], *boxes[3])


def test_part_names_in_training_read_both_ways(tmp_path):
    write_pascal_part(tmp_path)
    dataset = PascalPartDataset(tmp_path, train=True)
    questions = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        questions.update(turn["content"] for turn in check_sample(dataset[0])["conversation"][::2])
    assert questions <= training_questions("dog head") | training_questions("head of the dog") | training_questions(
        "dog torso"
    ) | training_questions("torso of the dog")
    assert questions & training_questions("head of the dog") and questions & training_questions("dog head")


def test_paco_lvis_reads_object_and_part_categories_over_coco_images(tmp_path):
    boxes = write_paco_lvis(tmp_path)["boxes"]
    dataset = PacoLvisDataset(tmp_path, "train")
    assert dataset.data_files() == [tmp_path / "coco" / "train2017" / "000000000139.jpg"]
    sample = check_sample(dataset[0])
    assert asked_names(sample) == ["cup", "cup handle", "trash can lid"]
    for mask, category in zip(sample["masks"], (1, 2, 3)):
        assert inside_box(mask, *boxes[category])
    assert sample["source"] == "paco_lvis"
