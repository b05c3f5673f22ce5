import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from bus_core.constants import CLASSES
from bus_core.data.dataset import Record, load_many, load_records
from bus_core.data.splits import (
    Split,
    data_hash,
    describe_groups,
    find_groups,
    hold_out,
    load_split,
    make_kfold,
    make_split,
    save_split,
    split_records,
)
from bus_core.errors import DataError


def _texture(seed: int) -> np.ndarray:
    """A smooth random 72x72 grayscale field (different seeds look unrelated)."""
    rng = np.random.default_rng(seed)
    cells = Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8))
    field = np.asarray(cells.resize((72, 72), Image.BICUBIC), float) + rng.normal(0, 4, (72, 72))
    return field.clip(0, 255).astype(np.uint8)


def _save(array: np.ndarray, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


@pytest.fixture(scope="module")
def dup_data(tmp_path_factory) -> tuple[Path, dict[str, set[str]]]:
    """A BUSI-layout folder with near-duplicate sets (shift, text mark, JPEG re-save, the same
    file in two classes) and unrelated images; returns it and the expected duplicate sets."""
    root = tmp_path_factory.mktemp("dups") / "DUP"
    a, b, c = _texture(1), _texture(2), _texture(3)
    _save(a[:64, :64], root / "benign" / "a.png")
    _save(a[1:65, 1:65], root / "benign" / "a shifted.png")
    marked = Image.fromarray(a[:64, :64])
    ImageDraw.Draw(marked).text((4, 50), "RT 2", fill=255)
    _save(np.asarray(marked), root / "benign" / "a marked.png")
    _save(b[:64, :64], root / "malignant" / "b.png")
    _save(b[:64, :64], root / "malignant" / "b resaved.jpg", quality=70)
    _save(c[:64, :64], root / "benign" / "c.png")
    _save(c[:64, :64], root / "malignant" / "c.png")
    for i, seed in enumerate(range(10, 16)):
        _save(_texture(seed)[:64, :64], root / CLASSES[i % 3] / f"single {i}.png")
    sets = {"a": {"DUP/benign/a.png", "DUP/benign/a shifted.png", "DUP/benign/a marked.png"},
            "b": {"DUP/malignant/b.png", "DUP/malignant/b resaved.jpg"},
            "c": {"DUP/benign/c.png", "DUP/malignant/c.png"}}
    return root, sets


def test_near_duplicates_share_a_group(dup_data):
    root, sets = dup_data
    records = load_records(root)
    groups = find_groups(records)
    assert set(groups) == {r.id for r in records}
    for ids in sets.values():
        assert len({groups[i] for i in ids}) == 1
        assert groups[next(iter(ids))] == min(ids)  # named by its smallest id
    assert len(set(groups.values())) == 3 + 6
    assert groups.params["max_distance"] == 44 and groups.params["hash_size"] == 8
    assert describe_groups(groups, records) == (
        "13 images in 9 groups (3 groups with several images, 1 across labels)")


def test_tolerance_zero_keeps_only_exact_copies(dup_data):
    root, sets = dup_data
    groups = find_groups(load_records(root), max_distance=0)
    assert groups["DUP/benign/c.png"] == groups["DUP/malignant/c.png"]
    assert groups["DUP/benign/a.png"] != groups["DUP/benign/a shifted.png"]


def test_split_without_groups_finds_them(dup_data):
    root, sets = dup_data
    records = load_records(root)
    for seed in range(4):
        split = make_split(records, ratios=(0.4, 0.3, 0.3), seed=seed)
        for ids in sets.values():
            assert sum(bool(ids & set(split.subset(s))) for s in ("train", "val", "test")) == 1
    assert split.stats["grouping"]["method"] == "phash+dhash+dhash_vertical"
    assert split.stats["n_cross_label_groups"] == 1


def test_16_bit_copy_matches_and_unreadable_file_is_named(tmp_path):
    texture = _texture(7)[:64, :64]
    _save(texture, tmp_path / "X" / "benign" / "eight.png")
    Image.fromarray(texture.astype(np.uint16) * 256).save(tmp_path / "X" / "benign" / "sixteen.png")
    groups = find_groups(load_records(tmp_path / "X"))
    assert groups["X/benign/eight.png"] == groups["X/benign/sixteen.png"]
    (tmp_path / "X" / "benign" / "broken.png").write_text("not an image")
    with pytest.raises(DataError, match="broken.png"):
        find_groups(load_records(tmp_path / "X"))


def test_patients_are_grouped(tmp_path):
    for source in ("one", "two"):
        for i in range(4):
            _save(_texture(20 + i)[:64, :64] if source == "one" else _texture(30 + i)[:64, :64],
                  tmp_path / source / f"{i}.png")
        (tmp_path / source / "labels.csv").write_text(
            "path,label,patient\n0.png,benign,p1\n1.png,malignant,p1\n2.png,benign,p2\n"
            "3.png,benign,\n")
    records = load_many([tmp_path / "one" / "labels.csv", tmp_path / "two" / "labels.csv"])
    groups = find_groups(records)
    assert groups["one/0.png"] == groups["one/1.png"] == "one/0.png"
    assert groups["two/0.png"] == groups["two/1.png"] == "two/0.png"
    assert groups["one/0.png"] != groups["two/0.png"]  # patient ids are per source
    assert len({groups[f"one/{i}.png"] for i in range(4)}) == 3


def _records(n_groups: int = 120, seed: int = 0) -> tuple[list[Record], dict[str, str]]:
    """Image-free records in groups of 1-4 images (labels 50/30/20 %; some mixed groups)."""
    rng = np.random.default_rng(seed)
    records, groups = [], {}
    for g in range(n_groups):
        label = rng.choice(CLASSES, p=[0.2, 0.5, 0.3])
        for k in range(int(rng.integers(1, 5))):
            mixed = k == 1 and g % 17 == 0
            record = Record(id=f"S/{g:03d}_{k}.png", path=Path(f"/nowhere/{g}_{k}.png"),
                            label="malignant" if mixed else str(label), source="S")
            records.append(record)
            groups[record.id] = f"S/{g:03d}_0.png"
    return records, groups


def _sides(split: Split, groups: dict[str, str]) -> dict[str, set[str]]:
    sides: dict[str, set[str]] = {}
    for name in ("train", "val", "test"):
        for i in split.subset(name):
            sides.setdefault(groups[i], set()).add(name)
    return sides


def test_split_keeps_groups_whole_and_stratifies():
    records, groups = _records()
    split = make_split(records, seed=3, groups=groups)
    ids = split.train + split.val + split.test
    assert sorted(ids) == sorted(r.id for r in records) and len(set(ids)) == len(ids)
    assert all(len(s) == 1 for s in _sides(split, groups).values())
    label = {r.id: r.label for r in records}
    overall = Counter(r.label for r in records)
    for name, ratio in zip(("train", "val", "test"), (0.7, 0.15, 0.15)):
        subset = split.subset(name)
        assert abs(len(subset) / len(records) - ratio) < 0.03
        counts = Counter(label[i] for i in subset)
        for c in CLASSES:
            assert abs(counts[c] / len(subset) - overall[c] / len(records)) < 0.05
        assert split.stats["n"][name]["total"] == len(subset)
    assert split.stats["n_groups"] == 120 and split.stats["grouping"] == {"method": "given"}
    assert split.stats["n_cross_label_groups"] > 0


def test_split_is_reproducible_and_seeded():
    records, groups = _records()
    first = make_split(records, seed=1, groups=groups)
    assert make_split(list(reversed(records)), seed=1, groups=groups) == first
    assert make_split(records, seed=2, groups=groups).test != first.test


def test_split_input_errors():
    records, groups = _records(10)
    with pytest.raises(DataError, match="add up to 1"):
        make_split(records, ratios=(0.5, 0.2, 0.2), groups=groups)
    with pytest.raises(DataError, match="do not cover 1 of"):
        make_split(records, groups={k: v for k, v in list(groups.items())[1:]})
    with pytest.raises(DataError, match="Unknown subset"):
        make_split(records, groups=groups).subset("dev")


def test_hold_out_moves_a_site_out_of_training(tmp_path):
    records, groups = _records()
    base = make_split(records, seed=0, groups=groups)
    held = set(base.train[:5] + base.val[:4] + base.test[:3])
    split = hold_out(base, records, held)
    assert not held & set(split.train + split.val)
    assert split.test == sorted(base.val[:4] + base.test[:3])
    assert split.train == [i for i in base.train if i not in held]
    assert split_records(records, split, "test")[0].id == split.test[0]
    assert load_split(save_split(split, tmp_path / "loso.json")) == split
    with pytest.raises(DataError, match="nothing to test on"):
        hold_out(base, records, base.train[:3])


def test_kfold_disjoint_and_covering():
    records, groups = _records()
    folds = make_kfold(records, 5, seed=0, groups=groups)
    assert len(folds) == 5
    tests = [set(f.test) for f in folds]
    assert set().union(*tests) == {r.id for r in records}
    assert sum(len(t) for t in tests) == len(records)
    for k, fold in enumerate(folds):
        assert all(len(s) == 1 for s in _sides(fold, groups).values())
        assert len(fold.train) + len(fold.val) + len(fold.test) == len(records)
        assert abs(len(fold.val) / len(records) - 0.15) < 0.04
        assert abs(len(fold.test) / len(records) - 0.2) < 0.04
        assert fold.stats["fold"] == k and fold.stats["k"] == 5
    no_val = make_kfold(records, 3, groups=groups, val_ratio=0)
    assert all(f.val == [] for f in no_val)
    with pytest.raises(DataError, match="too few"):
        make_kfold(records[:3], 5, groups=groups)


def test_split_file_round_trip(tmp_path):
    records, groups = _records(30)
    split = make_split(records, seed=5, groups=groups)
    path = save_split(split, tmp_path / "sub" / "split.json")
    assert load_split(path) == split
    content = json.loads(path.read_text())
    assert {"train", "val", "test", "seed", "data_hash", "ratios", "stats",
            "groups"} <= set(content)
    assert "/nowhere" not in path.read_text()  # ids only, no machine paths
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # no temporary file left


@pytest.mark.parametrize("text, message", [
    ("{not json", "not a readable split file"),
    ("[1, 2]", "not a split file"),
    ('{"train": [], "val": [], "seed": 0, "data_hash": "x"}', "no valid 'test' list"),
    ('{"train": ["a"], "val": ["a"], "test": [], "seed": 0, "data_hash": "x"}',
     "more than one subset"),
    ('{"train": ["a"], "val": [], "test": [], "seed": 0}', "seed or data hash"),
])
def test_bad_split_files(tmp_path, text, message):
    path = tmp_path / "split.json"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        load_split(path)


def test_missing_split_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "none.json")


def test_data_hash_follows_ids_and_labels_not_paths():
    records, _ = _records(10)
    moved = [replace(r, path=Path("/elsewhere") / r.path.name) for r in records]
    assert data_hash(moved) == data_hash(reversed(records))
    relabelled = [replace(records[0], label="normal" if records[0].label != "normal" else "benign"),
                  *records[1:]]
    assert data_hash(relabelled) != data_hash(records)


def test_split_records_checks_the_data():
    records, groups = _records(30)
    split = make_split(records, seed=0, groups=groups)
    test = split_records(records, split, "test")
    assert [r.id for r in test] == split.test
    extra = Record(id="OTHER/x.png", path=Path("/x.png"), label="benign", source="OTHER")
    assert split_records([extra, *records], split, "test") == test  # other datasets are ignored
    with pytest.raises(DataError, match="1 of the .* images of this split are not in the data"):
        split_records(records[1:], split, "train")
    changed = [replace(records[0], label="normal" if records[0].label != "normal" else "benign"),
               *records[1:]]
    with pytest.raises(DataError, match="data changed"):
        split_records(changed, split, "val")
