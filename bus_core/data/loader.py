"""Records -> tensors: a torch Dataset over records with an in-memory cache, and the epoch plans
that balance classes (extra augmented copies, a weighted sampler, or loss weights) or
(source, class) cells (a weighted sampler) and, for `lesion-context` models, add lesion-free
tissue windows of data sets without normal images as normal examples."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bus_core.constants import CLASSES, NORMAL
from bus_core.data.augment import intensity
from bus_core.data.dataset import Record
from bus_core.data.images import load_image, load_mask
from bus_core.data.inputs import (
    InputSpec,
    lesion_free_input,
    lesion_free_strip,
    lesion_mask,
    record_input,
)
from bus_core.data.presets import base_image, eval_transform, resize_shorter, train_transform

BALANCE_MODES: tuple[str, ...] = ("augment", "weights", "sampler", "source-class", "none")


@dataclass(frozen=True)
class Item:
    """One draw of an epoch: a record index, whether it is a strongly augmented extra copy, and
    whether it stands for a lesion-free window of the record's image (label "normal")."""

    index: int
    strong: bool = False
    tissue: bool = False


@dataclass(frozen=True)
class _Cached:
    """A decoded record: the image (resized for its fit, or kept larger when the input is cut
    anew at every access), its combined lesion mask at that size when the input is cut from
    it, and whether it is."""

    image: np.ndarray
    lesion: np.ndarray | None = None
    random: bool = False


class RecordDataset(Dataset):
    """Model inputs of `records` under `spec`; items are (tensor, label index). `source_ids`
    numbers each record's source (in the order of the sources' names).

    Decoded inputs are cached in memory, already resized to the preset's resize size. Records
    whose training input is random (leak-free crops of lesion-free images; every
    `lesion-context` input, whose box is jittered) keep a larger cached image with its lesion
    mask and are cropped anew at every access when `train` is set.
    """

    def __init__(self, records: Sequence[Record], spec: InputSpec, *, train: bool = False,
                 classes: Sequence[str] = CLASSES, ultrasound: float = 0.0,
                 style: bool = False) -> None:
        self.records = list(records)
        self.spec = spec
        self.train = train
        self.labels = [classes.index(r.label) for r in self.records]
        names = sorted({r.source for r in self.records})
        self.source_ids = [names.index(r.source) for r in self.records]
        self.normal = classes.index(NORMAL) if NORMAL in classes else None
        self._eval = eval_transform(spec.size)
        colour = _ultrasound_colour(ultrasound, style) if ultrasound > 0 else None
        self._weak = train_transform(spec.size, colour=colour)
        self._strong = train_transform(spec.size, strong=True, colour=colour)
        self._cache: dict[int, _Cached] = {}
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def _base(self, index: int) -> _Cached:
        """The cached form of record `index` (see the class docstring)."""
        if index not in self._cache:
            record = self.records[index]
            image = load_image(record.path)
            if self.train and self._random_input(record, image):
                image = resize_shorter(image, 2 * self.spec.size.resize)
                masks = [load_mask(p, shape=image.shape[:2]) for p in record.masks]
                lesion = (lesion_mask(masks, self.spec) if masks
                          else np.zeros(image.shape[:2], bool))
                self._cache[index] = _Cached(image, lesion, random=True)
            else:
                prepared = record_input(record, self.spec, image=image)
                self._cache[index] = _Cached(base_image(prepared, self.spec.size))
        return self._cache[index]

    def _random_input(self, record: Record, image: np.ndarray) -> bool:
        if self.spec.mode == "lesion-context":
            return True
        return self.spec.mode == "mask-leakfree" and not _has_lesion(record, image)

    def input_image(self, item: Item | int) -> np.ndarray:
        """The HxWx3 uint8 input of an item before the random transforms."""
        item = item if isinstance(item, Item) else Item(item)
        cached = self._base(item.index)
        if not cached.random:
            return cached.image
        rng = np.random.default_rng(int(torch.randint(2**62, ())))  # the batch's torch seed
        record = self.records[item.index]
        if item.tissue:
            window = (None if cached.lesion is None
                      else lesion_free_input(cached.image, cached.lesion, rng))
            if window is None:
                raise ValueError(f"{record.id} has no lesion-free window (not in tissue_pool).")
            return window
        return record_input(record, self.spec, rng=rng, image=cached.image, lesion=cached.lesion,
                            jitter=self.spec.mode == "lesion-context")

    def label_of(self, item: Item) -> int:
        """The label index an item trains on ("normal" for a lesion-free window)."""
        if item.tissue and self.normal is not None:
            return self.normal
        return self.labels[item.index]

    def __getitem__(self, item: Item | int) -> tuple[torch.Tensor, int]:
        item = item if isinstance(item, Item) else Item(item)
        image = self.input_image(item)
        if not self.train:
            transform = self._eval
        else:
            transform = self._strong if item.strong else self._weak
        return transform(image), self.label_of(item)


