"""Visual question answering: LLaVA-Instruct-150k and VQAv2-style jsonl files.

VQA samples have no `[SEG]`: `masks` is `uint8` `[0, H, W]` and `task` is "vqa". They hold no randomness, so
training and evaluation samples are the same.

LLaVA-Instruct-150k (`llava_instruct_150k.json`) is a list of

    {"id": str, "image": "000000033471.jpg", "conversations": [{"from": "human" | "gpt", "value": str}, ...]}

with `image` a file name under `image_dir` (COCO train2017). The "<image>" marker is removed from the text (the
processor puts the image before the first user turn), turns before the first "human" one are dropped, and the
roles must then alternate user / assistant. A record without `image` is a text-only chat (`image` None).

A VQA jsonl file holds one JSON object per line with the keys

    image      path of the image, relative to `image_root` (or absolute)
    question   the question
    answer     the answer (str); when absent, `multiple_choice_answer` (str), else `answers`: a list of str or of
               {"answer": str} (VQAv2 annotations), of which the most frequent (the earliest on a tie) is used

(InternVL's `vqav2_train.jsonl` and the other InternVL VQA training files have this form). The user turn is the
question followed by `question_suffix`.
"""

import json
import random
from collections import Counter
from pathlib import Path

from ..vqa_benchmarks import SHORT_ANSWER_PROMPT
from .common import SelfieDataset, empty_masks, load_image, read_json, require_paths

IMAGE_MARKER = "<image>"
LLAVA_ROLES = {"human": "user", "gpt": "assistant"}


def read_json_line(line: str, where: str) -> dict:
    """Parse one jsonl line into a dict; errors name `where`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON: {error}") from error
    if not isinstance(record, dict):
        raise ValueError(f"{where} holds a {type(record).__name__}, not an object.")
    return record


def vqa_answer(record: dict, where: str) -> str:
    """The answer of a VQA record (see the module docstring for the keys read)."""
    if "answer" in record:
        return str(record["answer"])
    if "multiple_choice_answer" in record:
        return str(record["multiple_choice_answer"])
    answers = [a["answer"] if isinstance(a, dict) else a for a in record.get("answers", [])]
    if not answers:
        raise ValueError(f"{where} has no 'answer', 'multiple_choice_answer' or 'answers'.")
    counts = Counter(answers)
    return max(answers, key=lambda answer: counts[answer])  # max keeps the earliest of equal counts


def llava_conversation(turns: list[dict], where: str) -> list[dict]:
    """LLaVA `conversations` as chat turns: the "<image>" marker removed, leading non-human turns dropped."""
    while turns and turns[0]["from"] != "human":
        turns = turns[1:]
    conversation = []
    for i, turn in enumerate(turns):
        role = LLAVA_ROLES.get(turn["from"])
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError(f"{where}: turn {i} is from {turn['from']!r}; human and gpt turns must alternate.")
        conversation.append({"role": role, "content": turn["value"].replace(IMAGE_MARKER, "").strip()})
    if not conversation:
        raise ValueError(f"{where} has no human turn.")
    return conversation


class LlavaInstructDataset(SelfieDataset):
    """LLaVA-Instruct-150k (see the module docstring).

    Args:
        json_path: the `llava_instruct_150k.json` file.
        image_dir: the folder of the images named in the records (COCO train2017).
        train, seed, max_samples: see [`SelfieDataset`].
    """

    source = "llava_instruct"
    task = "vqa"
    check_script = "processing/check_llava_instruct.py"

    def __init__(
        self,
        json_path: str | Path,
        image_dir: str | Path,
        *,
        train: bool = False,
        seed: int = 0,
        max_samples: int | None = None,
    ):
        json_path, self.image_dir = self.expected_paths(json_path, image_dir)
        require_paths([json_path, self.image_dir], self.check_script)
        records = read_json(json_path, self.check_script)
        if not isinstance(records, list):
            raise ValueError(f"{json_path} holds a {type(records).__name__}, not a list of conversations.")
        self.json_path = json_path
        super().__init__(records, train=train, seed=seed, max_samples=max_samples)

    @classmethod
    def expected_paths(cls, json_path: str | Path, image_dir: str | Path) -> list[Path]:
        """The JSON file and the image folder."""
        return [Path(json_path), Path(image_dir)]

    def data_files(self) -> list[Path]:
        return sorted({self.image_dir / record["image"] for record in self.items if "image" in record})

    def build_sample(self, record: dict, rng: random.Random | None) -> dict:
        where = f"{self.json_path} record {record.get('id')!r}"
        image = load_image(self.image_dir / record["image"], self.check_script) if "image" in record else None
        return {
            "image": image,
            "conversation": llava_conversation(record["conversations"], where),
            "masks": empty_masks(image.height, image.width) if image is not None else empty_masks(0, 0),
            "task": self.task,
            "source": self.source,
        }


class VQAJsonlDataset(SelfieDataset):
    """Question / answer pairs from a jsonl file (see the module docstring), e.g. VQAv2.

    Args:
        jsonl_path: the jsonl file.
        image_root: the folder the records' `image` paths are relative to.
        source: the dataset name put in the samples.
        question_suffix: appended to every question after a space (`""`: nothing); by default the short-answer
            prompt SELF1E trains VQAv2 with.
        train, seed, max_samples: see [`SelfieDataset`] (SELF1E keeps at most 100k records of each VQA file).
    """

    task = "vqa"
    check_script = "processing/check_vqav2.py"

    def __init__(
        self,
        jsonl_path: str | Path,
        image_root: str | Path,
        *,
        source: str = "vqav2",
        question_suffix: str = SHORT_ANSWER_PROMPT,
        train: bool = False,
        seed: int = 0,
        max_samples: int | None = None,
    ):
        self.source = source
        self.question_suffix = question_suffix
        self.jsonl_path, self.image_root = self.expected_paths(jsonl_path, image_root)
        require_paths([self.jsonl_path, self.image_root], self.check_script)
        records = []
        for number, line in enumerate(self.jsonl_path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                records.append((number, self._parse_line(line, number)))
        super().__init__(records, train=train, seed=seed, max_samples=max_samples)

    @classmethod
    def expected_paths(cls, jsonl_path: str | Path, image_root: str | Path) -> list[Path]:
        """The jsonl file and the image root."""
        return [Path(jsonl_path), Path(image_root)]

    def _parse_line(self, line: str, number: int) -> dict:
        """One record, with the keys it must have checked."""
        where = f"{self.jsonl_path} line {number}"
        record = read_json_line(line, where)
        for key in ("image", "question"):
            if key not in record:
                raise ValueError(f"{where} lacks the key {key!r}.")
        vqa_answer(record, where)
        return record

    def data_files(self) -> list[Path]:
        return sorted({self.image_root / record["image"] for _, record in self.items})

    def build_sample(self, item, rng: random.Random | None) -> dict:
        number, record = item
        question = record["question"].strip()
        if self.question_suffix:
            question = f"{question} {self.question_suffix}"
        image = load_image(self.image_root / record["image"], self.check_script)
        return {
            "image": image,
            "conversation": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": vqa_answer(record, f"{self.jsonl_path} line {number}")},
            ],
            "masks": empty_masks(image.height, image.width),
            "task": self.task,
            "source": self.source,
        }

