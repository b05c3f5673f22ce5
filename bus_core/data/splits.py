"""Leakage-safe splits: near-duplicate and patient groups, stratified group splits and k folds,
and split files (JSON, record ids only).

Near-duplicates. Each image (grayscale) gets a combined perceptual hash: pHash, dHash and
vertical dHash, `hash_size`**2 bits each (192 bits for the default 8). Two images whose combined
hashes differ in at most `max_distance` bits are near-duplicates; near-duplicates and records
of the same patient (within one source) are merged into groups (union-find), and a group is
named by its smallest record id.

Why 44 bits (hash_size 8). On BUSI (662 images) the number of image pairs within a distance
grows slowly (188 pairs within 18 bits, 227 within 42, 261 within 48) and then steeply (418
within 54, 1292 within 60). Pairs checked by eye: up to 42 bits all showed the same lesion
(neighbouring frames, re-saves, calipers or a Doppler box added, small shifts); between 43 and
48 about half did. Known-different pairs measure false merges: of 1.24 M BUSI x BUS-BRA pairs,
4 are within 44 bits and 38 within 48; of 1.76 M BUS-BRA pairs of different patients, 32 and
147. At 48 union-find chains such false matches into groups of up to 44 images on BUSI+BUS-BRA
(8 at 44). Known misses at 44: frames 45-48 bits apart (e.g. malignant (106)/(107), (93)/(94),
benign (399)/malignant (94)) and the same lesion at another zoom or crop (benign (102)/(121)).

Splits assign whole groups to subsets. Groups go largest first (random order among equal sizes,
from `seed`) to the subset whose per-class counts are furthest below their targets (ratio x
class total), so every subset keeps close to the global class proportions; a group with several
labels counts towards each of them.

A split file is valid for a list of records when every id of the split is among them; records
the split does not cover (another dataset, new images) are ignored, and the data hash (ids and
labels) is checked on the covered records only, so a changed label is caught.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from bus_core import atomic
from bus_core.constants import CLASSES
from bus_core.data.dataset import Record, load_many
from bus_core.data.images import load_image
from bus_core.errors import DataError, storage

SUBSETS: tuple[str, ...] = ("train", "val", "test")
EVALUATION_SUBSETS: tuple[str, ...] = (*SUBSETS, "val+test")
"""Subsets an evaluation may read: one subset, or val and test together (a data set left out
of training)."""
HASH_METHOD = "phash+dhash+dhash_vertical"
DEFAULT_MAX_DISTANCE = 44
"""Tolerance in bits of the combined hash for hash_size 8 (see the module docstring)."""

_DICOM_SUFFIXES = (".dcm", ".dicom")
_FORMAT = "bus-split/1"


class Groups(dict):
    """Record id -> group id, with the parameters that made the groups (`params`)."""

    def __init__(self, mapping: Mapping[str, str], params: dict[str, Any] | None = None) -> None:
        super().__init__(mapping)
        self.params = dict(params or {})


@dataclass
class Split:
    """Record ids of the train / val / test subsets, and how they were made."""

    train: list[str]
    val: list[str]
    test: list[str]
    groups: dict[str, str]
    seed: int
    data_hash: str
    ratios: tuple[float, float, float]
    stats: dict[str, Any] = field(default_factory=dict)

    def subset(self, name: str) -> list[str]:
        """The ids of subset `name` ('train', 'val' or 'test'), or of several joined by '+'
        (e.g. 'val+test': every image of a data set that a model trained on its train subset,
        or on other data sets, has not seen)."""
        parts = name.split("+")
        if not all(part in SUBSETS for part in parts):
            raise DataError(f"Unknown subset {name!r}: choose one of {', '.join(SUBSETS)}, or "
                            "several joined by '+'.")
        return [i for part in parts for i in getattr(self, part)]

    def ids(self) -> list[str]:
        """Every id the split covers."""
        return self.train + self.val + self.test


# --- near-duplicate groups -------------------------------------------------------------------

def find_groups(records: Sequence[Record], *, hash_size: int = 8,
                max_distance: int = DEFAULT_MAX_DISTANCE, progress: bool = False) -> Groups:
    """Record id -> group id: near-duplicate images (perceptual hashes) and same-patient
    records share a group; the group id is the smallest record id in it."""
    records = _sorted_unique(records)
    shown = tqdm(records, disable=not progress, desc="hashing", unit="image")
    words = math.ceil(3 * hash_size ** 2 / 64)
    hashes = np.array([_hash(r.path, hash_size) for r in shown], np.uint64).reshape(-1, words)
    parent = list(range(len(records)))
    for i, j in _close_pairs(hashes, max_distance):
        _union(parent, i, j)
    by_patient: dict[tuple[str, str], int] = {}
    for i, record in enumerate(records):
        if record.patient is not None:
            _union(parent, i, by_patient.setdefault((record.source, record.patient), i))
    roots = [_find(parent, i) for i in range(len(records))]
    name: dict[int, str] = {}
    for i, root in enumerate(roots):  # records are sorted: the first member is the smallest id
        name.setdefault(root, records[i].id)
    params = {"method": HASH_METHOD, "hash_size": hash_size, "max_distance": max_distance,
              "patients": True}
    return Groups({r.id: name[root] for r, root in zip(records, roots)}, params)


def _hash(path: Path, hash_size: int) -> np.ndarray:
    """The combined hash of an image as uint64 words (cached by path, size and mtime)."""
    try:
        stat = path.stat()
        return _cached_hash(str(path), stat.st_mtime_ns, stat.st_size, hash_size)
    except (OSError, ValueError) as error:
        raise DataError(f"Could not read the image {path} to look for near-duplicates "
                        f"({error}).") from error


@lru_cache(maxsize=200_000)
def _cached_hash(path: str, mtime_ns: int, size: int, hash_size: int) -> np.ndarray:
    image = _grayscale(Path(path))
    bits = np.concatenate([h(image, hash_size=hash_size).hash.ravel() for h in
                           (imagehash.phash, imagehash.dhash, imagehash.dhash_vertical)])
    packed = np.packbits(bits)
    packed = np.pad(packed, (0, -len(packed) % 8))
    return packed.view(np.uint64)


def _grayscale(path: Path) -> Image.Image:
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return Image.fromarray(load_image(path)).convert("L")
    with Image.open(path) as image:
        if image.mode.startswith("I"):  # 16/32-bit grayscale: scale to 8 bits
            array = np.asarray(image, dtype=np.float64)
            return Image.fromarray((255 * array / max(array.max(), 1)).astype(np.uint8))
        return image.convert("L")


def _close_pairs(hashes: np.ndarray, max_distance: int, chunk: int = 256
                 ) -> Iterable[tuple[int, int]]:
    """Index pairs (i < j) whose hashes differ in at most `max_distance` bits."""
    for start in range(0, len(hashes), chunk):
        block = hashes[start:start + chunk]
        distance = np.bitwise_count(block[:, None, :] ^ hashes[None, :, :]).sum(-1)
        for i, j in zip(*np.nonzero(distance <= max_distance)):
            if start + i < j:
                yield int(start + i), int(j)


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _union(parent: list[int], i: int, j: int) -> None:
    a, b = _find(parent, i), _find(parent, j)
    parent[max(a, b)] = min(a, b)


def describe_groups(groups: Split | Mapping[str, str], records: Sequence[Record]) -> str:
    """One line: 'N images in G groups (M groups with several images, C across labels)'."""
    stats = _group_stats(records, groups.groups if isinstance(groups, Split) else groups)
    return (f"{len(records)} images in {stats['n_groups']} groups "
            f"({stats['n_multi_image_groups']} groups with several images, "
            f"{stats['n_cross_label_groups']} across labels)")


def _group_stats(records: Sequence[Record], groups: Mapping[str, str]) -> dict[str, int]:
    members: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        members[groups.get(record.id, record.id)].append(record)
    return {"n_groups": len(members),
            "n_multi_image_groups": sum(len(m) > 1 for m in members.values()),
            "n_cross_label_groups": sum(len({r.label for r in m}) > 1 for m in members.values())}


# --- splits ----------------------------------------------------------------------------------

def data_hash(records: Iterable[Record]) -> str:
    """sha256 over the sorted (id, label) pairs: the same on every machine."""
    lines = sorted(f"{r.id}\t{r.label}" for r in records)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def make_split(records: Sequence[Record], *, ratios: Sequence[float] = (0.7, 0.15, 0.15),
               seed: int = 0, groups: Mapping[str, str] | None = None) -> Split:
    """A stratified group split into train / val / test (groups from `find_groups` when not
    given): no group has images on two sides."""
    records = _sorted_unique(records)
    ratios = _check_ratios(ratios)
    groups = _groups_for(records, groups)
    members = _members(records, groups)
    side = _assign(members, ratios, np.random.default_rng(seed))
    subsets = _subsets(members, side, 3)
    return _split(records, subsets, groups, seed, ratios, {})


def make_kfold(records: Sequence[Record], k: int = 5, *, seed: int = 0,
               groups: Mapping[str, str] | None = None, val_ratio: float = 0.15) -> list[Split]:
    """k stratified group folds: fold i tests on the i-th part and takes a validation subset of
    about `val_ratio` of all images from the other parts (0 for no validation subset)."""
    records = _sorted_unique(records)
    if k < 2:
        raise DataError("K-fold cross-validation needs at least 2 folds.")
    if not 0 <= val_ratio < (k - 1) / k:
        raise DataError(f"The validation share must be at least 0 and below {(k - 1) / k:.2f} "
                        f"for {k} folds.")
    groups = _groups_for(records, groups)
    members = _members(records, groups)
    if len(members) < k:
        raise DataError(f"Only {len(members)} groups of images: too few for {k} folds.")
    fold_of = _assign(members, (1 / k,) * k, np.random.default_rng(seed))
    inner = val_ratio / ((k - 1) / k)
    ratios = ((k - 1) / k - val_ratio, val_ratio, 1 / k)
    folds = []
    for fold in range(k):
        rest = {g: m for g, m in members.items() if fold_of[g] != fold}
        side = _assign(rest, (1 - inner, inner), np.random.default_rng([seed, fold]))
        train, val = _subsets(rest, side, 2)
        test = [r.id for g, m in members.items() if fold_of[g] == fold for r in m]
        folds.append(_split(records, (train, val, sorted(test)), groups, seed, ratios,
                            {"fold": fold, "k": k}))
    return folds


def hold_out(split: Split, records: Sequence[Record], held: Iterable[str]) -> Split:
    """A leave-out variant of `split` (e.g. one scanner): the `held` ids leave its train and
    val subsets, and its test subset is the held ids that `split` kept out of training (its
    val and test), so no model trained on either split has seen them. `records` must cover
    `split` (as for `split_records`)."""
    held = set(held)
    kept_out = [i for i in split.val + split.test if i in held]
    if not kept_out:
        raise DataError("None of the held-out images is in the validation or test subset of "
                        "the base split: nothing to test on.")
    subsets = [[i for i in split.train if i not in held], [i for i in split.val if i not in held],
               sorted(kept_out)]
    covered = {i for ids in subsets for i in ids}
    by_id = {r.id: r for r in records}
    missing = [i for i in covered if i not in by_id]
    if missing:
        raise DataError(f"{len(missing)} images of the base split are not in the data given "
                        f"(e.g. {missing[0]!r}).")
    chosen = [by_id[i] for i in sorted(covered)]
    groups = Groups({i: g for i, g in split.groups.items() if i in covered},
                    {"method": "base split", "held_out": len(held)})
    ratios = [len(s) / len(covered) for s in subsets]
    return _split(chosen, subsets, groups, split.seed, ratios, {})


def merge_splits(splits: Sequence[Split], records: Sequence[Record]) -> Split:
    """One split of several data sets: each subset is the union of the splits' subsets (their
    images must not overlap), so a model trained on it has seen no image that any of them
    keeps for validation or testing. `records` must cover every split."""
    subsets: list[list[str]] = [[], [], []]
    groups: dict[str, str] = {}
    for part in splits:
        overlap = set(part.ids()) & {i for ids in subsets for i in ids}
        if overlap:
            raise DataError(f"The splits to merge share {len(overlap)} images (e.g. "
                            f"{sorted(overlap)[0]!r}); merge splits of different data sets.")
        for ids, name in zip(subsets, SUBSETS):
            ids += part.subset(name)
        groups |= part.groups
    by_id = {r.id: r for r in records}
    missing = [i for ids in subsets for i in ids if i not in by_id]
    if missing:
        raise DataError(f"{len(missing)} images of the splits are not in the data given "
                        f"(e.g. {missing[0]!r}).")
    covered = sorted(i for ids in subsets for i in ids)
    ratios = [len(ids) / len(covered) for ids in subsets]
    return _split([by_id[i] for i in covered], [sorted(ids) for ids in subsets],
                  Groups(groups, {"method": "merged splits", "parts": len(splits)}),
                  splits[0].seed, ratios, {})


def _sorted_unique(records: Iterable[Record]) -> list[Record]:
    records = sorted(records, key=lambda r: r.id)
    for a, b in zip(records, records[1:]):
        if a.id == b.id:
            raise DataError(f"The image {a.id!r} is listed more than once.")
    return records


def _check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(r) for r in ratios)
    if len(values) != 3 or min(values) < 0 or not math.isclose(sum(values), 1, abs_tol=1e-6):
        raise DataError(f"Split ratios must be three shares (train, val, test) that add up to 1; "
                        f"got {', '.join(map(str, ratios))}.")
    if values[0] == 0:
        raise DataError("The training share of a split cannot be 0.")
    return values  # type: ignore[return-value]


def _groups_for(records: list[Record], groups: Mapping[str, str] | None) -> dict[str, str]:
    if groups is None:
        groups = find_groups(records)
    missing = [r.id for r in records if r.id not in groups]
    if missing:
        raise DataError(f"The image groups do not cover {len(missing)} of the {len(records)} "
                        f"images (e.g. {missing[0]!r}); compute them on the same data.")
    kept = {r.id: str(groups[r.id]) for r in records}
    return Groups(kept, getattr(groups, "params", None)) if isinstance(groups, Groups) else kept


def _members(records: list[Record], groups: Mapping[str, str]) -> dict[str, list[Record]]:
    members: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        members[groups[record.id]].append(record)
    return dict(sorted(members.items()))


def _assign(members: dict[str, list[Record]], ratios: Sequence[float],
            rng: np.random.Generator) -> dict[str, int]:
    """Group id -> subset index: largest groups first (random among equal sizes), each to the
    subset whose class counts are furthest below ratio x class total."""
    keys = list(members)
    names = [keys[i] for i in rng.permutation(len(keys))]
    names.sort(key=lambda g: -len(members[g]))
    vectors = {g: _class_vector(members[g]) for g in names}
    share = np.asarray(ratios, dtype=float)
    target = np.outer(share, sum(vectors.values(), np.zeros(len(CLASSES))))
    current = np.zeros_like(target)
    side = {}
    for g in names:
        with np.errstate(divide="ignore", invalid="ignore"):
            need = np.where(target > 0, (target - current) / target, 0.0)
        score = np.where(share > 0, need @ vectors[g], -np.inf)
        side[g] = int(np.argmax(score))
        current[side[g]] += vectors[g]
    return side


def _class_vector(records: list[Record]) -> np.ndarray:
    counts = Counter(r.label for r in records)
    return np.array([counts.get(c, 0) for c in CLASSES], dtype=float)


def _subsets(members: dict[str, list[Record]], side: dict[str, int], n: int) -> list[list[str]]:
    subsets: list[list[str]] = [[] for _ in range(n)]
    for g, index in side.items():
        subsets[index] += [r.id for r in members[g]]
    return [sorted(s) for s in subsets]


def _split(records: list[Record], subsets: Sequence[list[str]], groups: Mapping[str, str],
           seed: int, ratios: Sequence[float], extra: dict[str, Any]) -> Split:
    by_id = {r.id: r for r in records}
    n = {name: {**_count(by_id[i] for i in ids), "total": len(ids)}
         for name, ids in zip(SUBSETS, subsets)}
    stats = {"n": n, "n_images": len(records), **_group_stats(records, groups),
             "grouping": getattr(groups, "params", None) or {"method": "given"}, **extra}
    return Split(train=list(subsets[0]), val=list(subsets[1]), test=list(subsets[2]),
                 groups=dict(groups), seed=seed, data_hash=data_hash(records),
                 ratios=tuple(float(r) for r in ratios), stats=stats)  # type: ignore[arg-type]


def _count(records: Iterable[Record]) -> dict[str, int]:
    counts = Counter(r.label for r in records)
    return {c: counts.get(c, 0) for c in CLASSES}


# --- split files -----------------------------------------------------------------------------

def save_split(split: Split, path: str | Path) -> Path:
    """Write `split` as pretty JSON (atomically: a temporary file, then a rename)."""
    path = Path(path)
    content = {"format": _FORMAT, "seed": split.seed, "ratios": list(split.ratios),
               "data_hash": split.data_hash, "stats": split.stats, "train": split.train,
               "val": split.val, "test": split.test, "groups": split.groups}
    with storage(f"save the split file {path}"):
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic.write_text(path, json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def load_split(path: str | Path) -> Split:
    """Read a split file written by `save_split`."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise DataError(f"The split file {path} does not exist.") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not a readable split file ({error}).") from error
    if not isinstance(content, dict):
        raise DataError(f"{path} is not a split file: it holds no train/val/test lists.")
    subsets = [_id_list(content, name, path) for name in SUBSETS]
    seen = Counter(i for ids in subsets for i in ids)
    twice = [i for i, n in seen.items() if n > 1]
    if twice:
        raise DataError(f"The split file {path} puts {twice[0]!r} in more than one subset.")
    seed, digest = content.get("seed"), content.get("data_hash")
    if not isinstance(seed, int) or not isinstance(digest, str):
        raise DataError(f"The split file {path} lacks its seed or data hash.")
    groups = content.get("groups") or {i: i for i in seen}
    ratios = content.get("ratios") or [len(s) / max(len(seen), 1) for s in subsets]
    if not isinstance(groups, dict) or not isinstance(ratios, list) or len(ratios) != 3:
        raise DataError(f"The split file {path} has malformed groups or ratios.")
    return Split(train=subsets[0], val=subsets[1], test=subsets[2],
                 groups={str(k): str(v) for k, v in groups.items()}, seed=seed,
                 data_hash=digest, ratios=tuple(float(r) for r in ratios),  # type: ignore[arg-type]
                 stats=content.get("stats") or {})