def _ultrasound_colour(strength: float, style: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """`augment.intensity` at `strength` (with `scanner_style` when `style`), its randomness
    drawn from torch's random state (seeded per batch by `_Batches`)."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        return intensity(x, gen, strength=strength, style=style)

    return apply


def _has_lesion(record: Record, image: np.ndarray) -> bool:
    return any(load_mask(p, shape=image.shape[:2]).any() for p in record.masks)


def sampling_weights(labels: Sequence[int] | np.ndarray,
                     sources: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Draw probabilities of items (summing to 1) under which every class present, or every
    (source, class) cell present when `sources` is given, has the same expected number of
    draws."""
    cells = np.asarray(labels) if sources is None else np.stack([sources, labels], axis=1)
    _, cell_of, counts = np.unique(cells, axis=0, return_inverse=True, return_counts=True)
    p = 1.0 / counts[cell_of.ravel()]
    return p / p.sum()


def epoch_plan(labels: Sequence[int], balance: str, epoch: int, seed: int, *,
               tissue_pool: Sequence[int] = (), tissue_share: float = 0.0,
               normal: int = CLASSES.index(NORMAL),
               sources: Sequence[int] | None = None) -> list[Item]:
    """The shuffled draws of one training epoch, reproducible from (seed, epoch).

    First every image once, plus `tissue_share` times as many lesion-free windows (label
    `normal`) of images drawn from `tissue_pool` (indices of images from data sets without
    normal images that have such a window). Then 'augment' adds strongly augmented copies of
    minority-class draws until every class present has as many draws as the largest;
    'sampler' draws as many items with probability inversely proportional to class frequency;
    'source-class' likewise to the frequency of the item's (source, class) cell (`sources`:
    each record's source id; without them, or with one source, as 'sampler'), so that every
    cell present is drawn as often, a class missing from a source having fewer draws in all;
    'weights' and 'none' keep the draws as they are.
    """
    if balance not in BALANCE_MODES:
        raise ValueError(f"Unknown balance mode {balance!r}; choose one of "
                         f"{', '.join(BALANCE_MODES)}.")
    rng = np.random.default_rng([seed, epoch])
    items = [Item(i) for i in range(len(labels))]
    if len(tissue_pool) and tissue_share > 0:
        drawn = rng.choice(np.asarray(tissue_pool), size=round(tissue_share * len(labels)))
        items += [Item(int(i), tissue=True) for i in drawn]
    item_labels = np.array([normal if it.tissue else labels[it.index] for it in items], dtype=int)
    if balance == "augment":
        counts = {c: int((item_labels == c).sum()) for c in np.unique(item_labels)}
        target = max(counts.values(), default=0)
        for c, n in counts.items():
            pool = np.flatnonzero(item_labels == c)
            extra = rng.choice(pool, size=target - n, replace=target - n > n)
            items += [Item(items[i].index, strong=True, tissue=items[i].tissue) for i in extra]
    elif balance in ("sampler", "source-class"):
        item_sources = ([sources[it.index] for it in items]
                        if balance == "source-class" and sources is not None else None)
        drawn = rng.choice(len(items), size=len(items),
                           p=sampling_weights(item_labels, item_sources))
        items = [items[i] for i in drawn]
    order = rng.permutation(len(items))
    return [items[i] for i in order]


def tissue_pool(dataset: RecordDataset) -> list[int]:
    """Indices of `dataset`'s records that can give a lesion-free "normal" window: lesion
    images of sources without any normal record, whose image has a lesion-free strip large
    enough (`inputs.lesion_free_strip`). Decodes those images (into the dataset's cache)."""
    with_normal = {r.source for r, y in zip(dataset.records, dataset.labels)
                   if y == dataset.normal}
    pool = []
    for i, record in enumerate(dataset.records):
        if record.source in with_normal or dataset.labels[i] == dataset.normal:
            continue
        cached = dataset._base(i)
        if cached.lesion is not None and cached.lesion.any() and lesion_free_strip(
                cached.image, cached.lesion) is not None:
            pool.append(i)
    return pool


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



def default_train_workers() -> int:
    """Worker processes that build training batches: one per CPU core but one (which the
    training process keeps), at least 1, at most 4."""
    return max(1, min(4, (os.cpu_count() or 1) - 1))


def decode_all(dataset: RecordDataset) -> None:
    """Decode every record of `dataset` into its cache (resized uint8 images), so that no epoch
    decodes a file again and worker processes forked afterwards share the cache."""
    for index in range(len(dataset)):
        dataset._base(index)


@dataclass(frozen=True)
class PlanBatch:
    """The draws of one training step and the seed of their random augmentation."""

    step: int
    items: tuple[Item, ...]
    seed: int


def plan_batches(items: Sequence[Item], batch_size: int, *, seed: int, epoch: int,
                 rank: int = 0, start: int = 0) -> list[PlanBatch]:
    """Steps `start`, `start` + 1, ... of an epoch's draws (this rank's share) in batches of
    `batch_size`; a last batch of one is left out (BatchNorm cannot train on it). A batch's
    augmentation seed follows from (seed, epoch, rank, step) alone: the batch is the same in
    whichever process builds it, and again after a resume."""
    batches = []
    for step in range(start, -(-len(items) // batch_size)):
        chunk = tuple(items[step * batch_size:(step + 1) * batch_size])
        if len(chunk) > 1:
            state = np.random.SeedSequence([seed, epoch, step], spawn_key=(rank,))
            batches.append(PlanBatch(step, chunk, int(state.generate_state(1)[0])))
    return batches


class _Batches(Dataset):
    """(step, images, labels) of a PlanBatch, augmented under the batch's own seed."""

    def __init__(self, dataset: RecordDataset) -> None:
        self.dataset = dataset

    def __getitem__(self, batch: PlanBatch) -> tuple[int, torch.Tensor, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch.seed)
            images, labels = collate([self.dataset[item] for item in batch.items])
        return batch.step, images, labels


class _Steps(Sampler[PlanBatch]):
    """The batches of the epoch being trained (set before each epoch's iteration; it runs in
    the training process and sends each batch to a worker)."""

    def __init__(self) -> None:
        self.batches: list[PlanBatch] = []

    def __iter__(self) -> Iterator[PlanBatch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class PlanLoader:
    """Training batches of `dataset`, epoch plan after epoch plan: every record is decoded
    once (`decode_all`) before `workers` persistent worker processes are forked (0: built in
    this process), which crop, augment and stack the batches ahead of the training step, into
    pinned memory when `pin_memory` (CUDA)."""

    def __init__(self, dataset: RecordDataset, *, workers: int, pin_memory: bool = False) -> None:
        decode_all(dataset)
        if workers and "fork" not in multiprocessing.get_all_start_methods():
            workers = 0  # the dataset's transforms cannot be sent to spawned processes
        self.workers = workers
        self._steps = _Steps()
        self._loader = DataLoader(
            _Batches(dataset), batch_size=None, sampler=self._steps, num_workers=workers,
            pin_memory=pin_memory, persistent_workers=workers > 0,
            multiprocessing_context="fork" if workers else None)

    def epoch(self, batches: list[PlanBatch]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(step, images, labels) of each of `batches` (`plan_batches`), in order."""
        self._steps.batches = batches
        return iter(self._loader)
