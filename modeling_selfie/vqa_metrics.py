"""Scores of the VQA and multimodal benchmarks of the paper's Tab. 9 and Tab. 13, as their standard evaluations
compute them (pure functions of answer strings; `modeling_selfie.evaluate_vqa` runs the model).

* [`vqa_accuracy`] (VQAv2, OK-VQA, VizWiz, TextVQA): both answers normalised as the EvalAI answer processor does
  ([`normalize_vqa_answer`]), then min(#humans that gave the answer / 3, 1) averaged over the 10 subsets of 9 of the
  10 human answers;
* [`gqa_correct`]: exact match after dropping trailing periods and lowercasing the prediction;
* [`pope_answer`] + [`binary_scores`] (POPE): the answer is "no" when its first sentence has the word "no", "No" or
  "not", else "yes"; accuracy, precision, recall, F1 and the ratio of "yes" predictions per category;
* [`mme_answer`] + [`mme_scores`] (MME): per subtask, accuracy and accuracy+ (images whose questions are all
  answered right) in percent, score = accuracy + accuracy+; perception and cognition totals;
* [`mmbench_letter`] + [`circular_options`] (MMBench): the option letter the answer names, and the option
  rotations of CircularEval (a question counts when every rotation is answered right).
"""

import re
from collections import defaultdict

# Number words and articles as the VQA evaluation maps and drops them.
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
# Contractions written without their apostrophe, as the VQA evaluation restores them.
CONTRACTIONS = {
    word.replace("'", ""): word
    for word in (
        "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
        "he'd he'd've he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't "
        "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd she'd've "
        "she'll she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's "
        "someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd "
        "there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd we'd've we'll "
        "we're we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've "
        "who'll who're who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
        "y'all'd've you'd you'd've you'll you're you've"
    ).split()
}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD_NOT_IN_NUMBER = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
HUMAN_ANSWERS_FOR_FULL_CREDIT = 3

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
OPTION_LETTERS = "ABCDEFGHI"


def _strip_punctuation(text: str) -> str:
    """The VQA evaluation's punctuation rule: a mark next to a space (or any mark in an answer with a comma between
    digits) is deleted, any other becomes a space; periods go unless they sit in a number."""
    for mark in PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or COMMA_IN_NUMBER.search(text) is not None:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    return PERIOD_NOT_IN_NUMBER.sub("", text)


def _map_words(text: str) -> str:
    """Number words to digits, articles dropped, contractions restored."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split() if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(answer: str) -> str:
    """An answer as the EvalAI VQA answer processor writes it before comparing (lowercase, commas and question marks
    dropped, punctuation, number words, articles and contractions as in the VQA evaluation)."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _map_words(_strip_punctuation(text))


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """VQA accuracy of one prediction: min(#matching humans / 3, 1) averaged over the leave-one-out subsets of the
    human answers (10 in VQAv2, OK-VQA, VizWiz, TextVQA), after [`normalize_vqa_answer`] on all of them."""
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    predicted = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(answer) == predicted for answer in human_answers]
    total = sum(matches)
    subsets = [min((total - match) / HUMAN_ANSWERS_FOR_FULL_CREDIT, 1.0) for match in matches]
    return sum(subsets) / len(subsets)


def gqa_correct(prediction: str, answer: str) -> bool:
    """GQA: the prediction, trailing periods dropped and lowercased, equals the answer."""
    return prediction.strip().rstrip(".").lower() == answer.strip().lower()


def pope_answer(text: str) -> str:
    """"no" when the first sentence of `text` (commas dropped) has the word "no", "No" or "not", else "yes"."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"no", "No", "not"} & set(words) else "yes"


def binary_scores(predictions: list[str], labels: list[str]) -> dict:
    """POPE's scores of yes/no predictions against yes/no labels ("yes" is the positive class); precision, recall and
    F1 are 0.0 where their denominator is 0."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    tn = sum(p == "no" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / len(pairs),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / len(pairs),
        "count": len(pairs),
    }


def mme_answer(text: str) -> str:
    """"yes", "no" or "other": the answer as MME's calculation reads it (lowercased, true/false as yes/no, a
    yes/no word in its first four characters)."""
    text = text.replace("\n", "").lower().replace("true", "yes").replace("false", "no").strip()
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def mme_scores(items: list[dict]) -> dict:
    """MME's scores from items `{"category", "image", "prediction" (yes/no/other), "answer" (yes/no)}`: per subtask
    accuracy and accuracy+ in percent and their sum, then the perception, cognition and overall totals (sums of the
    subtask scores present)."""
    by_category = defaultdict(list)
    for item in items:
        by_category[item["category"]].append(item)
    subtasks = {}
    for category, group in sorted(by_category.items()):
        correct = [item["prediction"] == item["answer"].strip().lower() for item in group]
        by_image = defaultdict(list)
        for item, right in zip(group, correct):
            by_image[item["image"]].append(right)
        accuracy = 100 * sum(correct) / len(correct)
        accuracy_plus = 100 * sum(all(rights) for rights in by_image.values()) / len(by_image)
        subtasks[category] = {"accuracy": accuracy, "accuracy_plus": accuracy_plus, "score": accuracy + accuracy_plus}
    perception = sum(s["score"] for c, s in subtasks.items() if c in MME_PERCEPTION)
    cognition = sum(s["score"] for c, s in subtasks.items() if c in MME_COGNITION)
    return {"perception": perception, "cognition": cognition, "total": perception + cognition, "subtasks": subtasks}


def circular_options(options: dict[str, str], answer: str, circular: bool = True) -> list[tuple[dict, str]]:
    """The option sets MMBench's CircularEval asks: option texts rotated by 0..n-1 places (only the given order
    when `circular` is False), each with the letter of the correct option in that order."""
    letters = list(options)
    texts = [options[letter] for letter in letters]
    correct = texts[letters.index(answer)]
    rotations = []
    for shift in range(len(texts) if circular else 1):
        rotated = dict(zip(letters, texts[shift:] + texts[:shift]))
        rotations.append((rotated, next(letter for letter, text in rotated.items() if text == correct)))
    return rotations


def mmbench_letter(text: str, options: dict[str, str]) -> str | None:
    """The option letter an answer names: a leading letter ("B", "B.", "(B) ...") or the exact text of one option;
    `None` when it names none."""
    match = re.match(r"\s*\(?([A-I])(?:$|[\s.):])", text)
    if match and match.group(1) in options:
        return match.group(1)
    named = [letter for letter, option in options.items() if text.strip().rstrip(".").lower() == option.lower()]
    return named[0] if named else None
