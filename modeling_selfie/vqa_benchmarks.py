"""The VQA and multimodal benchmarks of `python -m modeling_selfie.evaluate_vqa` (paper Tab. 9 / Tab. 13): how
each is asked (InternVL's prompt suffixes, MMBench's option lines) and which metric scores it. Shared by the argument
parser (`modeling_selfie.evaluate_vqa`, no torch), the evaluation (`modeling_selfie.evaluation_vqa`) and the VQA
training data (`modeling_selfie.data.vqa`)."""

import re
from dataclasses import dataclass

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."  # InternVL's suffix of short answers
VIZWIZ_PROMPT = "When the provided information is insufficient, respond with 'Unanswerable'. " + SHORT_ANSWER_PROMPT
MMBENCH_PROMPT = "Answer with the option's letter from the given choices directly."
MMBENCH_PROMPT_CN = "请直接回答选项字母。"  # MMBench-CN: asked in Chinese
CJK = re.compile(r"[\u4e00-\u9fff]")


@dataclass(frozen=True)
class Benchmark:
    """How one benchmark is asked and scored: its `metric` (a key of `evaluation_vqa.SCORERS`), the prompt suffix,
    the most new tokens, and the keys each record must have."""

    metric: str
    suffix: str
    max_new_tokens: int
    keys: tuple[str, ...] = ("image", "question", "answer")


BENCHMARKS = {
    "vqav2": Benchmark("vqa", SHORT_ANSWER_PROMPT, 10, ("image", "question", "answers")),
    "okvqa": Benchmark("vqa", SHORT_ANSWER_PROMPT, 10, ("image", "question", "answers")),
    "textvqa": Benchmark("vqa", SHORT_ANSWER_PROMPT, 10, ("image", "question", "answers")),
    "vizwiz": Benchmark("vqa", VIZWIZ_PROMPT, 10, ("image", "question", "answers")),
    "gqa": Benchmark("gqa", SHORT_ANSWER_PROMPT, 10),
    "pope": Benchmark("pope", SHORT_ANSWER_PROMPT, 100),
    "mme": Benchmark("mme", SHORT_ANSWER_PROMPT, 20, ("image", "question", "answer", "category")),
    "mmbench": Benchmark("mmbench", MMBENCH_PROMPT, 100, ("image", "question", "options", "answer")),
}


def with_suffix(question: str, suffix: str) -> str:
    """`question` followed by `suffix` after a space, unless it already ends with it."""
    question = question.strip()
    return question if question.endswith(suffix) else f"{question} {suffix}"


def mmbench_prompt(record: dict, options: dict[str, str]) -> str:
    """MMBench as InternVL asks it: the hint, the question, one "X. option" line per option, the instruction (in
    Chinese when the rest has Chinese characters)."""
    lines = [record["hint"]] if record.get("hint") else []
    body = "\n".join([*lines, record["question"].strip(), *(f"{letter}. {text}" for letter, text in options.items())])
    return f"{body}\n{MMBENCH_PROMPT_CN if CJK.search(body) else MMBENCH_PROMPT}"
