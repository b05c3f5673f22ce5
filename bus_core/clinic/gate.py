"""The safety gate between a retrained model and the clinic: a candidate replaces the active
model only if it is not worse, and every decision is written down.

A candidate passes when, for each gated metric (malignant sensitivity and accuracy by default),
it is not worse than the active model by more than `tolerance`, both on the fixed test split
(the same images every time) and on the held-out share of the radiologists' new cases. Not
worse means the whole 95% interval of the difference (candidate - active, a paired bootstrap:
both models scored on the same resampled images, `intervals.paired_difference`) lies within the
tolerance, so a difference the images cannot rule out counts, not only the one observed. A
metric that does not exist for either model on a subset (e.g. no malignant case among the new
ones) is skipped; one that exists for the active model but not for the candidate fails.

Decisions (activation, override, refusal, rejection, roll back, and a model made active by hand
in the model registry) are appended as JSON lines to
`<data dir>/model_decisions.jsonl`, which is never rewritten. Models are never deleted here: a roll
back makes an earlier model active again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bus_core import atomic
from bus_core.clinic.cases import open_store
from bus_core.data.dataset import Record
from bus_core.errors import BusError, storage
from bus_core.evaluation.evaluate import Evaluation, evaluate
from bus_core.evaluation.intervals import paired_difference
from bus_core.metrics import HEADLINE_KEYS, LOWER_IS_BETTER, METRIC_LABELS
from bus_core.models.build import load_model
from bus_core.models.card import CARD_FILE, ModelCard, read_card
from bus_core.models.registry import active_model_path, set_active_model
from bus_core.roles import Identity, require
from bus_core.settings import data_dir
from bus_core.training.runs import read_json_lines

DECISIONS_FILE = "model_decisions.jsonl"
GATE_FILE = "gate.json"
"""Where the app keeps a candidate's gate result: in the candidate's model folder."""
DEFAULT_TOLERANCE = 0.02
DEFAULT_KEYS: tuple[str, ...] = ("malignant_sensitivity", "accuracy")
FIXED_TEST, NEW_CASES = "fixed_test", "new_cases"
GATE_SUBSETS: dict[str, str] = {FIXED_TEST: "the fixed test split",
                           NEW_CASES: "the held-out new cases"}
"""The subsets a candidate is judged on, with how they are named in sentences."""
SUMMARY_KEYS: tuple[str, ...] = ("n", *HEADLINE_KEYS)
"""The metrics kept in a gate result and the decision log (besides the gated ones)."""
MADE_ACTIVE: frozenset[str] = frozenset({"activated", "overridden", "rolled back",
                                        "made active"})
"""The actions after which the decision's candidate is the active model."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class GateError(BusError):
    """A decision that cannot be recorded (no name to sign it with)."""


@dataclass
class GateResult:
    """The gate's verdict: `candidate` and `active` map each subset (FIXED_TEST, NEW_CASES) to
    the models' metrics there; `differences` map it to the 95% interval [low, high] of
    candidate - active of each gated metric (where there were per-image results to resample);
    `reasons` are sentences, one per failed or skipped check."""

    passed: bool
    reasons: list[str]
    candidate: dict[str, dict[str, Any]]
    active: dict[str, dict[str, Any]]
    tolerance: float
    keys: tuple[str, ...] = DEFAULT_KEYS
    candidate_path: str | None = None
    active_path: str | None = None
    created: str = field(default_factory=_now)
    differences: dict[str, dict[str, list[float] | None]] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """The comparison table: one row per subset and gated metric (candidate, active,
        difference, its 95% interval, and whether it is within the tolerance; None where
        skipped)."""
        rows = []
        for subset in GATE_SUBSETS:
            for key in self.keys:
                new = self.candidate.get(subset, {}).get(key)
                old = self.active.get(subset, {}).get(key)
                spread = self.differences.get(subset, {}).get(key)
                rows.append({"subset": subset, "metric": key, "candidate": new, "active": old,
                             "difference": None if new is None or old is None else new - old,
                             "difference_ci95": spread,
                             "ok": _check(key, new, old, self.tolerance, spread)})
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateResult:
        """The result `to_dict` gave."""
        values = dict(data)
        values["keys"] = tuple(values.get("keys") or DEFAULT_KEYS)
        return cls(**values)

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON (atomically)."""
        target = Path(path)
        with storage(f"save the gate result {target}"):
            target.parent.mkdir(parents=True, exist_ok=True)
            return atomic.write_text(target, json.dumps(self.to_dict(), indent=2,
                                                        allow_nan=False))

    @classmethod
    def load(cls, path: str | Path) -> GateResult | None:
        """The result saved at `path`, or None when there is none (or it is unreadable)."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError):
            return None


