"""Retraining on reviewed cases: fine-tune the active model on its original training data plus
the radiologists' confirmed cases, keeping a fixed share of those cases aside for the gate.

The confirmed cases are exported as a BUSI-layout folder and split by near-duplicate groups into
a training share and a held-out share. Which case is held out is remembered in
`<work dir>/heldout.json`, so a case held out once stays held out in every later retraining (and
a near-duplicate of it joins it). Cases that are near-duplicates of a validation or test image
of the original split are left out of both, so they cannot leak into training, model selection
or the comparison.

The plan of a run is saved beside the new model as `retrain.json`; the gate
(`bus_core.clinic.gate.evaluate_candidate`) then compares the new model with the active one on the
fixed test subset of the original split and on the held-out cases.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from bus_core import atomic
from bus_core.clinic.cases import CaseStore
from bus_core.clinic.export import write_busi
from bus_core.data.dataset import Record, load_many, load_records
from bus_core.data.splits import find_groups, load_split, make_split, split_records
from bus_core.errors import DataError, ModelError, storage
from bus_core.models.card import CARD_FILE, read_card
from bus_core.models.registry import active_model_path, check_model_name, no_model_message
from bus_core.roles import Identity, require
from bus_core.settings import data_dir, user_models_dir
from bus_core.training.jobs import JobStatus, last_job
from bus_core.training.runs import RunFiles
from bus_core.training.train import TrainConfig

PLAN_FILE = "retrain.json"
HELDOUT_FILE = "heldout.json"
CASES_CSV = "cases.csv"
TRAIN_MANIFEST, HELDOUT_MANIFEST = "train.csv", "heldout.csv"
FINE_TUNE_EPOCHS = 5
FINE_TUNE_LR_FACTOR = 0.1
DEFAULT_FINE_TUNE_LR = 1e-5
_KEPT_HYPERPARAMETERS = ("optimizer", "batch_size", "balance", "monitor", "weight_decay",
                         "label_smoothing")


def default_work_dir() -> Path:
    """Where exports and the held-out assignment live: `<data dir>/retrain`."""
    return data_dir() / "retrain"


@dataclass
class RetrainPlan:
    """A fine-tuning run on reviewed cases: its training settings and the data to judge it on.

    The fixed test subset is the 'test' subset of `base_split` over `base_data`; the held-out
    cases are listed in `heldout_manifest` (a CSV manifest, possibly empty)."""

    config: TrainConfig
    active_model: str
    cases_dir: str
    train_manifest: str
    heldout_manifest: str
    heldout_file: str
    base_data: list[str]
    base_split: str
    train_cases: list[int]
    heldout_cases: list[int]
    excluded_cases: list[int] = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc)
                         .isoformat(timespec="seconds"))

    @property
    def model_dir(self) -> Path:
        """The folder the new model is written to."""
        return Path(self.config.out)

    @property
    def files(self) -> RunFiles:
        """The fine-tuning run's files (progress, settings...)."""
        return RunFiles(self.model_dir)

    def status(self) -> JobStatus | Literal["not started"]:
        """'running', 'done', 'cancelled', 'failed', 'killed' or 'not started'."""
        job = last_job()
        if job is not None and Path(job.out).resolve() == self.model_dir.resolve():
            return job.status()
        if (self.model_dir / CARD_FILE).is_file():
            return "done"
        return "killed" if self.files.config.is_file() else "not started"

    def fixed_test_records(self) -> list[Record]:
        """The records of the fixed test subset."""
        return split_records(load_many(self.base_data), load_split(self.base_split), "test")

    def heldout_records(self) -> list[Record]:
        """The held-out new cases as records (empty when none is held out)."""
        return load_records(self.heldout_manifest)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return dataclasses.asdict(self)

    def save(self) -> Path:
        """Write the plan as `<model dir>/retrain.json`."""
        self.model_dir.mkdir(parents=True, exist_ok=True)
        path = self.model_dir / PLAN_FILE
        _write_json(path, self.to_dict())
        return path


