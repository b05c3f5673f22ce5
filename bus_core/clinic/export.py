"""Cases out of the store as a BUSI-layout folder with a cases.csv manifest (new training
data, or a copy for the clinic's own records)."""

from __future__ import annotations

import csv
import io
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bus_core import atomic
from bus_core.clinic.cases import Case, CaseStore, display_time
from bus_core.constants import CLASSES
from bus_core.data.dataset import csv_safe
from bus_core.db import ensure_writable
from bus_core.errors import StoreError
from bus_core.roles import Identity, require

_EXPORTED_FILE = re.compile(r"^case-\d+(?:_mask(?:_\d+)?)?\.png$")
_CSV_COLUMNS = ("id", "path", "label", "mask", "mask_source", "predicted", "uncertain", "status",
                *(f"{c}_percent" for c in CLASSES), "model", "model_hash", "reviewer", "notes",
                "image_name", "owner", "created_at", "updated_at")
"""The columns of an export's cases.csv: a percentage (1 decimal) per class; times in local
minutes (`display_time`)."""


def export_busi(store: CaseStore, out_dir: str | Path, *, who: Identity,
                only_confirmed: bool = True) -> Path:
    """Write cases as a BUSI-layout folder: `<out>/<label>/case-<id>.png` with its masks
    `case-<id>_mask.png`, `case-<id>_mask_1.png`, ... and `<out>/cases.csv` (one row per
    case; its path, label and mask columns make it a manifest too). The label is the
    confirmed one; with only_confirmed=False unreviewed cases go under their prediction.
    Files of an earlier export into the same folder are replaced. An admin exports every
    case; a clinician only those they saved. Returns the folder."""
    selected = store.confirmed_cases() if only_confirmed else store.list_cases(
        order_by="id", descending=False)
    if not who.can("export_all"):
        require(who, "export_own")
        selected = [case for case in selected if case.owner == who.name]
    return write_busi(store, selected, out_dir)


def write_busi(store: CaseStore, selected: Sequence[Case], out_dir: str | Path) -> Path:
    """Write `selected` as `export_busi` does (no role check: for the server's own use,
    such as retraining). Returns the folder."""
    out = Path(out_dir).expanduser()
    ensure_writable(out, "Choose a folder you can write to.")
    try:
        _remove_previous_export(out)
        rows = [_export_case(store, case, out) for case in selected]
        _write_csv(out / "cases.csv", rows)
    except OSError as exc:
        raise StoreError(f"Cannot export the cases to {out}: {exc.strerror or exc}.") from exc
    return out


def _export_case(store: CaseStore, case: Case, out: Path) -> dict[str, Any]:
    folder = out / case.label
    folder.mkdir(exist_ok=True)
    stem = f"case-{case.id}"
    names = [f"{stem}.png"] + [f"{stem}_mask.png" if i == 0 else f"{stem}_mask_{i}.png"
                               for i in range(len(case.mask_hashes))]
    for name, content_hash in zip(names, (case.image_hash, *case.mask_hashes)):
        shutil.copyfile(store.existing_file(content_hash, case), folder / name)
    paths = [f"{case.label}/{name}" for name in names]
    return {"id": case.id, "path": paths[0], "label": case.label, "mask": ";".join(paths[1:]),
            "mask_source": case.mask_source or "", "predicted": case.predicted_label,
            "uncertain": "yes" if case.uncertain else "no", "status": case.status,
            **{f"{c}_percent": f"{100 * case.probabilities[c]:.1f}"
               if c in case.probabilities else "" for c in CLASSES},
            "model": case.model_name,
            "model_hash": case.model_hash, "reviewer": case.reviewer, "notes": case.notes,
            "image_name": case.display_name, "owner": case.owner or "",
            "created_at": display_time(case.created_at),
            "updated_at": display_time(case.updated_at)}


def _remove_previous_export(out: Path) -> None:
    for label in CLASSES:
        folder = out / label
        if folder.is_dir():
            for path in folder.iterdir():
                if _EXPORTED_FILE.match(path.name):
                    path.unlink()


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: csv_safe(v) for k, v in row.items()} for row in rows)
    atomic.write_bytes(path, buffer.getvalue().encode("utf-8"))
