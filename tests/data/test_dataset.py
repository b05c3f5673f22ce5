from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bus_core.data.dataset import Record, class_counts, load_many, load_records, write_manifest
from bus_core.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)
    return path


def _busi(root: Path) -> Path:
    base = root / "BUSI"
    _png(base / "benign" / "benign (2).png")
    for suffix in ("_mask", "_mask_2", "_mask_1"):
        _png(base / "benign" / f"benign (2){suffix}.png", 255)
    _png(base / "benign" / "benign (10).png")
    _png(base / "benign" / "benign (10)_mask.png", 255)
    _png(base / "Malignant" / "m 1.jpg")
    _png(base / "normal" / "normal (1).png")
    _png(base / "normal" / "orphan_mask.png")  # a mask without its image: not an image
    (base / "normal" / "notes.txt").write_text("not an image")
    _png(base / "extra" / "x.png")  # not a class folder: ignored
    return base


def test_busi_layout_with_multi_masks(tmp_path):
    records = load_records(_busi(tmp_path))
    assert [r.id for r in records] == ["BUSI/Malignant/m 1.jpg", "BUSI/benign/benign (10).png",
                                       "BUSI/benign/benign (2).png", "BUSI/normal/normal (1).png"]
    by_id = {r.id: r for r in records}
    multi = by_id["BUSI/benign/benign (2).png"]
    assert [p.name for p in multi.masks] == ["benign (2)_mask.png", "benign (2)_mask_1.png",
                                             "benign (2)_mask_2.png"]
    assert multi.label == "benign" and multi.source == "BUSI" and multi.patient is None
    assert multi.path.is_absolute() and multi.path.is_file()
    assert by_id["BUSI/Malignant/m 1.jpg"].label == "malignant"
    assert by_id["BUSI/Malignant/m 1.jpg"].masks == ()
    assert len(by_id["BUSI/benign/benign (10).png"].masks) == 1
    assert class_counts(records) == {"normal": 1, "benign": 2, "malignant": 1}


def test_ids_do_not_depend_on_the_folder_location(tmp_path):
    first = load_records(_busi(tmp_path / "a"))
    second = load_records(_busi(tmp_path / "b" / "c"))
    assert [r.id for r in first] == [r.id for r in second]
    assert first[0].path != second[0].path


def test_folder_without_class_folders_explains(tmp_path):
    (tmp_path / "data" / "Images").mkdir(parents=True)
    (tmp_path / "data" / "labels.csv").write_text("path,label\n")
    with pytest.raises(DataError, match="no class folders.*labels.csv"):
        load_records(tmp_path / "data")
    _busi(tmp_path / "data")
    with pytest.raises(DataError, match="Did you mean .*BUSI"):
        load_records(tmp_path / "data")


def test_class_folders_without_images(tmp_path):
    (tmp_path / "BUSI" / "benign").mkdir(parents=True)
    _png(tmp_path / "BUSI" / "benign" / "a_mask.png")
    with pytest.raises(DataError, match="contain no images"):
        load_records(tmp_path / "BUSI")


