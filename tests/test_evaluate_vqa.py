"""VQA benchmarks (paper Tab. 9 / Tab. 13): the standard metrics on answers scored by hand, and the CLI end to end
on hand-written JSON Lines files with a checkpoint written by transformers' `InternVLForConditionalGeneration` whose
weights are set by hand so that it answers one known word whatever it is asked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

from modeling_selfie.evaluate_vqa import main
from modeling_selfie.evaluation_vqa import score_mmbench
from modeling_selfie.vqa_benchmarks import mmbench_prompt
from modeling_selfie.vqa_metrics import (
    CONTRACTIONS,
    binary_scores,
    circular_options,
    gqa_correct,
    mmbench_letter,
    mme_answer,
    mme_scores,
    normalize_vqa_answer,
    pope_answer,
    vqa_accuracy,
)

from .internvl_artifacts import write_internvl3_hf_folder

SHORT = "Answer the question using a single word or phrase."


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two dogs.", "2 dogs"),
        ("the cat", "cat"),
        ("dont", "don't"),
        ("1,000", "1000"),
        ("Yes!", "yes"),
        ("t-shirt", "t shirt"),
        ("3.5", "3.5"),
        ("A\tred\nbus", "red bus"),
    ],
)
def test_vqa_answers_are_normalised_as_the_vqa_evaluation_does(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


# Tricky answers and what the official code makes of them. Expected values computed by running, outside this
# repository: lmms-eval 0.7.3's `EvalAIAnswerProcessor` (the VQA API's `vqaEval.py` rules; InternVL's
# `textvqa_eval.py` has the same code), MME's `tools/eval_tool/calculation.py` (BradyFU/Awesome-Multimodal-Large-
# Language-Models, branch Evaluation) and VLMEvalKit's `can_infer` (vlmeval/utils/matching_util.py, exact matching).
EVALAI_NORMALISED = [
    ("were", "were"), ("well", "well"), ("shed", "shed"), ("id", "id"), ("shell", "shell"), ("wed", "wed"),
    ("lets", "lets"), ("Im", "im"), ("Ive", "ive"),  # not in the table (the capital-I keys never match)
    ("hes", "he's"), ("whats", "what's"), ("twas", "'twas"), ("oclock", "o'clock"),
    ("couldn'tve", "couldn't've"), ("yall'll", "y'all'll"), ("somebody'd", "somebodyd"),  # the table's own quirk
    ("a/-b t-shirt", "b t shirt"), ("x/-y", "x y"), ("A-B (c)", "b c"),  # marks judged on the answer as given
    ("it's 5 o'clock", "it 's 5 o'clock"), ("1,000.5 m", "1000.5 m"), ("a.b.c", "abc"), ("$5.00", "$5.00"),
    ("." * 40 + "x", "." * 8 + "x"),  # at most 32 periods go
]


@pytest.mark.parametrize("raw, normalized", EVALAI_NORMALISED)
def test_vqa_answers_are_normalised_as_the_evalai_processor_does(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_vqa_contractions_are_the_official_table():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["dont"] == "don't" and CONTRACTIONS["couldn'tve"] == "couldn't've"
    assert not {"were", "well", "shed", "id", "ill", "its", "shell", "wed", "lets"} & set(CONTRACTIONS)
    # ordinary words are no longer turned into contractions, the official forms still are
    assert vqa_accuracy("were", ["we're"] * 10) == 0.0 and vqa_accuracy("were", ["were"] * 10) == 1.0
    assert vqa_accuracy("couldn'tve", ["couldn't've"] * 3 + ["no"] * 7) == pytest.approx(0.9)


def test_vqa_accuracy_averages_min_matches_over_3_on_the_leave_one_out_subsets():
    # 2 of 10 humans said "yes": 2 subsets keep 1 match (1/3), 8 keep 2 (2/3) -> (2/3 + 16/3) / 10 = 0.6
    assert vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx(0.6)
    # 3 said "Yes." -> 3 subsets keep 2 (2/3), 7 keep 3 (1) -> (2 + 7) / 10 = 0.9
    assert vqa_accuracy("Yes", ["Yes."] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("two", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_accuracy("cat", [])


def test_gqa_pope_mme_and_mmbench_answer_parsing():
    assert gqa_correct("Yes.", "yes") and gqa_correct(" left ", "left") and not gqa_correct("the left", "left")
    assert pope_answer("No, there is no dog.") == "no" and pope_answer("There is not.") == "no"
    assert pope_answer("Yes. No doubt.") == "yes" and pope_answer("Nope") == "yes"  # only the first sentence's words
    assert [mme_answer(text) for text in ("Yes", "no.", "True", "Yesterday", "maybe")] == [
        "yes", "no", "other", "yes", "other",
    ]  # fmt: skip
    options = {"A": "cat", "B": "dog"}
    assert [mmbench_letter(text, options) for text in ("B", "(A) cat", "B. dog", "dog", "C", "Both")] == [
        "B", "A", "B", "B", None, None,
    ]  # fmt: skip


def test_pope_scores_by_hand():
    # TP 2, FP 1, TN 1, FN 1
    scores = binary_scores(["yes", "yes", "yes", "no", "no"], ["yes", "yes", "no", "no", "yes"])
    assert scores == pytest.approx(
        {"accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 3 / 5, "count": 5}
    )
    nothing_right = binary_scores(["yes", "yes"], ["no", "no"])
    assert (nothing_right["precision"], nothing_right["recall"], nothing_right["f1"]) == (0.0, 0.0, 0.0)


def test_mme_scores_are_accuracy_plus_accuracy_plus_per_subtask():
    items = [
        {"category": "existence", "image": "a.png", "prediction": "yes", "answer": "Yes"},
        {"category": "existence", "image": "a.png", "prediction": "yes", "answer": "No"},
        {"category": "existence", "image": "b.png", "prediction": "no", "answer": "No"},
        {"category": "existence", "image": "b.png", "prediction": "yes", "answer": "Yes"},
        {"category": "code_reasoning", "image": "c.png", "prediction": "other", "answer": "Yes"},
        {"category": "code_reasoning", "image": "c.png", "prediction": "no", "answer": "No"},
    ]
    scores = mme_scores(items)
    assert scores["subtasks"]["existence"] == {"accuracy": 75.0, "accuracy_plus": 50.0, "score": 125.0}
    assert scores["subtasks"]["code_reasoning"] == {"accuracy": 50.0, "accuracy_plus": 0.0, "score": 50.0}
    assert (scores["perception"], scores["cognition"], scores["total"]) == (125.0, 50.0, 175.0)


MME_PERCEPTION_TASKS = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                        "artwork", "OCR")  # fmt: skip
MME_COGNITION_TASKS = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
# (subtask, image, answer, prediction); every subtask not named here gets one image whose two questions are right
MME_TRICKY = [
    ("existence", "1.png", "Yes", "True"), ("existence", "1.png", "No", "False"),
    ("existence", "2.png", "Yes", "Yes"), ("existence", "2.png", "No", "No."),
    ("existence", "3.png", "Yes", "yes, there is one"), ("existence", "3.png", "No", "Not at all"),
    ("existence", "4.png", "Yes", "The answer is yes"), ("existence", "4.png", "No", "no"),
    ("count", "5.png", "Yes", "Yesterday"), ("count", "5.png", "No", "None"),
    ("color", "6.png", "Yes", " yes"), ("color", "6.png", "No", "  no"),
    ("OCR", "7.png", "Yes", "是的"), ("OCR", "7.png", "No", "不是"),
    ("OCR", "10.png", "Yes", "yes"), ("OCR", "10.png", "No", "no, none"),
    ("code_reasoning", "8.png", "Yes", "TRUE."), ("code_reasoning", "8.png", "No", "false"),
    ("code_reasoning", "9.png", "Yes", "True, it prints 3"), ("code_reasoning", "9.png", "No", "N/A"),
    ("code_reasoning", "11.png", "Yes", "Yes"), ("code_reasoning", "11.png", "No", "no"),
]  # fmt: skip


@pytest.mark.parametrize(
    "internvl, perception, cognition, subtasks",
    [  # calculation.py on the answers as given, and on InternVL's post-processed answers
        (False, 1812.5, 666.6666666666666, {"existence": 112.5, "OCR": 100.0, "code_reasoning": 66.66666666666666}),
        (True, 1962.5, 750.0, {"existence": 162.5, "code_reasoning": 150.0}),
    ],
)
def test_mme_scores_tricky_answers_as_calculation_py_does(internvl, perception, cognition, subtasks):
    items = list(MME_TRICKY)
    for task in MME_PERCEPTION_TASKS + MME_COGNITION_TASKS:
        if task not in {item[0] for item in MME_TRICKY}:
            items += [(task, "x.png", "Yes", "Yes"), (task, "x.png", "No", "No")]
    scores = mme_scores([
        {"category": task, "image": image, "answer": answer, "prediction": mme_answer(text, internvl)}
        for task, image, answer, text in items
    ])  # fmt: skip
    assert (scores["perception"], scores["cognition"]) == pytest.approx((perception, cognition))
    assert {task: s["score"] for task, s in scores["subtasks"].items() if s["score"] != 200} == pytest.approx(subtasks)


# Answers to "Which animal? A. cat B. dog" (right: B) and to its CircularEval rotation "A. dog B. cat" (right: A)
MMBENCH_TRICKY = [
    (("The answer is B.", "The answer is A."), ("B", "A")),
    (("Answer: B", "Answer: A"), ("B", "A")),
    (("a dog", "a dog"), ("B", "A")),  # the text of one option inside the answer
    (("B, because it barks", "A, because it barks"), ("B", "A")),
    (("B", "(A) dog"), ("B", "A")),
    (("the answer is b", "A or B? The answer is A"), ("B", "A")),
    (("B, because the animal in the picture barks", "A"), (None, "A")),  # the letter is not among the last 4 words
    (("I think it is a dog, not a cat", "A"), (None, "A")),  # two option texts, and too long
    (("Cannot determine the answer: B", "A"), (None, "A")),  # a refusal (VLMEvalKit's "Z")
]


def test_mmbench_letters_and_circular_accuracy_as_vlmevalkit_extracts_them():
    records = []
    for answers, letters in MMBENCH_TRICKY:
        rotations = circular_options({"A": "cat", "B": "dog"}, "B")
        assert [mmbench_letter(text, options) for text, (options, _) in zip(answers, rotations)] == list(letters)
        records.append({"rotations": [
            {"letter": mmbench_letter(text, options), "correct": correct}
            for text, (options, correct) in zip(answers, rotations)
        ]})  # fmt: skip
    assert score_mmbench(records) == pytest.approx({"accuracy": 6 / 9, "circular_accuracy": 6 / 9, "count": 9})
    options = {"A": "cat", "B": "dog", "C": "cow"}
    assert mmbench_letter("A dog", options) == "A"  # "A" stands alone: read as the letter, as VLMEvalKit does
    assert mmbench_letter("B or C", options) is None and mmbench_letter("a bird", options) is None
    assert mmbench_letter("Z", options) is None


def test_circular_options_rotate_the_texts_and_follow_the_answer():
    rotations = circular_options({"A": "cat", "B": "dog", "C": "cow"}, "B")
    assert rotations == [
        ({"A": "cat", "B": "dog", "C": "cow"}, "B"),
        ({"A": "dog", "B": "cow", "C": "cat"}, "A"),
        ({"A": "cow", "B": "cat", "C": "dog"}, "C"),
    ]
    assert circular_options({"A": "cat", "B": "dog"}, "A", circular=False) == [({"A": "cat", "B": "dog"}, "A")]


def test_mmbench_cn_is_asked_in_chinese():
    prompt = mmbench_prompt({"question": "哪种动物？"}, {"A": "猫", "B": "狗"})
    assert prompt == "哪种动物？\nA. 猫\nB. 狗\n请直接回答选项字母。"


def write_one_word_internvl(folder: Path, word: str) -> None:
    """A tiny InternVL3 folder (transformers' class) that answers `word` to anything: every layer's attention and
    MLP output projections are zero, so each position's final state is its own token's embedding; the tokens of
    "\\n" (the end of the generation prompt) and of `word` get one-hot embeddings, and the output rows chain them:
    "\\n" -> word[0] -> ... -> word[-1] -> <|im_end|>."""
    model = write_internvl3_hf_folder(folder, layout="saved")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    chain = [tokenizer.token_to_id("Ċ"), *tokenizer.encode(word).ids, tokenizer.token_to_id("<|im_end|>")]
    assert len(set(chain)) == len(chain), "the chain's tokens must differ"
    text = model.model.language_model
    with torch.no_grad():
        for layer in text.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        text.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for dim, (current, following) in enumerate(zip(chain, chain[1:])):
            text.embed_tokens.weight[current] = 0.0
            text.embed_tokens.weight[current, dim] = 1.0
            model.lm_head.weight[following, dim] = 1.0
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def yes_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("yes_model")
    write_one_word_internvl(folder, "yes")
    return folder


def write_data(folder: Path, records: list[dict]) -> Path:
    """PNG images written by PIL and a JSON Lines file of `records`."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in sorted({record["image"] for record in records}):
        pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["--device", "cpu", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_vqav2_scores_the_models_answer_by_hand(tmp_path, yes_model, capsys):
    data = write_data(
        tmp_path,
        [
            {"image": "images/a.png", "question": "Is it a cat?", "answers": ["yes"] * 2 + ["no"] * 8},
            {"image": "images/b.png", "question": "Is it red?", "answers": [{"answer": "Yes."}] * 3 + ["no"] * 7},
            {"image": "images/a.png", "question": "What is it?", "answers": ["dog"] * 10},
        ],
    )
    code, out, err = run(capsys, "--benchmark", "vqav2", "--data", data, "--model", yes_model, "--output",
                         tmp_path / "out.json")  # fmt: skip
    assert code == 0, err
    results = json.loads((tmp_path / "out.json").read_text())
    assert [item["prediction"] for item in results["items"]] == ["yes", "yes", "yes"]
    assert results["items"][0]["prompt"] == f"Is it a cat? {SHORT}"
    assert results["system_message"] == "You are an helpful assistant."  # SELF1E's, given to a plain InternVL3 folder
    assert [item["score"] for item in results["items"]] == pytest.approx([0.6, 0.9, 0.0])
    assert results["metrics"] == pytest.approx({"accuracy": 0.5, "count": 3})
    assert out.startswith("vqav2: accuracy 0.5000 (count 3")


def test_cli_vizwiz_and_gqa_prompts_and_scores(tmp_path, yes_model, capsys):
    data = write_data(
        tmp_path,
        [
            {"image": "images/a.png", "question": "What is this?", "answer": "yes"},
            {"image": "images/a.png", "question": f"Is it on? {SHORT}", "answer": "Yes"},
            {"image": "images/b.png", "question": "Which side?", "answer": "left"},
        ],
    )
    code, _, err = run(capsys, "--benchmark", "gqa", "--data", data, "--model", yes_model, "--output",
                       tmp_path / "gqa.json")  # fmt: skip
    assert code == 0, err
    results = json.loads((tmp_path / "gqa.json").read_text())
    assert results["metrics"]["accuracy"] == pytest.approx(2 / 3)
    assert results["items"][1]["prompt"] == f"Is it on? {SHORT}"  # the suffix is not doubled
    vizwiz = tmp_path / "vizwiz.jsonl"
    vizwiz.write_text(json.dumps({"image": "images/a.png", "question": "What is this?", "answers": ["unanswerable"]}))
    code, _, err = run(capsys, "--benchmark", "vizwiz", "--data", vizwiz, "--model", yes_model, "--output",
                       tmp_path / "vizwiz.json", "--system-message", "", "--max-tiles", 2)  # fmt: skip
    assert code == 0, err
    results = json.loads((tmp_path / "vizwiz.json").read_text())
    assert (results["system_message"], results["max_tiles"]) == ("", 2)
    item = results["items"][0]
    assert item["prompt"] == (
        "What is this? When the provided information is insufficient, respond with 'Unanswerable'. " + SHORT
    )
    assert item["score"] == 0.0


def test_cli_pope_per_category_and_mean(tmp_path, yes_model, capsys):
    answers = {"random": ["yes", "no", "yes"], "adversarial": ["no", "no"]}
    records = [
        {"image": f"images/{category}{i}.png", "question": "Is there a dog in the image?", "answer": answer,
         "category": category}
        for category, labels in answers.items() for i, answer in enumerate(labels)
    ]  # fmt: skip
    code, _, err = run(capsys, "--benchmark", "pope", "--data", write_data(tmp_path, records), "--model", yes_model,
                       "--output", tmp_path / "pope.json")  # fmt: skip
    assert code == 0, err
    metrics = json.loads((tmp_path / "pope.json").read_text())["metrics"]
    # random: TP 2, FP 1 -> accuracy 2/3, precision 2/3, recall 1, F1 0.8; adversarial: FP 2 -> all 0, yes ratio 1
    assert metrics["categories"]["random"] == pytest.approx(
        {"accuracy": 2 / 3, "precision": 2 / 3, "recall": 1.0, "f1": 0.8, "yes_ratio": 1.0, "count": 3}
    )
    assert metrics["categories"]["adversarial"]["f1"] == 0.0
    assert (metrics["f1"], metrics["accuracy"], metrics["recall"], metrics["yes_ratio"]) == pytest.approx(
        (0.4, 1 / 3, 0.5, 1.0)
    )


def test_cli_mme_perception_and_cognition(tmp_path, yes_model, capsys):
    records = [
        {"image": "images/a.png", "question": "Is there a cat?", "answer": "Yes", "category": "existence"},
        {"image": "images/a.png", "question": "Is there a cow?", "answer": "No", "category": "existence"},
        {"image": "images/b.png", "question": "Is there a dog?", "answer": "Yes", "category": "existence"},
        {"image": "images/b.png", "question": "Is there a car?", "answer": "Yes", "category": "existence"},
        {"image": "images/c.png", "question": "Is the output 5?", "answer": "No", "category": "code_reasoning"},
        {"image": "images/c.png", "question": "Is the output 12?", "answer": "Yes", "category": "code_reasoning"},
    ]
    code, _, err = run(capsys, "--benchmark", "mme", "--data", write_data(tmp_path, records), "--model", yes_model,
                       "--output", tmp_path / "mme.json")  # fmt: skip
    assert code == 0, err
    metrics = json.loads((tmp_path / "mme.json").read_text())["metrics"]
    assert metrics["subtasks"]["existence"] == {"accuracy": 75.0, "accuracy_plus": 50.0, "score": 125.0}
    assert metrics["subtasks"]["code_reasoning"] == {"accuracy": 50.0, "accuracy_plus": 0.0, "score": 50.0}
    assert (metrics["perception"], metrics["cognition"], metrics["total"]) == (125.0, 50.0, 175.0)


def test_cli_mmbench_single_pass_and_circular(tmp_path, capsys):
    model = tmp_path / "b_model"
    write_one_word_internvl(model, "B")
    records = [
        {"image": "images/a.png", "question": "Which animal?", "hint": "A farm.", "answer": "B",
         "options": {"A": "cat", "B": "dog", "C": "cow"}},
        {"image": "images/b.png", "question": "Which colour?", "answer": "A", "options": {"A": "red", "B": "blue"}},
    ]  # fmt: skip
    code, _, err = run(capsys, "--benchmark", "mmbench", "--data", write_data(tmp_path, records), "--model", model,
                       "--output", tmp_path / "mmbench.json")  # fmt: skip
    assert code == 0, err
    results = json.loads((tmp_path / "mmbench.json").read_text())
    first = results["items"][0]["rotations"]
    assert first[0]["prompt"] == (
        "A farm.\nWhich animal?\nA. cat\nB. dog\nC. cow\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert [(r["letter"], r["correct"]) for r in first] == [("B", "B"), ("B", "A"), ("B", "C")]
    # the first question is right in its given order but not in every rotation; the second is wrong
    assert results["metrics"] == {"accuracy": 0.5, "circular_accuracy": 0.0, "count": 2}


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "questions.jsonl line 1 is not valid JSON"),
        ('{"image": "images/a.png", "question": "q?"}', "questions.jsonl line 1 lacks 'answers'"),
        ('{"image": "images/zz.png", "question": "q?", "answers": ["a"]}', "line 1: image not found: "),
        ('{"image": "images/a.png", "question": "q?", "answers": []}', "line 1 has an empty 'answers' list"),
    ],
)
def test_cli_bad_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, line, message):
    data = write_data(tmp_path, [{"image": "images/a.png", "question": "q?", "answers": ["a"]}])
    data.write_text(line + "\n")
    code, out, err = run(capsys, "--benchmark", "okvqa", "--data", data, "--model", tmp_path / "no_model",
                         "--output", tmp_path / "out.json")  # fmt: skip
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out.json").exists()


