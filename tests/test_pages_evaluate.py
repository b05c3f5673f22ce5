"""The Evaluate page through the whole app (AppTest) with the tiny model on synthetic BUSI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from bus_core.data.dataset import load_records
from bus_core.data.roots import OUTSIDE_ROOTS
from bus_core.data.splits import make_split, save_split
from bus_core.models.registry import set_active_model
from bus_core.settings import user_models_dir
from tests.conftest import ADMIN, signed_in_app
from ui.common import md_escape

APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture
def app(monkeypatch, tmp_path, tiny_model_dir, busi_dir):
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.delenv("BUS_MODEL", raising=False)
    for name in ("tiny-a", "tiny-b"):
        shutil.copytree(tiny_model_dir, user_models_dir() / name)
    # not the bundled model, whatever weights/ holds
    set_active_model(user_models_dir() / "tiny-a", who=ADMIN)
    at = signed_in_app(timeout=90)
    at.run()
    at.switch_page("pages/evaluate.py").run()
    assert not at.exception, [e.value for e in at.exception]
    at.text_area(key="eval_data").set_value(str(busi_dir))
    at.text_input(key="eval_split").set_value("")
    return at.run()


def evaluate(at: AppTest) -> AppTest:
    at.button(key="eval_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def table_values(at: AppTest, column: str) -> dict[str, str]:
    frame = next(d.value for d in at.dataframe if column in d.value.columns)
    return dict(zip(frame.iloc[:, 0], frame[column]))


def test_metrics_charts_and_exports_of_one_model(app):
    evaluate(app)
    values = table_values(app, "Value")
    assert values["Images (n)"] == "18"
    assert len(values["Accuracy"]) == 5 and values["Accuracy"].startswith("0.")  # 3 decimals
    low, high = table_values(app, "95% interval")["Accuracy"].strip("[]").split(", ")
    assert float(low) <= float(values["Accuracy"]) <= float(high)
    assert {"Malignant sensitivity", "Malignant specificity", "Macro-F1", "AUC, malignant vs rest",
            "ECE (calibration error, lower is better)", "Images: malignant"} <= set(values)
    assert len(app.get("plotly_chart")) == 3  # confusion matrix, ROC, reliability
    assert len(app.get("download_button")) == 2  # metrics as JSON and as CSV
    assert "18 images from BUSI" in " ".join(c.value for c in app.caption)


def test_a_split_subset_and_a_side_by_side_comparison(app, busi_dir, tmp_path):
    split = save_split(make_split(load_records(busi_dir), seed=0), tmp_path / "split.json")
    app.multiselect(key="eval_models").set_value(
        [str(user_models_dir() / "tiny-a"), str(user_models_dir() / "tiny-b")])
    app.text_input(key="eval_split").set_value(str(split)).run()
    app.selectbox(key="eval_subset").set_value("test")
    evaluate(app)
    comparison = app.dataframe[0].value
    assert list(comparison.columns) == ["tiny-test (models/tiny-a)", "tiny-test (models/tiny-b)"]
    assert comparison.loc["Accuracy"].nunique() == 1  # the same weights score the same
    n = int(comparison.loc["Images (n)"].iloc[0])
    assert 0 < n < 18
    assert f"test subset of {md_escape('split.json')}" in " ".join(c.value for c in app.caption)


def test_misclassified_gallery_with_grad_cam_and_open_in_diagnose(app, busi_dir, monkeypatch):
    from bus_core.inference.predict import Predictor

    explained: list[str] = []
    original = Predictor.explain
    monkeypatch.setattr(Predictor, "explain", lambda self, prediction, target=None, method=
                        "gradcam": explained.append(target) or original(self, prediction, target,
                                                                        method))
    evaluate(app)
    opens = [b for b in app.button if b.key and b.key.startswith("eval_open_")]
    assert opens, "the untrained model should get some images wrong"
    assert len(opens) <= 12 and not explained  # Grad-CAM only on demand
    app.toggle(key="eval_cam").set_value(True).run()
    assert not app.exception and not app.error
    assert len(explained) == len(opens) and len(app.get("image")) >= len(opens)
    app.run()
    assert len(explained) == len(opens)  # computed once per case
    app.button(key="eval_open_0").click().run()
    assert not app.exception, [e.value for e in app.exception]
    path, _ = app.session_state["diagnose_opened"]
    assert Path(path).is_file() and Path(path).is_relative_to(busi_dir)
    assert any(md_escape(Path(path).name) in h.value for h in app.subheader)


def test_grad_cam_of_a_mask_model_uses_its_evaluation_input(app):
    """A leak-free mask model sees lesion-free (normal) images as random tissue crops: their
    Grad-CAM must come from that input, not ask the user for a mask."""
    folder = user_models_dir() / "tiny-mask"
    shutil.copytree(user_models_dir() / "tiny-a", folder)
    card = json.loads((folder / "card.json").read_text())
    (folder / "card.json").write_text(json.dumps({**card, "name": "tiny-mask",
                                                  "input_mode": "mask-leakfree"}))
    app.run()
    app.multiselect(key="eval_models").set_value([str(folder)])
    evaluate(app)
    app.toggle(key="eval_cam").set_value(True).run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    normal_errors = [m.value for m in app.markdown if m.value.startswith("True **normal**")]
    assert len(app.get("image")) >= len(normal_errors) > 0


def test_bad_data_is_an_error_message_not_a_traceback(app, tmp_path):
    app.text_area(key="eval_data").set_value(str(tmp_path / "nowhere"))
    app.button(key="eval_run").click().run()
    assert not app.exception
    assert "does not exist" in " ".join(e.value for e in app.error)


def test_data_and_splits_outside_the_allowed_folders_are_refused(app, busi_dir):
    def errors() -> list[str]:
        assert not app.exception, [e.value for e in app.exception]
        return [e.value.replace("\\", "") for e in app.error]  # Markdown escapes taken out

    for outside in ("/etc", "/no/such/folder"):  # the same words whether it exists or not
        app.text_area(key="eval_data").set_value(outside).run()
        assert errors() == [OUTSIDE_ROOTS] and app.button(key="eval_run").disabled
    app.text_area(key="eval_data").set_value(str(busi_dir))
    app.text_input(key="eval_split").set_value(str(busi_dir / "../../../../etc/split.json")).run()
    assert errors() == [OUTSIDE_ROOTS] and app.button(key="eval_run").disabled


def test_a_researcher_is_not_offered_the_diagnose_page(monkeypatch, tmp_path, tiny_model_dir,
                                                       busi_dir):
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.setenv("BUS_MODEL", str(tiny_model_dir))
    at = signed_in_app("researcher", name="res", timeout=90).run()
    at.switch_page("pages/evaluate.py").run()
    at.text_area(key="eval_data").set_value(str(busi_dir))
    at.text_input(key="eval_split").set_value("")
    evaluate(at.run())
    assert "misclassified" in " ".join(c.value for c in at.caption)
    assert not [b for b in at.button if b.key and b.key.startswith("eval_open_")]


def test_an_outline_model_is_scored_as_served_by_default_and_on_expert_outlines_on_request(
        monkeypatch, tmp_path, tiny_model_dir, tiny_segmenter_dir, busi_dir):
    from bus_core.inference.outline import Segmenter
    from tests.conftest import blob_probabilities, copy_model

    monkeypatch.setattr(Segmenter, "probabilities", blob_probabilities)
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.setenv("BUS_SEGMENTER", str(tiny_segmenter_dir))
    copy_model(tiny_model_dir, user_models_dir() / "lesion", name="tiny-lesion",
               input_mode="lesion-context", crop_margin=0.5)
    set_active_model(user_models_dir() / "lesion", who=ADMIN)
    at = signed_in_app(timeout=90).run()
    at.switch_page("pages/evaluate.py").run()
    at.text_area(key="eval_data").set_value(str(busi_dir))
    at.text_input(key="eval_split").set_value("")
    at.run()
    assert at.radio(key="eval_outlines").value == "served"
    evaluate(at)
    captions = " ".join(c.value for c in at.caption)
    assert "as clinicians get it: on the outlines the outline model suggests" in captions
    assert at.session_state["eval_current"][0].evaluation.metrics["data"]["masks"] == "automatic"
    at.radio(key="eval_outlines").set_value("expert").run()
    evaluate(at)
    assert "on the data's expert outlines" in " ".join(c.value for c in at.caption)


def test_the_page_names_no_command_line_options(app):
    shown = " ".join(str(e.value) for kind in ("markdown", "caption", "info", "warning")
                     for e in app.get(kind))
    assert "outside the app" in shown and "--" not in shown and "python -m" not in shown
