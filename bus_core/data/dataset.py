"""Datasets as lists of records: BUSI-layout folders and CSV manifests.

A BUSI-layout folder holds one subfolder per class (normal, benign, malignant; any case) with
images `<name>.<ext>` and lesion masks `<name>_mask.<ext>`, `<name>_mask_1.<ext>`, ... beside
them. A CSV manifest has a header with the columns `path` and `label`, and optionally `mask`
(empty, one path, or several separated by ';') and `patient`; other columns are ignored and
paths are relative to the CSV's folder (BUS-BRA's `labels.csv` is one).

Record ids are `"<source>/<path relative to the data root>"` with '/' separators, where the
source is the data folder's name or the CSV's folder name, so they are the same on every
machine (e.g. "BUSI/benign/benign (1).png").
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from bus_core import atomic
from bus_core.constants import CLASSES, IMAGE_SUFFIXES
from bus_core.errors import DataError, storage

_MASK_STEM = re.compile(r"^(?P<image>.+)_mask(?:_(?P<n>\d+))?$")


@dataclass(frozen=True)
class Record:
    """One labelled image of a dataset, with its lesion masks (possibly none)."""

    id: str
    path: Path
    label: str
    masks: tuple[Path, ...] = ()
    patient: str | None = None
    source: str = ""


def load_records(source: str | Path) -> list[Record]:
    """The records of a BUSI-layout folder or a CSV manifest, sorted by id."""
    path = Path(source).expanduser()
    if path.is_dir():
        records = _load_folder(path.resolve())
    elif path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"{path} is neither a data folder nor a CSV manifest (.csv).")
        records = _load_csv(path.resolve())
    else:
        raise DataError(f"The data folder or manifest {path} does not exist.")
    _check_unique(records)
    return sorted(records, key=lambda r: r.id)


def source_name(source: str | Path) -> str:
    """The name records of a data folder or CSV manifest carry as their source: the folder's
    name, or the manifest's folder's name (e.g. "BUSBRA" for BUSBRA/labels.csv)."""
    path = Path(source)
    return path.parent.name if path.suffix.lower() == ".csv" else path.name


def load_many(sources: Iterable[str | Path]) -> list[Record]:
    """The records of several folders / manifests together, sorted by id."""
    records = [r for source in sources for r in load_records(source)]
    _check_unique(records)
    return sorted(records, key=lambda r: r.id)


def class_counts(records: Iterable[Record]) -> dict[str, int]:
    """Number of records per class, in CLASSES order (absent classes count 0)."""
    counts = Counter(r.label for r in records)
    return {label: counts.get(label, 0) for label in CLASSES}


def write_manifest(records: Iterable[Record], path: str | Path) -> Path:
    """Write `records` as a CSV manifest (paths relative to its folder) that `load_records`
    reads back to the same images, labels, masks and patients."""
    path = Path(path).expanduser()
    with storage(f"write the manifest {path}"):
        path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()

    def relative(p: Path) -> str:
        return PurePosixPath(Path(os.path.relpath(p.resolve(), folder)).as_posix()).as_posix()

    with storage(f"write the manifest {path}"), atomic.atomic_path(path) as tmp, \
            open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "mask", "patient"])
        for r in records:
            writer.writerow([relative(r.path), r.label, ";".join(relative(m) for m in r.masks),
                             r.patient or ""])
    return path


def _check_unique(records: list[Record]) -> None:
    repeated = [i for i, n in Counter(r.id for r in records).items() if n > 1]
    if repeated:
        raise DataError(f"The image {repeated[0]!r} is listed more than once "
                        f"({len(repeated)} repeated in all); each image may appear only once.")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _load_folder(root: Path) -> list[Record]:
    class_dirs = {d: d.name.lower() for d in sorted(root.iterdir())
                  if d.is_dir() and d.name.lower() in CLASSES}
    if not class_dirs:
        raise DataError(_no_class_folders_message(root))
    records = [record for folder, label in class_dirs.items()
               for record in _folder_records(root, folder, label)]
    if not records:
        raise DataError(f"The class folders of {root} contain no images "
                        f"(looked for {', '.join(IMAGE_SUFFIXES)}).")
    return records


def _no_class_folders_message(root: Path) -> str:
    message = (f"{root} has no class folders: expected subfolders named "
               f"{', '.join(CLASSES)} (as in BUSI), or give a CSV manifest with the columns "
               "path,label.")
    manifests = sorted(p.name for p in root.glob("*.csv"))
    if manifests:
        message += f" This folder contains {', '.join(manifests)}: pass the manifest file instead."
    nested = [d.name for d in sorted(root.iterdir())
              if d.is_dir() and any(c.is_dir() and c.name.lower() in CLASSES for c in d.iterdir())]
    if nested:
        message += f" Did you mean {root / nested[0]}?"
    return message


def mask_owner(stem: str) -> str | None:
    """The image stem a mask file stem belongs to ('x_mask', 'x_mask_1' -> 'x'), else None."""
    match = _MASK_STEM.match(stem)
    return match["image"] if match else None


def _folder_records(root: Path, folder: Path, label: str) -> list[Record]:
    """The records of one class folder: every image that is not a mask, with its masks."""
    images: list[Path] = []
    masks: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(folder.iterdir()):
        if not _is_image(path):
            continue
        match = _MASK_STEM.match(path.stem)
        if match:
            masks.setdefault(match["image"], []).append((int(match["n"] or 0), path))
        else:
            images.append(path)
    source = source_name(root)
    return [Record(id=_record_id(source, path.relative_to(root)), path=path, label=label,
                   masks=tuple(p for _, p in sorted(masks.get(path.stem, []))), source=source)
            for path in images]


def _record_id(source: str, relative: Path | str) -> str:
    return f"{source}/{PurePosixPath(Path(relative).as_posix())}"


def _manifest_rows(manifest: Path) -> list[tuple[int, dict[str, str | None]]]:
    """(line number, row) of every non-empty row of a CSV manifest, column names lower-cased;
    DataError without a path or label column."""
    with storage(f"read the manifest {manifest}"), \
            open(manifest, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        try:
            fields = [(f or "").strip().lower() for f in reader.fieldnames or []]
            missing = [c for c in ("path", "label") if c not in fields]
            if missing:
                raise DataError(f"The manifest {manifest} has no {' or '.join(missing)} column: "
                                "its first line must name the columns, e.g. "
                                "path,label,mask,patient.")
            reader.fieldnames = fields
            return [(reader.line_num, row) for row in reader
                    if any((v or "").strip() for v in row.values() if isinstance(v, str))]
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"The manifest {manifest} is not a readable CSV file (UTF-8 text "
                            f"with a header line): {exc}.") from exc


def _row_files(row: dict[str, str | None]) -> tuple[str, tuple[str, ...]]:
    """The image path and the mask paths of a manifest row, as written (relative to the
    manifest's folder)."""
    masks = (_clean_path(m) for m in (row.get("mask") or "").split(";"))
    return _clean_path(row.get("path")), tuple(m for m in masks if m)


def manifest_paths(manifest: str | Path) -> list[tuple[int, str]]:
    """(line number, path as written) of every image and mask a CSV manifest names."""
    found: list[tuple[int, str]] = []
    for line, row in _manifest_rows(Path(manifest)):
        image, masks = _row_files(row)
        found += [(line, path) for path in (image, *masks) if path]
    return found


def _load_csv(manifest: Path) -> list[Record]:
    return [_csv_record(manifest, line, row) for line, row in _manifest_rows(manifest)]


def _csv_record(manifest: Path, line: int, row: dict[str, str | None]) -> Record:
    """The record of one manifest row (`line` is its line number in the file)."""
    where = f"line {line} of {manifest}"
    label = (row.get("label") or "").strip().lower()
    if label not in CLASSES:
        raise DataError(f"Unknown label {label!r} on {where}: use one of {', '.join(CLASSES)}.")
    relative, masks = _row_files(row)
    if not relative:
        raise DataError(f"No image path on {where}.")
    folder = manifest.parent
    image = folder / relative
    if not image.is_file():
        raise DataError(f"The image {relative!r} on {where} does not exist.")
    for mask in masks:
        if not (folder / mask).is_file():
            raise DataError(f"The mask {mask!r} on {where} does not exist.")
    patient = (row.get("patient") or "").strip() or None
    source = source_name(manifest)
    return Record(id=_record_id(source, os.path.relpath(image, folder)), path=image, label=label,
                  masks=tuple(folder / m for m in masks), patient=patient, source=source)


def _clean_path(value: str | None) -> str:
    """A manifest path with '/' separators (manifests written on Windows use '\\')."""
    return (value or "").strip().replace("\\", "/")


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

def csv_safe(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run as a formula: text starting with =, +, -, @, tab
    or carriage return gets a leading apostrophe; other values are kept."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value