def test_missing_source(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nothing")
    (tmp_path / "list.txt").write_text("x")
    with pytest.raises(DataError, match="CSV"):
        load_records(tmp_path / "list.txt")


def _manifest(root: Path, rows: str, header: str = "path,mask,label,patient,extra") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("Images/a.png", "Images/b.png", "Images/c.png", "Masks/a.png", "Masks/a2.png"):
        _png(root / name)
    csv = root / "labels.csv"
    csv.write_text(f"{header}\n{rows}", encoding="utf-8")
    return csv


def test_csv_manifest(tmp_path):
    csv = _manifest(tmp_path / "BUSBRA",
                    "Images/a.png,Masks/a.png;Masks/a2.png,Benign,7,x\n"
                    "./Images/b.png,,MALIGNANT ,7,y\n"
                    "\n"
                    "Images\\c.png,Masks/a.png,normal,,z\n")
    records = load_records(csv)
    assert [r.id for r in records] == ["BUSBRA/Images/a.png", "BUSBRA/Images/b.png",
                                       "BUSBRA/Images/c.png"]
    a, b, c = records
    assert a.label == "benign" and [p.name for p in a.masks] == ["a.png", "a2.png"]
    assert b.label == "malignant" and b.masks == () and b.patient == "7"
    assert c.patient is None and c.source == "BUSBRA" and c.path.is_file()


def test_csv_unknown_label_names_line(tmp_path):
    csv = _manifest(tmp_path / "d", "Images/a.png,,benign,1,\nImages/b.png,,cyst,2,\n")
    with pytest.raises(DataError, match=r"'cyst' on line 3 of .*labels.csv"):
        load_records(csv)


def test_csv_missing_files_name_line(tmp_path):
    csv = _manifest(tmp_path / "d", "Images/a.png,,benign,1,\nImages/zz.png,,benign,2,\n")
    with pytest.raises(DataError, match=r"'Images/zz.png' on line 3 of .*labels.csv"):
        load_records(csv)
    csv = _manifest(tmp_path / "e", "Images/a.png,Masks/none.png,benign,1,\n")
    with pytest.raises(DataError, match=r"mask 'Masks/none.png' on line 2"):
        load_records(csv)


def test_csv_without_label_column(tmp_path):
    csv = _manifest(tmp_path / "d", "Images/a.png,1\n", header="path,patient")
    with pytest.raises(DataError, match="no label column"):
        load_records(csv)


def test_load_many_concatenates_and_rejects_duplicates(tmp_path):
    busi = _busi(tmp_path)
    csv = _manifest(tmp_path / "BUSBRA", "Images/a.png,,benign,1,\n")
    records = load_many([busi, csv])
    assert len(records) == 5 and records == sorted(records, key=lambda r: r.id)
    assert {r.source for r in records} == {"BUSI", "BUSBRA"}
    with pytest.raises(DataError, match="more than once"):
        load_many([busi, busi])


def test_manifest_round_trip_keeps_masks_and_patients(tmp_path):
    records = [r if r.label != "normal" else Record(r.id, r.path, r.label, r.masks, "p7", r.source)
               for r in load_records(_busi(tmp_path))]
    manifest = write_manifest(records[1:], tmp_path / "elsewhere" / "subset.csv")
    again = load_records(manifest)

    def key(rs):
        return sorted((r.path.resolve(), r.label, tuple(m.resolve() for m in r.masks), r.patient)
                      for r in rs)

    assert key(again) == key(records[1:])
    assert len(next(r for r in again if r.path.name == "benign (2).png").masks) == 3


def test_record_is_frozen():
    record = Record(id="X/a.png", path=Path("a.png"), label="benign")
    with pytest.raises(AttributeError):
        record.label = "malignant"  # type: ignore[misc]


@pytest.mark.realdata
def test_real_busi_counts():
    if not (SHARED_DATA / "BUSI").is_dir():
        pytest.skip("../shared/data/BUSI is not available")
    records = load_records(SHARED_DATA / "BUSI")
    assert len(records) == 662
    assert class_counts(records) == {"normal": 113, "benign": 371, "malignant": 178}
    assert sum(len(r.masks) for r in records) == 678
    assert records[0].id.startswith("BUSI/") and all(r.masks for r in records)


@pytest.mark.realdata
def test_real_busbra_manifest():
    if not (SHARED_DATA / "BUSBRA" / "labels.csv").is_file():
        pytest.skip("../shared/data/BUSBRA is not available")
    records = load_records(SHARED_DATA / "BUSBRA" / "labels.csv")
    assert len(records) == 1875
    assert class_counts(records) == {"normal": 0, "benign": 1268, "malignant": 607}
    assert len({r.patient for r in records}) == 1064
