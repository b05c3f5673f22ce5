"""Tests for bus_core.inference.batch: batch prediction of files, folders, manifests and DICOM
series into a resumable CSV file."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bus_core.data.dataset import load_records, write_manifest
from bus_core.data.images import load_image, load_mask
from bus_core.errors import BusError
from bus_core.inference.batch import (
    BatchItem,
    list_items,
    predict_to_csv,
    result_columns,
    study_columns,
    write_studies,
)
from bus_core.inference.predict import Predictor
from bus_core.inference.study import LEAST_NORMAL, combine
from bus_core.models.build import load_model
from tests.conftest import copy_model, synthetic_image
from tests.data.test_images import write_dicom


@pytest.fixture(scope="module")
def predictor(tiny_model_dir: Path) -> Predictor:
    return Predictor(load_model(tiny_model_dir), "cpu-fp32", backend="torch")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three good images (one without a suffix, in a subfolder), a truncated PNG, a text file
    named .png, a 2-frame DICOM, and files that are no images to predict (a lesion mask, a
    note, a text file without a suffix)."""
    root = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(1)
    for i, label in enumerate(("normal", "benign")):
        Image.fromarray(synthetic_image(label, rng)[0]).save(root / f"scan{i}.png")
    Image.fromarray(synthetic_image("benign", rng)[0][..., 0]).save(root / "scan0_mask.png")
    (root / "series").mkdir()
    Image.fromarray(synthetic_image("malignant", rng)[0]).save(root / "series" / "export",
                                                               format="PNG")
    (root / "broken.png").write_bytes((root / "scan0.png").read_bytes()[:200])
    (root / "notes.png").write_text("not an image")
    (root / "readme.txt").write_text("no image either")
    (root / "series" / "LOG").write_text("a text file without a suffix")
    frames = np.stack([synthetic_image(label, rng)[0][..., 0] for label in ("benign", "normal")])
    write_dicom(root / "series" / "cine.dcm", frames, "MONOCHROME2", NumberOfFrames=2)
    return root


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_folder_gives_one_row_per_image_frame_and_bad_file(predictor, folder, tmp_path):
    out = tmp_path / "results.csv"
    report = predict_to_csv([folder], out, predictor, workers=0, batch_size=3)
    rows = {(Path(r["file"]).relative_to(folder).as_posix(), r["frame"]): r
            for r in read_rows(out)}
    assert set(rows) == {("scan0.png", ""), ("scan1.png", ""), ("series/export", ""),
                         ("series/cine.dcm", "0"), ("series/cine.dcm", "1"),
                         ("broken.png", ""), ("notes.png", "")}
    assert (report.predicted, report.errors, report.already_done) == (7, 2, 0)
    assert "truncated or damaged" in rows[("broken.png", "")]["error"]
    assert "text file, not an image" in rows[("notes.png", "")]["error"]
    for key in (("broken.png", ""), ("notes.png", "")):
        assert rows[key]["label"] == rows[key]["p_malignant"] == ""
    good = [r for r in rows.values() if not r["error"]]
    assert all(r["label"] in predictor.classes and r["model"] == "tiny-test" for r in good)
    assert all(r["uncertain"] in ("True", "False") and "Unusual image size" in r["warnings"]
               for r in good)
    assert {r["model_sha256"] for r in rows.values()} == {predictor.loaded.weights_id[:12]}
    assert list(read_rows(out)[0]) == result_columns(predictor.classes)


def test_batch_probabilities_equal_predictor_predict(tiny_model_dir, folder, tmp_path):
    flagging = Predictor(load_model(copy_model(tiny_model_dir, tmp_path / "m",
                                               malignant_threshold=0.3)), "cpu-fp32",
                         backend="torch")
    out = tmp_path / "results.csv"
    predict_to_csv([folder], out, flagging, workers=0, batch_size=4)
    good = [r for r in read_rows(out) if not r["error"]]
    assert len(good) == 5
    for row in good:
        single = flagging.predict(load_image(row["file"], frame=int(row["frame"] or 0)))
        batch = [float(row[f"p_{c}"]) for c in flagging.classes]
        assert np.allclose(batch, [single.probabilities[c] for c in flagging.classes],
                           atol=1e-4)
        assert row["label"] == single.label and row["uncertain"] == str(single.uncertain)
        assert row["flag"] == str(single.malignant_flag)
        assert row["warnings"] == " | ".join(single.warnings)


def test_resume_skips_rows_already_written(predictor, folder, tmp_path):
    out = tmp_path / "results.csv"
    first = predict_to_csv([folder], out, predictor, workers=0)
    written = out.read_text(encoding="utf-8")
    again = predict_to_csv([folder], out, predictor, workers=0)
    assert (again.predicted, again.already_done) == (0, first.predicted)
    assert out.read_text(encoding="utf-8") == written
    lines = written.splitlines(keepends=True)
    out.write_text("".join(lines[:-1]) + lines[-1][:20], encoding="utf-8")  # stopped mid-row
    resumed = predict_to_csv([folder], out, predictor, workers=0)
    assert (resumed.predicted, resumed.already_done) == (1, first.predicted - 1)
    assert out.read_text(encoding="utf-8") == written