def _id_list(content: dict, name: str, path: Path) -> list[str]:
    ids = content.get(name)
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise DataError(f"The split file {path} has no valid {name!r} list of image ids.")
    return ids


def split_records(records: Sequence[Record], split: Split, subset: str) -> list[Record]:
    """The records of one subset of `split`. Every id of the split must be among `records`
    (others are ignored), and their ids and labels must be those the split was made from."""
    wanted = split.subset(subset)
    by_id = {r.id: r for r in records}
    covered = split.ids()
    missing = [i for i in covered if i not in by_id]
    if missing:
        raise DataError(f"{len(missing)} of the {len(covered)} images of this split are not in "
                        f"the data given (e.g. {missing[0]!r}): use the data the split was made "
                        "from.")
    if data_hash(by_id[i] for i in covered) != split.data_hash:
        raise DataError("The data changed since this split was made (some labels differ from "
                        "the ones it was made with): make a new split, or restore the data.")
    return [by_id[i] for i in wanted]


def select_records(sources: Sequence[str], split_file: str | None = None,
                   subset: str = "test") -> tuple[list[Record], dict[str, Any]]:
    """The labelled images of `sources` (folders or CSV manifests) or, with `split_file`, those
    of its `subset`; with a description of that choice (sources, split file, subset, data hash)
    for the figures computed on them. Raises `DataError` when nothing is chosen."""
    records = load_many(sources)
    if not records:
        raise DataError(f"There are no labelled images in {', '.join(sources)}.")
    if split_file:
        split = load_split(split_file)
        chosen = split_records(records, split, subset)
        if not chosen:
            raise DataError(f"None of these images is in the {subset} subset of "
                            f"{split_file}: is it the split file of this data?")
        return chosen, {"sources": sources, "split_file": split_file, "subset": subset,
                        "data_hash": split.data_hash}
    return records, {"sources": sources, "subset": "all"}
