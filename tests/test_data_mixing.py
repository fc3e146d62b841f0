"""MixedDataset: per-type repeats, seeded order, distinct randomness per copy."""

from collections import Counter

import numpy as np
import pytest

from modeling_selfie.data.common import SelfieDataset
from modeling_selfie.data.mixing import MixedDataset

SELF1E_SEG_RATES = {"semantic": 6, "referring": 20, "reasoning": 6, "vqa": 1}


class Draws(SelfieDataset):
    """`n` text-only items whose sample records the item and one draw of its random generator."""

    check_script = "processing/check_nothing.py"

    def __init__(self, source: str, task: str, n: int):
        self.source, self.task = source, task
        super().__init__(list(range(n)), train=True)

    def build_sample(self, item, rng):
        content = f"{self.source} {item} {rng.random()}"
        return {"image": None, "conversation": [{"role": "user", "content": content}], "masks": np.zeros((0, 0, 0)),
                "task": self.task, "source": self.source}  # fmt: skip


@pytest.fixture
def datasets():
    return [Draws("ade20k", "semantic", 3), Draws("refcoco", "referring", 2), Draws("reasonseg", "reasoning", 1),
            Draws("llava_instruct", "vqa", 4)]  # fmt: skip


def test_self1e_seg_rates_repeat_each_dataset_by_its_type(datasets):
    mixture = MixedDataset.from_task_rates(datasets, SELF1E_SEG_RATES, seed=0)
    assert len(mixture) == 3 * 6 + 2 * 20 + 1 * 6 + 4 * 1
    located = [mixture.locate(i) for i in range(len(mixture))]
    per_item = Counter((which, local) for which, local, _ in located)
    for which, (dataset, rate) in enumerate(zip(datasets, (6, 20, 6, 1))):
        assert all(per_item[(which, local)] == rate for local in range(len(dataset)))
        copies = sorted(copy for w, local, copy in located if (w, local) == (which, 0))
        assert copies == list(range(rate))
    sources = Counter(mixture[i]["source"] for i in range(len(mixture)))
    assert sources == {"ade20k": 18, "refcoco": 40, "reasonseg": 6, "llava_instruct": 4}


def test_self1e_is_one_pass_over_everything(datasets):
    mixture = MixedDataset(datasets, seed=0)
    assert len(mixture) == 10
    every_item = [(which, i) for which, dataset in enumerate(datasets) for i in range(len(dataset))]
    assert sorted(mixture.locate(i)[:2] for i in range(10)) == every_item


def test_order_is_seeded_and_copies_draw_differently(datasets):
    def order(seed, epoch=0):
        mixture = MixedDataset.from_task_rates(datasets, SELF1E_SEG_RATES, seed=seed)
        mixture.set_epoch(epoch)
        return [mixture.locate(i) for i in range(len(mixture))]

    assert order(1) == order(1) != order(2)
    assert order(1, epoch=1) != order(1)
    unshuffled = MixedDataset(datasets, [1, 2, 1, 1], shuffle=False)
    expected = [(0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 0), (1, 1, 0), (1, 0, 1)]  # (dataset, item, copy)
    assert [unshuffled.locate(i) for i in range(6)] == expected
    copies = {unshuffled[3]["conversation"][0]["content"], unshuffled[5]["conversation"][0]["content"]}
    assert len(copies) == 2  # same item, other variant, other draw
    assert unshuffled[3]["conversation"] == unshuffled[3]["conversation"]


def test_set_epoch_reaches_the_datasets_and_errors_are_named(datasets):
    mixture = MixedDataset(datasets)
    first_epoch = datasets[0][0]
    mixture.set_epoch(3)
    assert all(dataset.epoch == 3 for dataset in datasets)
    assert datasets[0][0] != first_epoch
    with pytest.raises(ValueError, match="llava_instruct has task 'vqa', which has no rate"):
        MixedDataset.from_task_rates(datasets, {"semantic": 1, "referring": 1, "reasoning": 1})
    with pytest.raises(ValueError, match="Got 2 repeats for 4 datasets"):
        MixedDataset(datasets, [1, 2])
    with pytest.raises(IndexError, match="10 samples; index 10"):
        mixture[10]
