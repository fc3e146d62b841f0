"""RefCOCO-family loader on a tiny REFER-layout dataset: masks from polygons and RLE, prompts, the restricted
unpickler, and errors that name the bad input."""

import collections
import datetime
import pickle

import numpy as np
import pytest

from modeling_selfie.data.refer import ReferringDataset, load_plain_pickle
from modeling_selfie.data.sample import check_sample
from modeling_selfie.processing_selfie import ANSWERS, segmentation_answer, segmentation_question

from .data_fixtures import inside_box, training_questions, write_refer_dataset


@pytest.fixture
def refcoco(tmp_path):
    return tmp_path, write_refer_dataset(tmp_path)


def test_evaluation_samples_are_one_per_sentence_with_the_validation_template(refcoco):
    root, written = refcoco
    dataset = ReferringDataset(root, "refcoco", "train")
    sentences = [s["sent"] for ref in written["refs"] if ref["split"] == "train" for s in ref["sentences"]]
    assert len(dataset) == len(sentences) == 3
    for index, sentence in enumerate(sentences):
        sample = check_sample(dataset[index])
        assert sample["conversation"] == [
            {"role": "user", "content": segmentation_question(sentence, "phrase")},
            {"role": "assistant", "content": segmentation_answer()},
        ]
        assert (sample["query"], sample["query_kind"]) == (sentence, "phrase")
        assert (sample["task"], sample["source"]) == ("referring", "refcoco")
        assert sample["image"].size == (40, 30) and sample["masks"].dtype == np.uint8


def test_masks_come_from_polygons_and_from_uncompressed_and_compressed_rle(refcoco):
    root, written = refcoco
    train = ReferringDataset(root, "refcoco", "train")
    assert inside_box(train[0]["masks"][0], *written["boxes"][11])  # ref 100, polygon
    assert np.array_equal(train[2]["masks"][0], written["masks"][12])  # ref 101, uncompressed RLE
    val = ReferringDataset(root, "refcoco", "val")
    assert len(val) == 1 and val[0]["image"].size == (36, 28)
    assert np.array_equal(val[0]["masks"][0], written["masks"][21])  # compressed RLE


def test_training_samples_are_one_per_image_with_random_sentences_and_templates(refcoco):
    root, written = refcoco
    dataset = ReferringDataset(root, "refcoco", "train", train=True, max_turns=2, seed=3)
    assert len(dataset) == 1  # the train refs all lie on image 1
    by_sentence = {s["sent"]: ref["ann_id"] for ref in written["refs"] for s in ref["sentences"]}
    sample = check_sample(dataset[0])
    turns = sample["conversation"]
    assert [turn["role"] for turn in turns] == ["user", "assistant"] * 2 and sample["masks"].shape == (2, 30, 40)
    asked = []
    for k, (question, answer) in enumerate(zip(turns[::2], turns[1::2])):
        sentence = next(s for s in by_sentence if question["content"] in training_questions(s))
        asked.append(sentence)
        assert answer["content"] in ANSWERS
        if by_sentence[sentence] == 12:
            assert np.array_equal(sample["masks"][k], written["masks"][12])
        else:
            assert inside_box(sample["masks"][k], *written["boxes"][11])
    assert len(set(asked)) == 2 and "query" not in sample


def test_training_samples_are_reproducible_and_change_with_the_epoch(refcoco):
    root, _ = refcoco
    first = ReferringDataset(root, "refcoco", "train", train=True, seed=0)
    second = ReferringDataset(root, "refcoco", "train", train=True, seed=0)
    assert first[0]["conversation"] == second[0]["conversation"]
    conversations = set()
    for epoch in range(6):
        first.set_epoch(epoch)
        conversations.add(str(first[0]["conversation"]))
    assert len(conversations) > 1
    assert len(first[0]["conversation"]) == 6  # max_turns=3 of the image's 3 sentences


def test_refclef_reads_saiapr_images(tmp_path):
    write_refer_dataset(tmp_path, "refclef", "berkeley")
    dataset = ReferringDataset(tmp_path, "refclef", "train", split_by="berkeley")
    assert dataset.image_path(1) == tmp_path / "images" / "saiapr_tc-12" / "00" / "images" / "1.jpg"
    assert dataset[0]["image"].size == (40, 30)


def test_restricted_unpickler_reads_plain_containers_and_refuses_objects(refcoco, tmp_path):
    root, written = refcoco
    assert load_plain_pickle(root / "refcoco" / "refs(unc).p") == written["refs"]
    refs_file = root / "refcoco" / "refs(unc).p"
    refs_file.write_bytes(pickle.dumps([{"split": "train", "when": datetime.date(2020, 1, 1)}], protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refs\(unc\)\.p.*datetime\.date"):
        ReferringDataset(root, "refcoco", "train")
    refs_file.write_bytes(pickle.dumps(collections.OrderedDict(split="train")))  # even a standard-library class
    with pytest.raises(pickle.UnpicklingError, match="collections.OrderedDict; only plain containers"):
        load_plain_pickle(refs_file)


def test_missing_files_raise_errors_naming_the_path_and_the_check_script(refcoco):
    root, written = refcoco
    image = written["image_dir"] / "COCO_train2014_000000000001.jpg"
    image.unlink()
    dataset = ReferringDataset(root, "refcoco", "train")
    with pytest.raises(FileNotFoundError, match=f"{image}.*processing/check_refer.py"):
        dataset[0]
    (root / "refcoco" / "instances.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"refcoco/instances\.json.*processing/check_refer\.py"):
        ReferringDataset(root, "refcoco", "train")


def test_bad_dataset_split_or_split_by_are_named(refcoco):
    root, _ = refcoco
    with pytest.raises(ValueError, match=r"no ref in split 'testA'; its splits are \['train', 'val'\]"):
        ReferringDataset(root, "refcoco", "testA")
    with pytest.raises(ValueError, match="refcoco\\+ has no split_by 'umd'"):
        ReferringDataset(root, "refcoco+", "train", split_by="umd")
    with pytest.raises(ValueError, match="Unknown referring dataset 'refcocoh'"):
        ReferringDataset(root, "refcocoh", "train")
    with pytest.raises(IndexError, match="refcoco has 3 samples"):
        ReferringDataset(root, "refcoco", "train")[3]


def test_overlapping_polygons_drop_leaves_rle_targets_alone_and_checks_its_value(refcoco):
    root, written = refcoco
    dropped = ReferringDataset(root, "refcoco", "train", overlapping_polygons="drop", lowercase=True)
    kept = ReferringDataset(root, "refcoco", "train")
    for index in range(len(kept)):  # ann 11 is one polygon, ann 12 an RLE: nothing overlaps, nothing changes
        assert np.array_equal(dropped[index]["masks"], kept[index]["masks"])
    assert np.array_equal(dropped[2]["masks"][0], written["masks"][12])
    with pytest.raises(ValueError, match="overlapping_polygons must be one of \\('keep', 'drop'\\), got 'sum'"):
        ReferringDataset(root, "refcoco", "train", overlapping_polygons="sum")
