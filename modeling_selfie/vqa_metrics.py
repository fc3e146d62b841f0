"""Scores of the VQA and multimodal benchmarks of the paper's Tab. 9 and Tab. 13, as their official evaluation code
computes them (pure functions of answer strings; `modeling_selfie.evaluate_vqa` runs the model). Which code each
function follows, and where the engines differ: docs/evaluation.md.

* [`vqa_accuracy`] (VQAv2, OK-VQA, VizWiz, TextVQA): both answers normalised as the EvalAI answer processor does
  ([`normalize_vqa_answer`]: the VQA API's punctuation, number, article and contraction rules), then
  min(#humans that gave the answer / 3, 1) averaged over the 10 subsets of 9 of the 10 human answers;
* [`gqa_correct`]: exact match after dropping trailing periods and lowercasing the prediction;
* [`pope_answer`] + [`binary_scores`] (POPE's `evaluate.py`): the answer is "no" when its first sentence has the
  word "no", "No" or "not", else "yes"; accuracy, precision, recall, F1 and the ratio of "yes" predictions per
  category;
* [`mme_answer`] + [`mme_scores`] (MME's `calculation.py`): yes / no / other from the answer's first four
  characters; per subtask, accuracy and accuracy+ (images whose questions are all answered right) in percent,
  score = accuracy + accuracy+; perception and cognition totals;
* [`mmbench_letter`] + [`circular_options`] (MMBench, VLMEvalKit's `can_infer`): the option letter the answer
  names (a letter in free text, or the text of one option), and the option rotations of CircularEval (a question
  counts when every rotation is answered right).
"""

import re
from collections import defaultdict

# Number words and articles as the VQA evaluation maps and drops them.
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
# The VQA evaluation's contraction table (`vqaEval.py` of the VQA API; the EvalAI answer processor of lmms-eval and
# InternVL has the same 120 entries), applied word by word after lowercasing. Its quirks are kept: the four keys with
# a capital I never match a lowercased word, "somebody'd" is rewritten to "somebodyd", and words such as "were",
# "well", "shed", "id", "ill" or "its" are left alone (the table has no entry for them).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've", "couldve": "could've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "Ive": "I've", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "shouldve": "should've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "werent": "weren't", "weve": "we've", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "wouldve": "would've", "yall": "y'all", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "yall'll": "y'all'll", "y'allll": "y'all'll", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The official pattern as written: its "(?!<=\d)" looks ahead for "<=" and a digit (a lookbehind was meant).
PERIOD_NOT_IN_NUMBER = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
PERIODS_STRIPPED = 32
HUMAN_ANSWERS_FOR_FULL_CREDIT = 3

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
# MMBench answer extraction (VLMEvalKit's `can_infer`): marks read as spaces, refusals, "the answer is X".
MMBENCH_SEPARATORS = ".()[],:;!*#{}"
MMBENCH_REFUSALS = (
    "Sorry, I can't help with images of people yet.", "I can't process this file.",
    "I'm sorry, but without the image provided", "Cannot determine the answer",
)  # fmt: skip
ANSWER_IS_LETTER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
REFUSED = "Z"
CJK_IDEOGRAPH = re.compile("[\u4e00-\u9fa5]")


def _strip_punctuation(text: str) -> str:
    """The VQA evaluation's punctuation rule: every mark is deleted where the answer as given has that mark next to a
    space (or has a comma between digits), else replaced by a space; then periods go unless they sit before a digit
    (at most 32 of them: the official code passes `re.UNICODE`, 32, where `re.sub` takes its count)."""
    out = text
    for mark in PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or COMMA_IN_NUMBER.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_NOT_IN_NUMBER.sub("", out, count=PERIODS_STRIPPED)


