"""The sample every dataset loader returns, and the checks the collator relies on.

A sample is a plain dict:

    {
        "image": PIL.Image.Image (RGB) or None (text-only chat),
        "conversation": [{"role": "user", "content": str}, {"role": "assistant", "content": str}, ...],
            # no image placeholder: the processor puts the image before the first user turn;
            # assistant turns hold "[SEG]" once per mask, in order
        "masks": np.ndarray uint8 [n_seg, H, W], 0/1, H, W = image height, width (n_seg may be 0),
        "task": "referring" | "semantic" | "reasoning" | "vqa",
        "source": str,  # dataset name, e.g. "refcoco"
        # evaluation samples also carry the raw query, one [SEG] per sample, and what identifies their image
        # (samples of one image share it; protocol self1e scores them as one batch):
        "query": str, "query_kind": "phrase" | "instruction", "image_id": int | str,
    }
"""

import numpy as np

TASKS = ("referring", "semantic", "reasoning", "vqa")


def check_sample(sample: dict, where: str = "sample") -> dict:
    """Raise a `ValueError` naming `where` and the problem if `sample` breaks the format above; return it."""
    for key in ("conversation", "masks", "task", "source"):
        if key not in sample:
            raise ValueError(f"{where} lacks the key {key!r}.")
    if sample["task"] not in TASKS:
        raise ValueError(f"{where} has task {sample['task']!r}, not one of {TASKS}.")
    n_seg = sum(turn["content"].count("[SEG]") for turn in sample["conversation"] if turn["role"] == "assistant")
    masks = np.asarray(sample["masks"])
    if masks.ndim != 3 or masks.shape[0] != n_seg:
        raise ValueError(f"{where} has masks of shape {masks.shape} for {n_seg} [SEG] token(s).")
    image = sample.get("image")
    if n_seg and image is None:
        raise ValueError(f"{where} has [SEG] but no image.")
    if image is not None and n_seg and masks.shape[1:] != (image.height, image.width):
        raise ValueError(f"{where} has masks of size {masks.shape[1:]} for an image of {(image.height, image.width)}.")
    return sample
