"""VQA loaders: LLaVA-Instruct-150k and VQAv2-style jsonl."""

import json

import pytest

from modeling_selfie.data.sample import check_sample
from modeling_selfie.data.vqa import SHORT_ANSWER_PROMPT, LlavaInstructDataset, VQAJsonlDataset

from .data_fixtures import write_llava_instruct, write_vqav2


def test_llava_conversations_drop_the_image_marker(tmp_path):
    write_llava_instruct(tmp_path)
    json_path = tmp_path / "llava_dataset" / "llava_instruct_150k.json"
    dataset = LlavaInstructDataset(json_path, tmp_path / "coco" / "train2017")
    assert len(dataset) == 2
    first, second = (check_sample(dataset[i]) for i in range(2))
    assert first["conversation"] == [
        {"role": "user", "content": "What are the colors of the bus in the image?"},
        {"role": "assistant", "content": "The bus in the image is white and red."},
        {"role": "user", "content": "What feature can be seen on the back of the bus?"},
        {"role": "assistant", "content": "The back of the bus features an advertisement."},
    ]
    assert second["conversation"][0]["content"] == "Where is the cat positioned in the image?"
    assert first["masks"].shape == (0, 24, 32) and second["masks"].shape == (0, 32, 24)
    assert (first["task"], first["source"]) == ("vqa", "llava_instruct") and first["image"].size == (32, 24)


def test_llava_turns_must_alternate(tmp_path):
    write_llava_instruct(tmp_path)
    path = tmp_path / "llava_dataset" / "llava_instruct_150k.json"
    records = json.loads(path.read_text())
    records[1]["conversations"].append({"from": "gpt", "value": "again"})
    path.write_text(json.dumps(records))
    dataset = LlavaInstructDataset(path, tmp_path / "coco" / "train2017")
    with pytest.raises(ValueError, match="record '000000052846': turn 2 is from 'gpt'"):
        dataset[1]


def test_vqa_jsonl_answers_and_question_suffix(tmp_path):
    written = write_vqav2(tmp_path)
    dataset = VQAJsonlDataset(written["path"], tmp_path)
    assert len(dataset) == 2  # the blank line is skipped
    first, second = (check_sample(dataset[i]) for i in range(2))
    assert first["conversation"] == [
        {"role": "user", "content": f"What color is the cat? {SHORT_ANSWER_PROMPT}"},
        {"role": "assistant", "content": "black"},
    ]
    assert second["conversation"][1]["content"] == "2"  # the majority of `answers`
    assert second["masks"].shape == (0, 20, 28) and second["source"] == "vqav2"
    plain = VQAJsonlDataset(written["path"], tmp_path, question_suffix="", source="okvqa")
    assert plain[0]["conversation"][0]["content"] == "What color is the cat?" and plain[0]["source"] == "okvqa"


def test_vqa_jsonl_errors_name_the_line(tmp_path):
    written = write_vqav2(tmp_path)
    written["path"].write_text(json.dumps({"image": "x.jpg", "question": "why?"}) + "\n")
    with pytest.raises(ValueError, match=r"vqav2_train\.jsonl line 1 has no 'answer'"):
        VQAJsonlDataset(written["path"], tmp_path)
    written["path"].write_text('{"image": "x.jpg", "answer": "a"}\n')
    with pytest.raises(ValueError, match=r"line 1 lacks the key 'question'"):
        VQAJsonlDataset(written["path"], tmp_path)
    written["path"].write_text('{"image": "x.jpg", "question": "q", "answer": "a"}\n')
    with pytest.raises(FileNotFoundError, match=r"x\.jpg.*processing/check_vqav2\.py"):
        VQAJsonlDataset(written["path"], tmp_path)[0]


def test_max_samples_keeps_a_seeded_subset(tmp_path):
    written = write_vqav2(tmp_path)
    subsets = {VQAJsonlDataset(written["path"], tmp_path, max_samples=1, seed=s).items[0][0] for s in range(8)}
    assert subsets == {1, 3}  # both records get picked by some seed; line numbers 1 and 3
    assert VQAJsonlDataset(written["path"], tmp_path, max_samples=1, seed=5).items == (
        VQAJsonlDataset(written["path"], tmp_path, max_samples=1, seed=5).items
    )
