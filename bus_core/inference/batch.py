"""Batch prediction into a CSV file, one row per image
(`python -m bus_core predict INPUT [INPUT ...] --out results.csv`):

    inputs --list_items--> (file, frame) items
           --DataLoader worker processes: io.load_image, Predictor.prepare--> tensors
           --Predictor.predict_batch (batched, on the predictor's device)--> rows appended

A two-stage predictor (`predict.Predictor.two_stage`) needs each image itself (its outline
model runs first): the workers only decode, and `Predictor.predict` reads the images one by one.

Inputs are image / DICOM files, folders (searched recursively: files with an image suffix, lesion
masks `<name>_mask*` left out, and files without a suffix whose content is an image) and CSV
manifests (`dataset.load_records`: their label is kept as `true_label`, their masks feed lesion
models). A multi-frame DICOM or multi-page TIFF given as a file or found in a folder gives one
row per frame; a folder of .dcm files gives one row per file.

Images of a manifest with a patient column are also read per study (`study.DEFAULT_RULE`):
`write_studies` writes one row per study beside the images' file.

A file that cannot be read or used gives a row with its `error` (the `BusError` message) and no
prediction. Resumable: rows already in the CSV (by file and frame, error rows included) are
skipped, new rows are appended and flushed after every batch, so a stopped run loses at most the
batch in flight; a CSV written with another model is refused. Cells go through
`dataset.csv_safe`.
"""

from __future__ import annotations

import csv
import io as _io
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from bus_core.atomic import write_text as atomic_write_text
from bus_core.constants import IMAGE_SUFFIXES
from bus_core.data.dataset import csv_safe, load_records, mask_owner
from bus_core.data.images import RASTER_FORMATS, frame_count, load_image, load_mask, sniff_kind
from bus_core.errors import BusError, storage
from bus_core.inference.predict import Prediction, Predictor, Prepare
from bus_core.inference.study import DEFAULT_RULE, combine_readings, most_severe

READABLE_KINDS = frozenset({fmt.lower() for fmt in RASTER_FORMATS} | {"dicom"})
"""What `images.sniff_kind` calls the files `images.load_image` reads (for files without a
suffix)."""
DEFAULT_BATCH_SIZE = 16
"""Images per forward pass of `predict_to_csv` (and of the command)."""
WARNING_SEPARATOR = " | "
SHA_CHARS = 12
"""Characters of the weights' sha256 kept in the `model_sha256` column."""


def default_workers() -> int:
    """Worker processes that decode images: one per CPU core, at most 4."""
    return min(4, os.cpu_count() or 1)


def result_columns(classes: Sequence[str]) -> list[str]:
    """The CSV header for a model with output classes `classes`."""
    return ["file", "frame", "true_label", "label", *(f"p_{c}" for c in classes), "uncertain",
            "flag", "warnings", "error", "model", "model_sha256"]


@dataclass(frozen=True)
class BatchItem:
    """One image to predict: a file, its frame (None: a single-frame file), and from a
    manifest its lesion mask files, its known label and its study (the patient column; ''
    when unknown)."""

    file: Path
    frame: int | None = None
    masks: tuple[Path, ...] = ()
    true_label: str = ""
    study: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """(file, frame) as the CSV keeps them: what resuming compares."""
        return csv_safe(str(self.file)), "" if self.frame is None else str(self.frame)


@dataclass
class BatchReport:
    """What `predict_to_csv` did: rows written (errors included), error rows, images skipped
    because their rows were already there, and the seconds the new rows took."""

    predicted: int = 0
    errors: int = 0
    already_done: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        """Rows written per second (0 when none)."""
        return self.predicted / self.seconds if self.seconds > 0 else 0.0

    def summary(self, out: Path) -> str:
        """One line for the command line."""
        return (f"{self.predicted} image{'' if self.predicted == 1 else 's'} predicted "
                f"({self.errors} error{'' if self.errors == 1 else 's'}, {self.already_done} "
                f"already in {out}) in {self.seconds:.1f} s: {self.images_per_s:.1f} images/s.")


def list_items(inputs: Sequence[str | Path]) -> list[BatchItem]:
    """The images named by `inputs` (see the module docstring), each once, in input order."""
    items: list[BatchItem] = []
    for given in inputs:
        path = _absolute(Path(given).expanduser())
        if path.is_dir():
            items += [item for file in _folder_images(path) for item in _frames(file)]
        elif path.suffix.lower() == ".csv":
            items += [BatchItem(_absolute(r.path), masks=r.masks, true_label=r.label,
                                study=r.patient or "") for r in load_records(path)]
        else:
            items += _frames(path)
    unique: dict[tuple[str, str], BatchItem] = {}
    for item in items:
        unique.setdefault(item.key, item)
    return list(unique.values())