def load_plan(model_dir: str | Path) -> RetrainPlan | None:
    """The retraining plan of a model folder, or None when the model was not made by
    `prepare_retraining` (the plan follows a renamed folder)."""
    path = Path(model_dir) / PLAN_FILE
    try:
        data = json.loads(path.read_text())
        data["config"] = TrainConfig(**{**data["config"], "out": str(Path(model_dir))})
        return RetrainPlan(**data)
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None


def find_plans(user_dir: str | Path | None = None) -> list[RetrainPlan]:
    """The retraining plans of the user's models (finished or not), newest first."""
    root = Path(user_dir) if user_dir else user_models_dir()
    plans = [plan for path in sorted(root.glob(f"*/{PLAN_FILE}"))
             if (plan := load_plan(path.parent)) is not None]
    return sorted(plans, key=lambda plan: plan.created, reverse=True)


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    atomic.write_text(path, json.dumps(content, indent=2))


@storage("prepare the retraining")
def prepare_retraining(store: CaseStore, *, who: Identity, base_data: Sequence[str | Path],
                       base_split: str | Path, out_dir: str | Path | None = None,
                       heldout_share: float = 0.2, seed: int = 0, name: str | None = None,
                       active: str | Path | None = None,
                       settings: Mapping[str, Any] | None = None) -> RetrainPlan:
    """Export the confirmed cases under `<out_dir>/<name>/cases`, split them into a training
    and a held-out share, and plan a fine-tuning of the active model (or `active`) on
    `base_data` with `base_split`, the training share added to its training subset only.

    The model goes to `<user models>/<name>` (default name: retrain-<date>-<time>); `settings`
    overrides training options (epochs, lr, batch_size, device...); `who` needs the
    researcher role and exports every confirmed case. The plan is saved beside
    the model. Raises DataError (no usable cases, data and split that do not match) or
    ModelError (no active model, name taken).
    """
    require(who, "train")
    if not 0.0 <= heldout_share < 1.0:
        raise DataError(f"The held-out share must be at least 0 and below 1, not {heldout_share}.")
    source = Path(active) if active else active_model_path()
    if source is None:
        raise ModelError(no_model_message())
    card = read_card(source)
    data_paths = [str(Path(p).expanduser().resolve()) for p in base_data]
    split_path = str(Path(base_split).expanduser().resolve())
    records, split = load_many(data_paths), load_split(split_path)
    evaluation = [*split_records(records, split, "val"), *split_records(records, split, "test")]

    name = check_model_name(name or datetime.now().strftime("retrain-%Y%m%d-%H%M%S"))
    model_dir = user_models_dir() / name
    if model_dir.exists():
        raise ModelError(f"A model named {name} already exists: choose another name.")
    work = Path(out_dir or default_work_dir()).expanduser().resolve()
    cases_dir = write_busi(store, store.confirmed_cases(), work / name / "cases")
    cases = _exported_cases(cases_dir)
    if not cases:
        raise DataError("There are no reviewed cases yet: confirm or correct some cases first.")

    heldout_file = work / HELDOUT_FILE
    sides = _assign(cases, evaluation, heldout_file, heldout_share, seed)
    chosen = {side: sorted(cid for cid, s in sides.items() if s == side)
              for side in ("train", "heldout", "excluded")}
    if not chosen["train"]:
        raise DataError("None of the reviewed cases can go into training (all are held out "
                        "for the comparison or repeat evaluation images): review more cases "
                        "first.")
    train_csv = _write_manifest(cases_dir / TRAIN_MANIFEST, cases, chosen["train"])
    heldout_csv = _write_manifest(cases_dir / HELDOUT_MANIFEST, cases, chosen["heldout"])

    config = _fine_tune_config(card, source, data_paths, split_path, train_csv, model_dir,
                               settings)
    plan = RetrainPlan(config=config, active_model=str(Path(source).resolve()),
                       cases_dir=str(cases_dir), train_manifest=str(train_csv),
                       heldout_manifest=str(heldout_csv), heldout_file=str(heldout_file),
                       base_data=data_paths, base_split=split_path, train_cases=chosen["train"],
                       heldout_cases=chosen["heldout"], excluded_cases=chosen["excluded"])
    plan.save()
    return plan


@dataclass(frozen=True)
class _Case:
    """One exported case: its store id, its record, and its manifest row."""

    id: int
    record: Record
    row: dict[str, str]