def test_cli_refuses_a_folder_without_a_model(tmp_path, capsys):
    data = write_data(tmp_path, [{"image": "images/a.png", "question": "q?", "answers": ["a"]}])
    code, _, err = run(capsys, "--benchmark", "textvqa", "--data", data, "--model", tmp_path)
    assert code == 2 and err.strip() == f"error: --model {tmp_path} is not a model folder (no config.json)"


def test_cli_answers_with_a_saved_selfie_folder(tmp_path):
    """The shipped demo model (a SELFIE folder, word-level vocabulary) answers every question with a segmentation
    template, as its card says; here that answer is scored as any other. Run as a user runs it, in a fresh process,
    where the package does not register its Auto classes when imported."""
    from modeling_selfie.cli import default_model_dir
    from modeling_selfie.processing_selfie import ANSWERS

    data = write_data(tmp_path, [{"image": "images/a.png", "question": "What colour is the star?", "answer": "red"}])
    command = [sys.executable, "-m", "modeling_selfie.evaluate_vqa", "--benchmark", "gqa", "--data", data, "--model",
               default_model_dir(), "--output", tmp_path / "gqa.json", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([str(word) for word in command], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("gqa: accuracy 0.0000 (count 1")
    results = json.loads((tmp_path / "gqa.json").read_text())
    prediction = results["items"][0]["prediction"]
    assert prediction.replace(" ", "") in {answer.replace(" ", "") for answer in ANSWERS}
    assert results["metrics"] == {"accuracy": 0.0, "count": 1}