def _map_words(text: str) -> str:
    """Number words to digits, articles dropped, contractions restored."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split() if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_vqa_answer(answer: str) -> str:
    """An answer as the EvalAI VQA answer processor (lmms-eval, InternVL's `textvqa_eval.py`) writes it, in its order:
    lowercased, commas and question marks dropped, "'s" split off, newlines and tabs as spaces, stripped; then the
    VQA evaluation's punctuation rule; then number words to digits, articles dropped, contractions restored."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _map_words(_strip_punctuation(text))


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """VQA accuracy of one prediction: min(#matching humans / 3, 1) averaged over the leave-one-out subsets of the
    human answers (10 in VQAv2, OK-VQA, VizWiz, TextVQA).

    The prediction and every human answer go through [`normalize_vqa_answer`], always, as lmms-eval and InternVL
    score TextVQA / VQAv2 / VizWiz / OK-VQA. The VQA API's `vqaEval.py` (the EvalAI server) normalises only when
    the humans disagree and otherwise compares the stripped strings as given, so there "Yes" scores 0 against ten
    "yes"; the models' free-form answers are scored the way the published numbers were computed.
    """
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


def internvl_mme_post_processing(text: str) -> str:
    """InternVL's MME post-processing, which its evaluation applies before writing the answers MME's `calculation.py`
    reads: newlines dropped, 不是 / 是 / 否 as No / Yes / No, lowercased, "true" / "false" as "yes" / "no", other
    CJK ideographs dropped."""
    text = text.replace("\n", "").replace("不是", "No").replace("是", "Yes").replace("否", "No")
    text = text.lower().replace("true", "yes").replace("false", "no")
    return CJK_IDEOGRAPH.sub("", text)


def mme_answer(text: str, internvl_post_processing: bool = False) -> str:
    """"yes", "no" or "other": the answer as MME's `calculation.py` reads it. Lowercased; "yes" and "no" as they are,
    else "yes" when its first four characters hold "yes", else "no" when they hold "no" ("Yesterday" -> yes,
    "Not sure" -> no, "True" -> other, "  yes" -> other).

    Args:
        internvl_post_processing: apply [`internvl_mme_post_processing`] first ("True" -> yes, "False." -> no), as
            InternVL's evaluation does; its MME scores are higher than the official script's on such answers.
    """
    if internvl_post_processing:
        text = internvl_mme_post_processing(text)
    text = text.lower()
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


def _letter_in_answer(text: str, options: dict[str, str]) -> str | None:
    """VLMEvalKit's `can_infer_option`: `REFUSED` for a refusal or a lone "Z"; else the one option letter standing
    as a word (after `.()[],:;!*#{}` become spaces) among the last four words, else the letter of "answer is X"
    (A to D), else `None`."""
    if any(refusal in text for refusal in MMBENCH_REFUSALS):
        return REFUSED
    words = text
    for mark in MMBENCH_SEPARATORS:
        words = words.replace(mark, " ")
    words = words.split()
    named = [letter for letter in options if letter in words]
    if len(named) == 1 and words.index(named[0]) > len(words) - 5:
        return named[0]
    if not named and REFUSED in words:
        return REFUSED
    match = ANSWER_IS_LETTER.search(text)
    return match.group(1).upper() if match and match.group(1).upper() in options else None


def _option_in_answer(text: str, options: dict[str, str]) -> str | None:
    """VLMEvalKit's `can_infer_text`: the one option whose text (lowercased) is inside the lowercased answer, for
    answers at most twice as long as all option texts together."""
    text = text.lower()
    if len(text) > 2 * sum(len(str(option)) for option in options.values()):
        return None
    named = [letter for letter, option in options.items() if str(option).lower() in text]
    return named[0] if len(named) == 1 else None


def mmbench_letter(text: str, options: dict[str, str]) -> str | None:
    """The option letter an answer names, as VLMEvalKit's `can_infer` (its exact-matching policy, without a GPT
    judge) extracts it: a letter standing alone near the end ("B", "(A) cat", "The answer is B.", "Answer: B",
    "B, because it barks"), or the text of exactly one option inside a short answer ("a dog"); `None` when it names
    none, several, or refuses (counted wrong, as VLMEvalKit's "Z")."""
    letter = _letter_in_answer(text, options)
    if letter == REFUSED:
        return None
    return letter or _option_in_answer(text, options)