def _exported_cases(cases_dir: Path) -> dict[int, _Case]:
    """The cases of an export, by case id (records read from its cases.csv manifest)."""
    manifest = cases_dir / CASES_CSV
    records = {r.path.resolve(): r for r in load_records(manifest)}
    with open(manifest, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return {int(row["id"]): _Case(int(row["id"]), records[(cases_dir / row["path"]).resolve()],
                                  {k: row[k] for k in ("path", "label", "mask")})
            for row in rows}


def _assign(cases: Mapping[int, _Case], evaluation: Sequence[Record], heldout_file: Path,
            share: float, seed: int) -> dict[int, str]:
    """Case id -> 'train', 'heldout' or 'excluded' (near-duplicate of an `evaluation` image).

    Earlier assignments are kept; a group with a held-out case is held out whole, a group with
    a training case trains, and new groups are split stratified by `share`. The result is
    saved back to `heldout_file`."""
    records = [c.record for c in cases.values()]
    groups = find_groups([*records, *evaluation])
    test_groups = {groups[r.id] for r in evaluation}
    known = _read_assignment(heldout_file)
    case_of = {c.record.id: c.id for c in cases.values()}
    members: dict[str, list[int]] = {}
    for record in records:
        members.setdefault(groups[record.id], []).append(case_of[record.id])

    sides: dict[int, str] = {}
    fresh: list[Record] = []
    for group, ids in members.items():
        previous = {known.get(i) for i in ids}
        side = ("excluded" if group in test_groups else "heldout" if "heldout" in previous
                else "train" if "train" in previous else None)
        if side is None:
            fresh += [cases[i].record for i in ids]
        else:
            sides.update(dict.fromkeys(ids, side))
    if fresh:
        split = make_split(fresh, ratios=(1.0 - share, 0.0, share), seed=seed,
                           groups={r.id: groups[r.id] for r in fresh})
        sides.update({case_of[i]: "train" for i in split.train})
        sides.update({case_of[i]: "heldout" for i in split.test})
    _write_assignment(heldout_file, {**known, **sides}, share, seed)
    return sides


def _read_assignment(path: Path) -> dict[int, str]:
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
        return {int(i): side for side in ("train", "heldout", "excluded")
                for i in content.get(side, [])}
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"The held-out case list {path} is damaged ({exc}); restore it from a "
                        "backup so held-out cases stay out of training.") from exc


def _write_assignment(path: Path, sides: Mapping[int, str], share: float, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, {"format": "bus-heldout/1", "share": share, "seed": seed,
                       **{side: sorted(i for i, s in sides.items() if s == side)
                          for side in ("train", "heldout", "excluded")}})


def _write_manifest(path: Path, cases: Mapping[int, _Case], ids: Sequence[int]) -> Path:
    """A CSV manifest (path, label, mask) of some exported cases."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=("path", "label", "mask"), lineterminator="\n")
        writer.writeheader()
        writer.writerows(cases[i].row for i in ids)
    return path


def _fine_tune_config(card: Any, source: Path, base_data: list[str], base_split: str,
                      train_csv: Path, model_dir: Path,
                      settings: Mapping[str, Any] | None) -> TrainConfig:
    """Fine-tune `source` as its card describes it, at a tenth of its learning rate."""
    hyper = card.hyperparameters or {}
    lr = hyper.get("lr")
    config = TrainConfig(
        data=base_data, out=str(model_dir), arch=card.arch, split=base_split,
        extra_train=[str(train_csv)], input_mode=card.input_mode,
        combine_mode=card.combine_mode, combine_threshold=card.combine_threshold,
        init=str(Path(source).resolve()), resize=card.size.resize, crop=card.size.crop,
        fit=card.size.fit, crop_margin=card.crop_margin, name=model_dir.name,
        epochs=FINE_TUNE_EPOCHS,
        lr=float(lr) * FINE_TUNE_LR_FACTOR if lr else DEFAULT_FINE_TUNE_LR,
        **{k: hyper[k] for k in _KEPT_HYPERPARAMETERS if hyper.get(k) is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings or {}) - known)
    if unknown:
        raise ValueError(f"Unknown training settings: {', '.join(unknown)}.")
    return dataclasses.replace(config, **dict(settings or {}))
