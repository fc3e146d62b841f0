"""A small word-level tokenizer with InternVL's special tokens, for tiny models, tests and the RefShapes demo."""

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>", "[SEG]")
INTERNVL_TOKEN_ROLES = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


def build_word_level_tokenizer(
    words: Iterable[str], vocab: dict[str, int] | None = None
) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` that splits on spaces and isolates newlines and punctuation.

    Args:
        words: ordinary words of the vocabulary (ids follow the special tokens, in order); ignored if `vocab` is
            given.
        vocab: an explicit token -> id map (it must hold every special token).
    """
    if vocab is None:
        vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        for word in ["\n", "system", "user", "assistant", ".", ",", "?", *words]:
            vocab.setdefault(word, len(vocab))
    missing = [token for token in SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise ValueError(f"vocab lacks the special tokens {missing}.")
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r" +"), "removed"), pre_tokenizers.Split(Regex(r"\n|[.,?!:;]"), "isolated")]
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        extra_special_tokens=INTERNVL_TOKEN_ROLES,
    )


__all__ = ["build_word_level_tokenizer"]