def _check(key: str, candidate: float | None, active: float | None, tolerance: float,
           spread: Sequence[float] | None = None) -> bool | None:
    """True if `candidate` is within the tolerance of `active` at the worse end of `spread`
    (the interval of candidate - active; without one, the difference itself), False if worse
    or missing, None when neither model has the metric (skipped)."""
    if candidate is None:
        return None if active is None else False
    if active is None:
        return True
    low, high = spread or (candidate - active, candidate - active)
    worse_by = high if key in LOWER_IS_BETTER else -low
    return worse_by <= tolerance + 1e-12


def _summary(metrics: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: metrics.get(k) for k in dict.fromkeys((*SUMMARY_KEYS, *keys))}


def _reason(subset: str, key: str, candidate: float | None, active: float | None,
            tolerance: float, ok: bool | None, spread: Sequence[float] | None) -> str | None:
    where, name = GATE_SUBSETS[subset], key.replace("_", " ")
    if ok is None:
        return f"{name.capitalize()} is not defined on {where} for either model: not compared."
    if ok:
        return None
    if candidate is None:
        return (f"The new model has no {name} on {where}, while the active model has "
                f"{active:.3f}.")
    if spread is None:
        return (f"{name.capitalize()} on {where} is {candidate:.3f} for the new model against "
                f"{active:.3f} for the active one: worse by more than the allowed "
                f"{tolerance:.3f}.")
    return (f"{name.capitalize()} on {where} is {candidate:.3f} for the new model against "
            f"{active:.3f} for the active one; the 95% interval of the difference is "
            f"[{spread[0]:+.3f}, {spread[1]:+.3f}]: it may be worse by more than the allowed "
            f"{tolerance:.3f}.")


def compare(candidate_metrics: Mapping[str, Mapping[str, Any]],
            active_metrics: Mapping[str, Mapping[str, Any]], *,
            tolerance: float = DEFAULT_TOLERANCE,
            keys: Sequence[str] = DEFAULT_KEYS,
            differences: Mapping[str, Mapping[str, list[float] | None]] | None = None
            ) -> GateResult:
    """Judge a candidate against the active model. Both arguments map a subset name
    (FIXED_TEST, NEW_CASES) to a metrics dict (as `evaluate` gives); a subset missing on both
    sides is skipped. `differences` maps a subset to the 95% interval of candidate - active of
    each key (`intervals.paired_difference`); a metric without one is judged by its difference
    alone. The candidate passes when no gated metric fails on any subset and at least one was
    compared."""
    if tolerance < 0:
        raise ValueError("The tolerance cannot be negative.")
    candidate = {s: _summary(candidate_metrics.get(s) or {}, keys) for s in GATE_SUBSETS}
    active = {s: _summary(active_metrics.get(s) or {}, keys) for s in GATE_SUBSETS}
    spreads = {s: {k: (differences or {}).get(s, {}).get(k) for k in keys} for s in GATE_SUBSETS}
    reasons, checks = [], []
    for subset in GATE_SUBSETS:
        for key in keys:
            new, old, spread = candidate[subset][key], active[subset][key], spreads[subset][key]
            checks.append(ok := _check(key, new, old, tolerance, spread))
            reason = _reason(subset, key, new, old, tolerance, ok, spread)
            if reason:
                reasons.append(reason)
    compared = [ok for ok in checks if ok is not None]
    if not compared:
        reasons.append("No metric could be compared: the new model is not accepted blindly.")
    return GateResult(bool(compared) and all(compared), reasons, candidate, active, tolerance,
                      tuple(keys), differences=spreads)


