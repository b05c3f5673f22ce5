"""Records -> tensors: a torch Dataset over records with an in-memory cache, and the epoch plans
that balance classes (extra augmented copies, a weighted sampler, or loss weights)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from bus_core.constants import CLASSES
from bus_core.dataset import Record
from bus_core.inputs import InputSpec, record_input
from bus_core.io import load_image, load_mask
from bus_core.transforms import base_image, eval_transform, resize_shorter, train_transform

BALANCE_MODES: tuple[str, ...] = ("augment", "weights", "sampler", "none")


@dataclass(frozen=True)
class Item:
    """One draw of an epoch: a record index, and whether it is a strongly augmented extra copy."""

    index: int
    strong: bool = False


class RecordDataset(Dataset):
    """Model inputs of `records` under `spec`; items are (tensor, label index).

    Decoded inputs are cached in memory, already resized to the preset's resize size; records
    whose input is random (leak-free crops of lesion-free images) keep a larger cached image and
    are cropped anew at every access when `train` is set.
    """

    def __init__(self, records: Sequence[Record], spec: InputSpec, *, train: bool = False,
                 classes: Sequence[str] = CLASSES) -> None:
        self.records = list(records)
        self.spec = spec
        self.train = train
        self.labels = [classes.index(r.label) for r in self.records]
        self._eval = eval_transform(spec.size)
        self._weak = train_transform(spec.size)
        self._strong = train_transform(spec.size, strong=True)
        self._cache: dict[int, tuple[np.ndarray, bool]] = {}
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def _base(self, index: int) -> tuple[np.ndarray, bool]:
        """(cached image, whether the input must be re-cropped at random for training)."""
        if index not in self._cache:
            record = self.records[index]
            image = load_image(record.path)
            random_crop = self.spec.mode == "mask-leakfree" and not _has_lesion(record, image)
            if random_crop and self.train:
                self._cache[index] = (resize_shorter(image, 2 * self.spec.size.resize), True)
            else:
                prepared = record_input(record, self.spec, image=image)
                self._cache[index] = (base_image(prepared, self.spec.size), False)
        return self._cache[index]

    def input_image(self, item: Item | int) -> np.ndarray:
        """The HxWx3 uint8 input of an item before the random transforms."""
        item = item if isinstance(item, Item) else Item(item)
        image, random_crop = self._base(item.index)
        if random_crop:
            rng = np.random.default_rng()
            image = record_input(self.records[item.index], self.spec, rng=rng, image=image)
        return image

    def __getitem__(self, item: Item | int) -> tuple[torch.Tensor, int]:
        item = item if isinstance(item, Item) else Item(item)
        image = self.input_image(item)
        if not self.train:
            transform = self._eval
        else:
            transform = self._strong if item.strong else self._weak
        return transform(image), self.labels[item.index]


def _has_lesion(record: Record, image: np.ndarray) -> bool:
    return any(load_mask(p, shape=image.shape[:2]).any() for p in record.masks)


def epoch_plan(labels: Sequence[int], balance: str, epoch: int, seed: int) -> list[Item]:
    """The shuffled draws of one training epoch, reproducible from (seed, epoch).

    'augment' adds strongly augmented copies of minority-class images until every class present
    has as many draws as the largest; 'sampler' draws len(labels) items with probability
    inversely proportional to class frequency; 'weights' and 'none' draw every image once.
    """
    if balance not in BALANCE_MODES:
        raise ValueError(f"Unknown balance mode {balance!r}; choose one of "
                         f"{', '.join(BALANCE_MODES)}.")
    rng = np.random.default_rng([seed, epoch])
    labels_arr = np.asarray(labels)
    items = [Item(i) for i in range(len(labels_arr))]
    if balance == "augment":
        counts = {c: int((labels_arr == c).sum()) for c in np.unique(labels_arr)}
        target = max(counts.values(), default=0)
        for c, n in counts.items():
            pool = np.flatnonzero(labels_arr == c)
            extra = rng.choice(pool, size=target - n, replace=target - n > n)
            items += [Item(int(i), strong=True) for i in extra]
    elif balance == "sampler":
        freq = np.bincount(labels_arr, minlength=labels_arr.max() + 1)[labels_arr]
        p = 1.0 / freq
        drawn = rng.choice(len(labels_arr), size=len(labels_arr), p=p / p.sum())
        items = [Item(int(i)) for i in drawn]
    order = rng.permutation(len(items))
    return [items[i] for i in order]


def class_weights(labels: Sequence[int], n_classes: int = len(CLASSES)) -> torch.Tensor:
    """Loss weights n / (k * n_c) for the k classes present; absent classes get 1."""
    counts = np.bincount(np.asarray(labels), minlength=n_classes).astype(float)
    present = counts > 0
    weights = np.ones(n_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def collate(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (tensor, label) pairs into a batch."""
    images, labels = zip(*batch)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def eval_batches(dataset: RecordDataset,
                 batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Yield (images, labels, indices) over a dataset in order."""
    for start in range(0, len(dataset), batch_size):
        idx = list(range(start, min(start + batch_size, len(dataset))))
        images, labels = collate([dataset[i] for i in idx])
        yield images, labels, idx