def test_a_csv_of_another_model_or_layout_is_refused(predictor, folder, tmp_path):
    out = tmp_path / "results.csv"
    predict_to_csv([folder / "scan0.png"], out, predictor, workers=0)
    rows = read_rows(out)
    rows[0]["model_sha256"] = "0123456789ab"
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(BusError, match="written by another model"):
        predict_to_csv([folder], out, predictor, workers=0)
    other = tmp_path / "other.csv"
    other.write_text("path,label\nx.png,benign\n", encoding="utf-8")
    with pytest.raises(BusError, match="columns differ"):
        predict_to_csv([folder], other, predictor, workers=0)


def test_manifest_keeps_the_true_label(predictor, busi_dir, tmp_path):
    records = load_records(busi_dir)[::5]
    manifest = write_manifest(records, tmp_path / "subset.csv")
    out = tmp_path / "results.csv"
    predict_to_csv([manifest], out, predictor, workers=0)
    rows = read_rows(out)
    assert [(r["file"], r["true_label"]) for r in rows] == [(str(r.path), r.label)
                                                            for r in records]
    assert not any(r["error"] for r in rows)


def test_a_manifest_with_patients_gives_one_row_per_study(predictor, busi_dir, tmp_path):
    records = load_records(busi_dir)[:5]
    patients = ["p1", "p1", "p2", "p2", ""]  # the last image has no patient: no study
    manifest = write_manifest([dataclasses.replace(r, patient=p or None)
                               for r, p in zip(records, patients, strict=True)],
                              tmp_path / "studies.csv")
    out = tmp_path / "results.csv"
    predict_to_csv([manifest], out, predictor, workers=0)
    items = list_items([manifest])
    assert [item.study for item in items] == patients
    assert write_studies(items, out, tmp_path / "results-studies.csv", predictor) == 2
    rows = read_rows(tmp_path / "results-studies.csv")
    assert list(rows[0]) == study_columns(predictor.classes)
    images = read_rows(out)
    for row, members in zip(rows, ([0, 1], [2, 3]), strict=True):
        probs = np.array([[float(images[i][f"p_{c}"]) for c in predictor.classes]
                          for i in members])
        expected = combine(probs, LEAST_NORMAL, predictor.classes)
        assert row["images"] == "2" and row["rule"] == LEAST_NORMAL
        assert [float(row[f"p_{c}"]) for c in predictor.classes] == pytest.approx(expected)
        labels = {records[i].label for i in members}
        severest = max(labels, key=("normal", "benign", "malignant").index)
        assert row["true_label"] == severest


def test_lesion_models_read_manifest_masks_and_refuse_images_without(tiny_model_dir, busi_dir,
                                                                     tmp_path):
    lesion = Predictor(load_model(copy_model(tiny_model_dir, tmp_path / "lesion",
                                             input_mode="mask")), "cpu-fp32", backend="torch")
    record = next(r for r in load_records(busi_dir) if r.label == "benign")
    manifest = write_manifest([record], tmp_path / "one.csv")
    out = tmp_path / "results.csv"
    predict_to_csv([manifest, busi_dir / "normal" / "normal (1).png"], out, lesion, workers=0)
    with_mask, without = read_rows(out)
    image = load_image(record.path)
    single = lesion.predict(image, [load_mask(m, shape=image.shape[:2]) for m in record.masks])
    assert np.isclose(float(with_mask["p_benign"]), single.probabilities["benign"], atol=1e-4)
    assert "lesion mask" in without["error"] and without["label"] == ""


@pytest.mark.slow
def test_worker_processes_give_the_same_csv(predictor, folder, tmp_path):
    serial, parallel = tmp_path / "serial.csv", tmp_path / "parallel.csv"
    predict_to_csv([folder], serial, predictor, workers=0, batch_size=2)
    predict_to_csv([folder], parallel, predictor, workers=2, batch_size=2)
    assert serial.read_bytes() == parallel.read_bytes()


def test_inputs_are_listed_once_in_order(folder):
    items = list_items([folder / "scan1.png", folder, folder / "missing.png"])
    assert items[0] == BatchItem(folder / "scan1.png")
    assert [i.file for i in items].count(folder / "scan1.png") == 1
    assert items[-1] == BatchItem(folder / "missing.png")
    assert BatchItem(folder / "series" / "cine.dcm", 1) in items


def test_multi_page_tiff_gives_one_item_per_page_and_damaged_headers_one(tmp_path):
    pages = [Image.fromarray(np.full((40, 48), v, np.uint8)) for v in (10, 90, 200)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    (tmp_path / "cut.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    assert [i.frame for i in list_items([tmp_path])] == [None, 0, 1, 2]