def evaluate_candidate(candidate_path: str | Path, active_path: str | Path | None,
                       fixed_records: Sequence[Record], new_heldout_records: Sequence[Record],
                       *, tolerance: float = DEFAULT_TOLERANCE,
                       keys: Sequence[str] = DEFAULT_KEYS, device: str = "auto",
                       batch_size: int = 32) -> GateResult:
    """Evaluate the candidate and the active model (default: the current one) on the fixed test
    records and the held-out new cases, and `compare` them, each difference with its paired
    bootstrap interval. With no active model at all the candidate passes (there is nothing to
    be worse than)."""
    active_path = active_path or active_model_path()
    subsets = {FIXED_TEST: list(fixed_records), NEW_CASES: list(new_heldout_records)}
    candidate = _evaluations(candidate_path, subsets, device, batch_size)
    active = _evaluations(active_path, subsets, device, batch_size) if active_path else {}
    differences = {name: paired_difference(new.y_true, new.probs, active[name].probs, keys,
                                           new.classes)
                   for name, new in candidate.items()
                   if name in active and new.classes == active[name].classes}
    result = compare({name: e.metrics for name, e in candidate.items()},
                     {name: e.metrics for name, e in active.items()}, tolerance=tolerance,
                     keys=keys, differences=differences)
    result.candidate_path = str(Path(candidate_path).resolve())
    result.active_path = str(Path(active_path).resolve()) if active_path else None
    if not active_path:
        result.reasons.insert(0, "There is no active model: nothing to compare with.")
    if not subsets[NEW_CASES]:
        result.reasons.append("There are no held-out new cases yet: only the fixed test split "
                              "was compared.")
    return result


def _evaluations(path: str | Path, subsets: Mapping[str, list[Record]], device: str,
                 batch_size: int) -> dict[str, Evaluation]:
    loaded = load_model(path)
    return {name: evaluate(loaded, records, device=device, batch_size=batch_size,
                           data={"subset": name, "n": len(records)})
            for name, records in subsets.items() if records}


# --- decisions -------------------------------------------------------------------------------

def decisions_path() -> Path:
    """The decision log of versions before the database kept it:
    `<data dir>/model_decisions.jsonl` (read, never written)."""
    return data_dir() / DECISIONS_FILE


def _signed(who: Identity, action: str) -> str:
    """The name that signs a decision of `who`, who must be allowed `action`."""
    name = require(who, action).name.strip()
    if not name:
        raise GateError("Every model decision is signed: it needs a signed-in user's name.")
    return name


def _append(entry: dict[str, Any]) -> dict[str, Any]:
    """Add one decision to the model decision log of the case database."""
    with open_store() as store:
        store.append_decision(entry)
    return entry


def _entry(action: str, who: str, candidate: str | Path | None, previous: Path | None,
           result: GateResult | None, reason: str | None) -> dict[str, Any]:
    return {"time": _now(), "action": action, "who": who,
            "candidate": str(Path(candidate).resolve()) if candidate else None,
            "active": str(previous.resolve()) if previous else None,
            "passed": None if result is None else result.passed,
            "override_reason": reason,
            "tolerance": None if result is None else result.tolerance,
            "reasons": [] if result is None else result.reasons,
            "metrics": None if result is None else {"candidate": result.candidate,
                                                    "active": result.active,
                                                    "differences_ci95": result.differences}}


def activate_if_passed(result: GateResult, candidate_path: str | Path, *,
                       override_reason: str | None = None, who: Identity) -> bool:
    """Make the candidate the active model if it passed the gate, or if `override_reason` is
    given; otherwise leave the active model as it is. The decision is logged either way and
    signed by `who` (role admin). Returns True when the candidate became active."""
    reason = (override_reason or "").strip() or None
    name = _signed(who, "override_gate" if reason else "manage_models")
    if result.candidate_path and Path(result.candidate_path) != Path(candidate_path).resolve():
        raise GateError(f"This comparison was made for {Path(result.candidate_path).name}, not "
                        f"for {Path(candidate_path).name}: compare that model first.")
    previous = active_model_path()
    if result.passed or reason:
        set_active_model(candidate_path, who=who)
        action = "activated" if result.passed else "overridden"
    else:
        action = "blocked"
    _append(_entry(action, name, candidate_path, previous, result, reason))
    return action != "blocked"


SMALL_TEST_N = 100
"""A test subset of fewer images gives figures too uncertain to choose the clinic's model by."""


