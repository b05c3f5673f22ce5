"""Retraining on reviewed cases: export, held-out split, fine-tune plan, and a tiny end-to-end
run judged by the gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bus_core.clinic.cases import CaseStore, open_store
from bus_core.clinic.gate import FIXED_TEST, NEW_CASES, compare, evaluate_candidate
from bus_core.clinic.retraining import HELDOUT_FILE, load_plan, prepare_retraining
from bus_core.data.dataset import load_records
from bus_core.data.splits import find_groups, load_split, make_split, save_split
from bus_core.errors import DataError, ModelError
from bus_core.evaluation.evaluate import evaluate
from bus_core.models.build import load_model
from bus_core.settings import user_models_dir
from bus_core.training.train import train
from tests.clinic.test_gate import always
from tests.conftest import ADMIN, person, synthetic_image

LABELS = ("normal", "benign", "malignant")
TINY = {"epochs": 1, "batch_size": 4, "device": "cpu-fp32", "save_dtype": "float32"}


@pytest.fixture(scope="module")
def base_split(busi_dir, tmp_path_factory) -> Path:
    records = load_records(busi_dir)
    split = make_split(records, seed=0, groups=find_groups(records))
    return save_split(split, tmp_path_factory.mktemp("split") / "split.json")


@pytest.fixture
def active(monkeypatch, tmp_path, tiny_model_dir) -> Path:
    """Own data folder; the active model always predicts 'malignant'."""
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.delenv("BUS_MODEL", raising=False)
    return always("malignant", tiny_model_dir, tmp_path / "active")


@pytest.fixture
def store(tmp_path):
    with open_store(tmp_path / "cases.sqlite") as opened:
        yield opened


def add_case(store: CaseStore, image: np.ndarray, label: str | None, predicted: str = "benign",
             masks: tuple = ()) -> int:
    """Save a case; review it as `label` unless None. Returns its id."""
    case = store.save_case(image, image_name="scan.png", masks=masks, model_name="tiny",
                           model_hash="abc", probabilities={predicted: 1.0},
                           predicted_label=predicted, who=person())
    if label is not None:
        store.review_case(case.id, label=label, who=person("Dr A"))
    return case.id


def add_reviewed(store: CaseStore, count: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    ids = []
    for i in range(count):
        label = LABELS[i % 3]
        image, mask = synthetic_image(label, rng)
        ids.append(add_case(store, image, label, masks=(mask,) if mask.any() else ()))
    return ids


def test_plan_splits_cases_and_fine_tunes_the_active_model(store, active, busi_dir, base_split,
                                                           tmp_path):
    reviewed = add_reviewed(store, 9, seed=1)
    unreviewed = add_case(store, synthetic_image("benign", np.random.default_rng(2))[0], None)
    split = load_split(base_split)
    duplicates = [add_case(store, np.asarray(Image.open(busi_dir.parent / image_id)), "benign")
                  for image_id in (split.test[0], split.val[0])]  # images the split evaluates on

    plan = prepare_retraining(store, base_data=[busi_dir], base_split=base_split,
                              out_dir=tmp_path / "work", heldout_share=0.3, name="rt1",
                              active=active, settings=TINY, who=ADMIN)

    assert plan.excluded_cases == duplicates
    assert sorted(plan.train_cases + plan.heldout_cases) == reviewed
    assert unreviewed not in plan.train_cases + plan.heldout_cases
    assert 1 <= len(plan.heldout_cases) <= 5
    config = plan.config
    assert config.init == str(active.resolve()) and config.arch == "densenet121"
    assert (config.resize, config.crop, config.fit) == (40, 32, "crop")
    assert config.margin == 0.1  # the card's crop margin, kept
    assert config.split == str(base_split.resolve()) and config.data == [str(busi_dir.resolve())]
    assert config.extra_train == [plan.train_manifest]
    assert Path(config.out) == user_models_dir() / "rt1" and config.epochs == 1
    assert len(load_records(plan.train_manifest)) == len(plan.train_cases)
    assert len(plan.heldout_records()) == len(plan.heldout_cases)
    assert [r.id for r in plan.fixed_test_records()] == load_split(base_split).test
    saved = json.loads((tmp_path / "work" / HELDOUT_FILE).read_text())
    assert saved["heldout"] == plan.heldout_cases and saved["excluded"] == duplicates
    assert load_plan(config.out) == plan


def test_held_out_cases_stay_held_out(store, active, busi_dir, base_split, tmp_path):
    add_reviewed(store, 6, seed=3)
    first = prepare_retraining(store, base_data=[busi_dir], base_split=base_split,
                               out_dir=tmp_path / "work", heldout_share=0.4, name="rt1",
                               active=active, who=ADMIN)
    kept_out = first.heldout_cases[0]
    same_image = store.load_image(store.get_case(kept_out))
    twin = add_case(store, same_image, "malignant")  # the same lesion seen again
    add_reviewed(store, 6, seed=4)
    second = prepare_retraining(store, base_data=[busi_dir], base_split=base_split,
                                out_dir=tmp_path / "work", heldout_share=0.4, name="rt2",
                                active=active, who=ADMIN)
    assert set(first.heldout_cases) <= set(second.heldout_cases)
    assert set(first.train_cases) <= set(second.train_cases)
    assert twin in second.heldout_cases
    assert len(second.train_cases) > len(first.train_cases)


def test_refusals(store, active, busi_dir, base_split, tmp_path, monkeypatch):
    options = dict(base_data=[busi_dir], base_split=base_split, out_dir=tmp_path / "work")
    with pytest.raises(DataError, match="no reviewed cases"):
        prepare_retraining(store, active=active, **options, who=ADMIN)
    add_reviewed(store, 3, seed=5)
    with pytest.raises(DataError, match="held-out share"):
        prepare_retraining(store, active=active, heldout_share=1.0, **options, who=ADMIN)
    with pytest.raises(ValueError, match="Unknown training settings"):
        prepare_retraining(store, active=active, settings={"epochz": 2}, name="x1", **options,
                           who=ADMIN)
    (user_models_dir() / "taken").mkdir(parents=True)
    with pytest.raises(ModelError, match="already exists"):
        prepare_retraining(store, active=active, name="taken", **options, who=ADMIN)
    monkeypatch.setattr("bus_core.clinic.retraining.active_model_path", lambda: None)
    with pytest.raises(ModelError, match="No model is installed"):
        prepare_retraining(store, **options, who=ADMIN)


@pytest.mark.slow
def test_retrain_end_to_end_then_gate(store, active, busi_dir, base_split, tmp_path,
                                      tiny_model_dir):
    add_reviewed(store, 6, seed=6)
    plan = prepare_retraining(store, base_data=[busi_dir], base_split=base_split,
                              out_dir=tmp_path / "work", name="rt-e2e", active=active,
                              settings=TINY, who=ADMIN)
    result = train(plan.config)
    assert result.status == "done"
    card = load_model(plan.model_dir).card
    n_base = len(load_split(base_split).train)
    assert card.training_data["n_train"] == n_base + len(plan.train_cases)
    assert card.init == str(active.resolve())
    assert card.metrics["test"]["n"] == len(plan.fixed_test_records())

    fixed, heldout = plan.fixed_test_records(), plan.heldout_records()
    judged = evaluate_candidate(plan.model_dir, active, fixed, heldout, device="cpu-fp32")
    assert judged.candidate[FIXED_TEST]["n"] == len(fixed)
    assert judged.active[NEW_CASES]["n"] == len(heldout) > 0

    worse = load_model(always("normal", tiny_model_dir, tmp_path / "worse"))
    worse_metrics = {FIXED_TEST: evaluate(worse, fixed, device="cpu-fp32").metrics,
                     NEW_CASES: evaluate(worse, heldout, device="cpu-fp32").metrics}
    blocked = compare(worse_metrics, judged.active)
    assert not blocked.passed
    assert any("malignant sensitivity" in r.lower() for r in blocked.reasons)


def test_plan_status_without_a_run(tmp_path):
    from bus_core.clinic.retraining import RetrainPlan
    from bus_core.training.train import TrainConfig

    plan = RetrainPlan(config=TrainConfig(data=["x"], out=str(tmp_path / "m")), active_model="a",
                       cases_dir="c", train_manifest="t", heldout_manifest="h", heldout_file="f",
                       base_data=["x"], base_split="s", train_cases=[], heldout_cases=[])
    assert plan.status() == "not started"
    plan.files.dir.mkdir(parents=True)
    plan.files.config.write_text("{}")
    assert plan.status() == "killed"
    (tmp_path / "m" / "card.json").write_text("{}")
    assert plan.status() == "done"