def _absolute(path: Path) -> Path:
    """`path` absolute and without '..' (links kept): how the CSV names a file."""
    return Path(os.path.normpath(path.absolute()))


def _folder_images(folder: Path) -> list[Path]:
    """The image files under `folder` (recursively, hidden files and lesion masks left out)."""
    return [path for path in sorted(folder.rglob("*"))
            if path.is_file() and not path.name.startswith(".") and (
                path.suffix.lower() in IMAGE_SUFFIXES and not mask_owner(path.stem)
                or not path.suffix and _content_is_image(path))]


def _content_is_image(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return sniff_kind(fh.read(132)) in READABLE_KINDS
    except OSError:
        return False


def _frames(file: Path) -> list[BatchItem]:
    """One item for a single-frame file, one per frame for a multi-frame one."""
    count = frame_count(file)
    return [BatchItem(file)] if count == 1 else [BatchItem(file, f) for f in range(count)]


class _Decoded(NamedTuple):
    """One item after its worker: the tensor and scope warnings (or, for a two-stage
    predictor, the image and its masks), or the error message."""

    position: int
    tensor: torch.Tensor | None
    warnings: list[str]
    error: str
    image: np.ndarray | None = None
    masks: tuple[np.ndarray, ...] = ()


class _Images(Dataset):
    """The items read and prepared for the model (run in the DataLoader's workers); with
    `prepare` None (a two-stage predictor), read only."""

    def __init__(self, items: Sequence[BatchItem], prepare: Prepare | None) -> None:
        self.items, self.prepare = list(items), prepare

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> _Decoded:
        item = self.items[index]
        try:
            image = load_image(item.file, frame=item.frame or 0)
            reads_masks = self.prepare is None or self.prepare.spec.uses_masks
            masks = tuple(load_mask(m, shape=image.shape[:2]) for m in item.masks) \
                if reads_masks else ()
            if self.prepare is None:
                return _Decoded(index, None, [], "", image, masks)
            tensor, warnings = self.prepare(image, masks)
        except BusError as exc:
            return _Decoded(index, None, [], str(exc))
        return _Decoded(index, tensor, warnings, "")


def _collate(decoded: list[_Decoded]) -> tuple[list[_Decoded], torch.Tensor | None]:
    """A batch: its items without their tensors, and the tensors stacked (None if none)."""
    tensors = [d.tensor for d in decoded if d.tensor is not None]
    return [d._replace(tensor=None) for d in decoded], torch.stack(tensors) if tensors else None


def predict_to_csv(inputs: Sequence[str | Path], out: str | Path, predictor: Predictor, *,
                   batch_size: int = DEFAULT_BATCH_SIZE, workers: int | None = None,
                   progress: bool = False) -> BatchReport:
    """Predict every image of `inputs` not yet in the CSV `out` and append its row (see the
    module docstring); `workers` processes decode (default `default_workers()`, 0: none)."""
    out = Path(out).expanduser()
    items = list_items(inputs)
    if not items:
        raise BusError(f"There are no images in {', '.join(map(str, inputs))}.")
    columns = result_columns(predictor.classes)
    sha = predictor.loaded.weights_id[:SHA_CHARS]
    done = _rows_done(out, columns, sha)
    todo = [item for item in items if item.key not in done]
    report = BatchReport(already_done=len(items) - len(todo))
    if not todo:
        return report
    loader = DataLoader(_Images(todo, None if predictor.two_stage else predictor.prepare),
                        batch_size=max(1, batch_size),
                        num_workers=default_workers() if workers is None else workers,
                        collate_fn=_collate)
    start = time.perf_counter()
    with storage(f"write the results file {out}"):
        out.parent.mkdir(parents=True, exist_ok=True)
        fh = open(out, "a", newline="", encoding="utf-8")
    with fh, tqdm(total=len(todo), disable=not progress, desc="predict", unit="img") as bar:
        writer = csv.writer(fh)
        if fh.tell() == 0:
            writer.writerow(columns)
        for decoded, tensors in loader:
            readable = [d for d in decoded if not d.error]
            predictions = iter(_predictions(predictor, readable, tensors))
            for d in decoded:
                row = _row(todo[d.position], None if d.error else next(predictions), d.error,
                           predictor)
                writer.writerow([csv_safe(cell) for cell in [*row, predictor.card.name, sha]])
            fh.flush()
            report.predicted += len(decoded)
            report.errors += len(decoded) - len(readable)
            bar.update(len(decoded))
    report.seconds = time.perf_counter() - start
    return report


def _predictions(predictor: Predictor, readable: list[_Decoded],
                 tensors: torch.Tensor | None) -> list[Prediction]:
    """The predictions of a batch's readable items, in order."""
    if predictor.two_stage:
        return [predictor.predict(d.image, d.masks) for d in readable if d.image is not None]
    return predictor.predict_batch(tensors, [d.warnings for d in readable]) \
        if tensors is not None else []


def _row(item: BatchItem, prediction: Prediction | None, error: str,
         predictor: Predictor) -> list[str]:
    """The cells of one image up to `error` (`result_columns` order)."""
    file, frame = str(item.file), "" if item.frame is None else str(item.frame)
    if prediction is None:
        return [file, frame, item.true_label, "", *([""] * len(predictor.classes)), "", "", "",
                error]
    flag = prediction.malignant_flag
    return [file, frame, item.true_label, prediction.label,
            *(f"{prediction.probabilities[c]:.6f}" for c in predictor.classes),
            str(prediction.uncertain), "" if flag is None else str(flag),
            WARNING_SEPARATOR.join(prediction.warnings), ""]


def _rows_done(out: Path, columns: list[str], sha: str) -> set[tuple[str, str]]:
    """(file, frame) of the rows already in `out` (none if it does not exist); a partial last
    row (a run stopped while writing it) is removed. BusError for a CSV with other columns or
    rows of another model."""
    if not out.is_file():
        return set()
    with storage(f"read the results file {out}"):
        data = out.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[:data.rfind(b"\n") + 1]
            os.truncate(out, len(data))
    try:
        rows = list(csv.reader(_io.StringIO(data.decode("utf-8"), newline="")))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise BusError(f"{out} is not a results file of batch prediction ({exc}): give "
                       "another --out file.") from exc
    if not rows:
        return set()
    if rows[0] != columns:
        raise BusError(f"{out} is not a results file of batch prediction with this model (its "
                       "columns differ): give another --out file.")
    model, sha_at = columns.index("model"), columns.index("model_sha256")
    for row in rows[1:]:
        if len(row) == len(columns) and row[sha_at] != sha:
            raise BusError(f"The rows in {out} were written by another model ({row[model]}, "
                           f"weights {row[sha_at]}): give another --out file, or that model.")
    return {(row[0], row[1]) for row in rows[1:] if len(row) == len(columns)}



def study_columns(classes: Sequence[str]) -> list[str]:
    """The header of the per-study CSV for a model with output classes `classes`."""
    return ["study", "images", "true_label", "label", *(f"p_{c}" for c in classes),
            "uncertain", "flag", "rule", "model"]


def write_studies(items: Sequence[BatchItem], results: str | Path, out: str | Path,
                  predictor: Predictor, rule: str = DEFAULT_RULE) -> int:
    """From the images' rows in `results`, one row per study of `items` (those with a study)
    into the CSV `out` (rewritten), by `rule`; images without a reading are left out. The
    number of studies written."""
    columns = result_columns(predictor.classes)
    with storage(f"read the results file {results}"):
        rows = list(csv.DictReader(Path(results).read_text(encoding="utf-8").splitlines()))
    read = {(r["file"], r["frame"]): {c: float(r[f"p_{c}"]) for c in predictor.classes}
            for r in rows if not r.get("error") and set(columns) <= set(r)}
    studies: dict[str, list[BatchItem]] = {}
    for item in items:
        if item.study and item.key in read:
            studies.setdefault(item.study, []).append(item)
    lines = [study_columns(predictor.classes)]
    for study, members in studies.items():
        reading = combine_readings([read[m.key] for m in members], rule,
                                   uncertain_below=predictor.card.uncertain_below,
                                   threshold=predictor.card.malignant_threshold)
        truths = [m.true_label for m in members if m.true_label in predictor.classes]
        truth = predictor.classes[most_severe([predictor.classes.index(t) for t in truths],
                                              predictor.classes)] if truths else ""
        lines.append([study, str(len(members)), truth, reading.label,
                      *(f"{reading.probabilities[c]:.6f}" for c in predictor.classes),
                      str(reading.uncertain),
                      "" if predictor.card.malignant_threshold is None else str(bool(reading.flag)),
                      rule,
                      predictor.card.name])
    buffer = _io.StringIO()
    csv.writer(buffer).writerows([[csv_safe(cell) for cell in line] for line in lines])
    with storage(f"write the studies file {out}"):
        atomic_write_text(Path(out), buffer.getvalue())
    return len(studies)
