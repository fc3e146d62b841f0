"""How a query is written before it enters the prompt ([`normalize_query`]). Needs no torch, so that command lines
check prompts before the model loads."""

import re
import unicodedata

# How queries are rewritten before they enter the prompt: as given, or as plain words.
QUERY_NORMALIZATIONS = (None, "words")
_QUERY_WORD = re.compile(r"[^\W_]+")  # runs of letters and digits: punctuation, hyphens, underscores split words


def normalize_query(text: str, kind: str = "phrase", normalization: str | None = None) -> str:
    """A query written as a model's training text was (`SelfieProcessor(query_normalization=...)`).

    `normalization=None` returns `text` unchanged. `"words"` (the RefShapes demo model's training text) keeps the
    words only: Unicode NFKC, lower case, runs of letters and digits joined by one space (punctuation, hyphens,
    underscores and repeated spaces become one space). A phrase is just these words ("Red-Circle!" ->
    "red circle"); an instruction is a sentence: its first letter upper case and a final "?" (or "." when the text
    ended with one), as "Which shape has three corners?". Raises `ValueError` when no word is left.
    """
    if normalization is None:
        return text
    if normalization not in QUERY_NORMALIZATIONS:
        raise ValueError(f"query_normalization={normalization!r} is not one of {list(QUERY_NORMALIZATIONS)}.")
    words = " ".join(_QUERY_WORD.findall(unicodedata.normalize("NFKC", text).lower()))
    if not words:
        raise ValueError(f"The query {shorten(text)!r} holds no word (letters or digits) to segment.")
    if kind == "phrase":
        return words
    return words[0].upper() + words[1:] + ("." if text.rstrip().endswith(".") else "?")


def shorten(text: str, limit: int = 60) -> str:
    """`text` cut to `limit` characters, with "..." where it was cut (for messages that quote user input)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
