"""The Teaching page, run through the whole app with Streamlit's AppTest."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

from bus_core.data.dataset import load_records
from bus_core.data.roots import OUTSIDE_ROOTS
from tests.conftest import signed_in_app  # noqa: E402
from ui.common import md_escape

APP = str(Path(__file__).resolve().parents[1] / "app.py")


def open_teaching(monkeypatch, tmp_path, dataset: Path | None, model: Path | None,
                  segmenter: Path | None = None) -> AppTest:
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.setenv("BUS_SEGMENTER", str(segmenter or tmp_path / "no-segmenter"))
    monkeypatch.setenv("BUS_DATASET", str(dataset or tmp_path / "no-such-folder"))
    if model is None:
        monkeypatch.setattr("bus_core.models.registry.bundled_default",
                            lambda *args, **kwargs: None)
        monkeypatch.delenv("BUS_MODEL", raising=False)
    else:
        monkeypatch.setenv("BUS_MODEL", str(model))
    at = signed_in_app(timeout=60)
    at.run()
    at.switch_page("pages/teach.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def truth(at: AppTest, busi_dir: Path) -> str:
    records = load_records(busi_dir)
    return records[at.session_state["teach"].current].label


def answer(at: AppTest, label: str) -> None:
    position = at.session_state["teach"].position
    at.radio(key=f"teach_answer_{position}").set_value(label).run()
    at.button(key=f"teach_check_teach_{position}").click().run()
    assert not at.exception, [e.value for e in at.exception]


def test_answers_update_both_scores(monkeypatch, tmp_path, busi_dir, tiny_model_dir):
    at = open_teaching(monkeypatch, tmp_path, busi_dir, tiny_model_dir)
    assert metric(at, "Your score") == "0 / 0"
    assert metric(at, "Case") == "1 of 18"
    assert not at.success and not at.get("plotly_chart")  # nothing is revealed yet

    right = truth(at, busi_dir)
    answer(at, right)
    assert metric(at, "Your score") == "1 / 1"
    assert metric(at, "Model's score") in {"0 / 1", "1 / 1", "0 / 1 (1 no answer)"}
    assert right in at.success[0].value
    assert len(at.get("plotly_chart")) == 1  # the model's reading
    assert any("Grad-CAM" in c for img in at.get("image") for c in img.captions)

    at.button(key="teach_next_teach_0").click().run()
    assert metric(at, "Case") == "2 of 18"
    wrong = next(c for c in ("normal", "benign", "malignant") if c != truth(at, busi_dir))
    answer(at, wrong)
    assert metric(at, "Your score") == "1 / 2"
    assert metric(at, "Model's score").split(" (")[0].endswith("/ 2")
    assert "you said" in at.error[0].value.lower()


def test_without_a_model_only_the_learner_is_scored(monkeypatch, tmp_path, busi_dir):
    at = open_teaching(monkeypatch, tmp_path, busi_dir, None)
    answer(at, truth(at, busi_dir))
    assert metric(at, "Your score") == "1 / 1"
    assert metric(at, "Model's score") == "–"
    assert any("No model is installed" in c.value for c in at.caption)


def test_bad_folder_gives_a_clear_message(monkeypatch, tmp_path):
    at = open_teaching(monkeypatch, tmp_path, None, None)
    assert "Enter the folder" in at.info[0].value
    at.text_input(key="teach_folder").set_value(str(tmp_path / "missing")).run()
    assert not at.exception
    assert "does not exist" in at.error[0].value


def test_paths_outside_the_allowed_folders_are_refused(monkeypatch, tmp_path):
    at = open_teaching(monkeypatch, tmp_path, None, None)
    at.text_input(key="teach_folder").set_value("/etc/passwd").run()
    assert not at.exception
    assert [e.value.replace("\\", "") for e in at.error] == [OUTSIDE_ROOTS]
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\n../../../../../etc/passwd,benign\n")
    at.text_input(key="teach_folder").set_value(str(manifest)).run()
    assert not at.exception
    (message,) = [e.value.replace("\\", "") for e in at.error]
    assert message.startswith("Line 2 of this manifest names a file outside")
    assert "passwd" not in message


def test_after_the_reveal_the_suggested_outline_is_beside_the_dataset_one(
        monkeypatch, tmp_path, busi_dir, tiny_model_dir, tiny_segmenter_dir):
    from bus_core.inference.outline import Segmenter
    from tests.conftest import blob_probabilities

    monkeypatch.setattr(Segmenter, "probabilities", blob_probabilities)
    at = open_teaching(monkeypatch, tmp_path, busi_dir, tiny_model_dir, tiny_segmenter_dir)
    captions = [c for img in at.get("image") for c in img.captions]
    assert not any("Suggested outline" in c for c in captions)  # nothing before the answer
    answer(at, truth(at, busi_dir))
    captions = [c for img in at.get("image") for c in img.captions]
    assert any(c.startswith(f"Suggested outline (automatic, {md_escape('tiny-seg')})")
               for c in captions)
    assert any(c.startswith("Dataset") for c in captions)
    if truth(at, busi_dir) != "normal":
        assert any("Dice" in c.value for c in at.caption)


def test_cases_come_from_the_split_test_subset(monkeypatch, tmp_path, busi_dir,
                                               tiny_model_dir):
    from bus_core.data.splits import make_split, save_split

    split = make_split(load_records(busi_dir), seed=0)
    path = save_split(split, tmp_path / "small.json")
    at = open_teaching(monkeypatch, tmp_path, busi_dir, tiny_model_dir)
    # the project's splits/busi.json is offered for a folder named BUSI, but does not fit it
    assert "cannot be used with this dataset" in at.warning[0].value
    assert metric(at, "Case") == "1 of 18"
    at.text_input(key=f"teach_split_{busi_dir}").set_value(str(path)).run()
    assert metric(at, "Case") == f"1 of {len(split.test)}"
    assert any("the test subset of" in c.value for c in at.caption)


def test_scores_survive_a_reload(monkeypatch, tmp_path, busi_dir, tiny_model_dir):
    at = open_teaching(monkeypatch, tmp_path, busi_dir, tiny_model_dir)
    answer(at, "normal")
    at.button(key="teach_next_teach_0").click().run()
    answer(at, "benign")
    state = at.session_state["teach"]
    token = at.query_params["teach"]

    again = signed_in_app(timeout=60)  # a reload: a new session, same address
    again.query_params["teach"] = token
    again.run()
    again.switch_page("pages/teach.py").run()
    restored = again.session_state["teach"]
    assert (restored.position, restored.answer, restored.learner) == (
        state.position, state.answer, state.learner)
    assert metric(again, "Your score") == metric(at, "Your score")


def test_an_uncertain_model_reading_is_no_answer():
    from bus_core.clinic.teaching import TeachingSession

    session = TeachingSession.new("x", 3, seed=1)
    session.check("benign", "benign", "benign", model_uncertain=True)
    assert str(session.model) == "0 / 1 (1 no answer)" and str(session.learner) == "1 / 1"
    restored = TeachingSession.from_token("x", 3, session.token())
    assert restored == session
    assert TeachingSession.from_token("other", 3, session.token()) is None
    assert TeachingSession.from_token("x", 3, "garbage") is None
