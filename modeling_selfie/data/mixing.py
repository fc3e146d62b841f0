"""A mixture of datasets in which each dataset is repeated a whole number of times per epoch.

SELF1E-SEG repeats every dataset of a type by the type's sample rate (semantic 6, referring 20, reasoning 6,
VQA 1) and SELF1E makes one pass over every dataset (all rates 1). The copies of a [`SelfieDataset`] are drawn
with different randomness (`variant`), so a repeated training item gets other sentences / classes / templates.
"""

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .common import SelfieDataset


class MixedDataset(torch.utils.data.Dataset):
    """The concatenation of `repeats[i]` copies of each `datasets[i]`, optionally shuffled.

    Args:
        datasets: map-style datasets; [`SelfieDataset`]s get a distinct `variant` per copy.
        repeats: copies of each dataset per epoch (whole numbers >= 0); `None`: one each.
        seed: with the epoch, seeds the visiting order.
        shuffle: visit the copies in a random (seeded) order instead of dataset after dataset.

    `len(mixture) == sum(len(d) * r for d, r in zip(datasets, repeats))`.
    """

    def __init__(
        self,
        datasets: Sequence[torch.utils.data.Dataset],
        repeats: Sequence[int] | None = None,
        *,
        seed: int = 0,
        shuffle: bool = True,
    ):
        repeats = [1] * len(datasets) if repeats is None else list(repeats)
        if len(repeats) != len(datasets):
            raise ValueError(f"Got {len(repeats)} repeats for {len(datasets)} datasets.")
        for repeat in repeats:
            if not isinstance(repeat, int) or repeat < 0:
                raise ValueError(f"Repeats must be whole numbers >= 0, got {repeats}.")
        self.datasets = list(datasets)
        self.repeats = repeats
        sizes = [len(dataset) * repeat for dataset, repeat in zip(self.datasets, repeats)]
        self._ends = np.cumsum(sizes, dtype=np.int64)
        self.seed = seed
        self.shuffle = shuffle
        self.set_epoch(0)

    @classmethod
    def from_task_rates(
        cls,
        datasets: Sequence[torch.utils.data.Dataset],
        rates: Mapping[str, int],
        *,
        seed: int = 0,
        shuffle: bool = True,
    ) -> "MixedDataset":
        """Repeat each dataset by the rate of its `task` (e.g. `{"semantic": 6, "referring": 20, "reasoning": 6,
        "vqa": 1}`)."""
        repeats = []
        for dataset in datasets:
            task = getattr(dataset, "task", None)
            if task not in rates:
                name = getattr(dataset, "source", type(dataset).__name__)
                raise ValueError(f"{name} has task {task!r}, which has no rate in {dict(rates)}.")
            repeats.append(rates[task])
        return cls(datasets, repeats, seed=seed, shuffle=shuffle)

    def set_epoch(self, epoch: int) -> None:
        """Draw the visiting order of `epoch` and pass the epoch on to the datasets that take one."""
        self.epoch = epoch
        for dataset in self.datasets:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
        self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self)) if self.shuffle else None

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def locate(self, index: int) -> tuple[int, int, int]:
        """(dataset position, index in that dataset, copy number) of mixture item `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"The mixture has {len(self)} samples; index {index} is out of range.")
        position = int(self._order[index]) if self.shuffle else index
        which = int(np.searchsorted(self._ends, position, side="right"))
        offset = position - (int(self._ends[which - 1]) if which else 0)
        copy, local = divmod(offset, len(self.datasets[which]))
        return which, local, copy

    def __getitem__(self, index: int) -> dict:
        which, local, copy = self.locate(index)
        dataset = self.datasets[which]
        return dataset.get(local, variant=copy) if isinstance(dataset, SelfieDataset) else dataset[local]