def activation_warnings(candidate: ModelCard, active: ModelCard | None) -> list[str]:
    """What a person making `candidate` active by hand (without the gate) should read first:
    its test subset is small or missing, its card's test figures are lower than the active
    model's by more than the gate's tolerance, or the two were tested on different images."""
    test = candidate.metrics.get("test") or {}
    n = test.get("n")
    warnings = []
    if not test:
        warnings.append("This model has no test figures.")
    elif not n or n < SMALL_TEST_N:
        warnings.append(f"This model was tested on only {n or 'an unknown number of'} images "
                        f"(fewer than {SMALL_TEST_N}): its figures are uncertain.")
    before = (active.metrics.get("test") or {}) if active else {}
    if not test or not before:
        return warnings
    for key in DEFAULT_KEYS:
        new, old = test.get(key), before.get(key)
        if _check(key, new, old, DEFAULT_TOLERANCE) is False:
            warnings.append(f"Its {METRIC_LABELS[key].lower()} on its test images is "
                            f"{'–' if new is None else f'{new:.3f}'}, lower than the active "
                            f"model's {old:.3f}.")
    hashes = {(figures.get("data") or {}).get("data_hash") for figures in (test, before)}
    if len(hashes) != 1 or None in hashes:
        warnings.append("The two models were tested on different images (or the cards do not "
                        "say which): their figures are not strictly comparable.")
    return warnings


def make_active(candidate_path: str | Path, *, who: Identity, reason: str) -> dict[str, Any]:
    """Make a model the active one by hand, without the gate (role admin): `reason` is
    required, and the decision is logged as 'made active' with who, when, why and the
    warnings of `activation_warnings`. Returns the logged entry."""
    name = _signed(who, "manage_models")
    why = (reason or "").strip()
    if not why:
        raise GateError("Say why this model should become the clinic's model: the reason is "
                        "kept in the model decision log.")
    previous = active_model_path()
    candidate = read_card(candidate_path)
    warnings = activation_warnings(candidate, read_card(previous) if previous else None)
    set_active_model(candidate_path, who=who)
    entry = _entry("made active", name, candidate_path, previous, None, why)
    entry["reasons"] = warnings
    return _append(entry)


def reject(result: GateResult | None, candidate_path: str | Path, *, who: Identity,
           reason: str | None = None) -> None:
    """Record that `who` (role researcher) turned a candidate down (it stays on disk; the
    active model stays)."""
    _append(_entry("rejected", _signed(who, "train"), candidate_path, active_model_path(), result,
                   (reason or "").strip() or None))


def rollback(to_path: str | Path, who: Identity, *, reason: str | None = None) -> None:
    """Make an earlier model active again (role admin; logged as 'rolled back')."""
    name = _signed(who, "manage_models")
    previous = active_model_path()
    set_active_model(to_path, who=who)
    _append(_entry("rolled back", name, to_path, previous, None, (reason or "").strip() or None))


def decision_log() -> list[dict[str, Any]]:
    """Every logged decision, oldest first: those of the earlier JSON-lines file (a
    half-written last line ignored), then those of the case database."""
    with open_store() as store:
        return read_json_lines(decisions_path()) + store.decisions()


def earlier_models(log: Sequence[dict[str, Any]] | None = None) -> list[Path]:
    """Models that were active at some point, most recent first, that still exist, without
    the current active model: the roll-back targets the log knows of (`log`: the
    `decision_log()` already read, else it is read)."""
    current = active_model_path()
    seen: dict[Path, None] = {}
    for entry in reversed(decision_log() if log is None else log):
        if entry.get("action") in MADE_ACTIVE and entry.get("candidate"):
            seen.setdefault(Path(entry["candidate"]), None)
        if entry.get("active"):
            seen.setdefault(Path(entry["active"]), None)
    return [p for p in seen
            if (current is None or p != current.resolve()) and (p / CARD_FILE).is_file()]


DECIDED: frozenset[str] = frozenset({"activated", "overridden", "rejected"})
"""The actions that settle a candidate's fate."""


def decision_for(candidate: str | Path, log: Sequence[dict[str, Any]] | None = None
                 ) -> dict[str, Any] | None:
    """The last activation, override or rejection of the candidate model folder, if any
    (`log`: the `decision_log()` already read, else it is read)."""
    target = str(Path(candidate).resolve())
    return next((e for e in reversed(decision_log() if log is None else log)
                 if e.get("candidate") == target and e.get("action") in DECIDED), None)


def current_result(candidate: str | Path) -> GateResult | None:
    """The gate result saved beside the candidate, if it was made against today's active
    model (a comparison with an earlier active model no longer counts)."""
    result = GateResult.load(Path(candidate) / GATE_FILE)
    active = active_model_path()
    if result is None or result.active_path != (str(active.resolve()) if active else None):
        return None
    return result
