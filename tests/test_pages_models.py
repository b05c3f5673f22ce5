"""The Model registry page through the whole app (AppTest)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from bus_core.models.registry import active_model_path, export_model_zip
from bus_core.settings import user_models_dir
from tests.conftest import copy_model, signed_in_app  # noqa: E402
from ui.common import md_escape

APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture
def app(monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.delenv("BUS_MODEL", raising=False)
    for name in ("alpha", "beta"):
        shutil.copytree(tiny_model_dir, user_models_dir() / name)
    at = signed_in_app(timeout=60)
    at.run()
    at.switch_page("pages/models.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def page_text(at: AppTest) -> str:
    return " ".join(e.value for kind in ("markdown", "caption", "error", "success", "warning")
                    for e in at.get(kind))


def test_lists_models_with_their_cards_and_paths_only_in_the_admins_details(app):
    text = page_text(app)
    assert str(user_models_dir()) not in text  # plain words on the page...
    assert str(user_models_dir() / "alpha") in [c.value for c in app.code]  # ...paths folded
    assert "densenet121" in text and "MB" in text
    activate = app.button(key="models_activate_user_alpha")
    assert activate.label == "Make active" and not activate.disabled  # an admin, not active
    assert app.get("download_button")


def test_card_text_is_shown_as_text(monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.delenv("BUS_MODEL", raising=False)
    hostile = "**bold** <script>x</script> ![p](http://evil/p.png)"
    copy_model(tiny_model_dir, user_models_dir() / "odd", name=hostile, init="`x` _y_",
               training_data={"sources": ["/data/[link](http://evil)"]})
    at = signed_in_app(timeout=60)
    at.run()
    at.switch_page("pages/models.py").run()
    assert not at.exception, [e.value for e in at.exception]
    markdown = [m.value for m in at.markdown]
    assert f"#### {md_escape(hostile)}" in markdown
    assert not any("**bold**" in m or "](" in m or "`x`" in m for m in markdown)


def test_activate_a_model_after_comparing_it_and_giving_a_reason_which_is_logged(app):
    from bus_core.clinic.gate import decision_log

    app.button(key="models_activate_user_beta").click().run()
    assert not app.exception
    assert active_model_path() != (user_models_dir() / "beta").resolve()  # not yet
    assert "Test images" in list(app.dataframe[0].value["Figure"])  # the figures side by side
    assert "has no test figures" in page_text(app)  # the tiny model was never tested
    assert app.button(key="models_activate_ok_user_beta").disabled  # no reason yet
    app.text_input(key="models_reason_user_beta").set_value("validated on our own cases").run()
    app.button(key="models_activate_ok_user_beta").click().run()
    assert not app.exception, [e.value for e in app.exception]
    assert active_model_path() == (user_models_dir() / "beta").resolve()
    assert "is now the active model" in page_text(app)
    entry = decision_log()[-1]
    assert (entry["action"], entry["who"], entry["override_reason"]) == (
        "made active", "Dr Test", "validated on our own cases")
    assert entry["candidate"] == str((user_models_dir() / "beta").resolve())
    assert "made active by hand" in list(app.dataframe[-1].value["Decision"])
    activate = app.button(key="models_activate_user_beta")
    assert activate.disabled and activate.label == "Active"
    assert not app.button(key="models_activate_user_alpha").disabled


def test_rename_then_delete_after_confirmation(app):
    app.text_input(key="models_name_user_alpha").set_value("gamma")
    app.button(key="models_rename_user_alpha").click().run()
    assert not app.exception
    assert (user_models_dir() / "gamma").is_dir() and not (user_models_dir() / "alpha").exists()
    app.button(key="models_delete_user_gamma").click().run()
    assert (user_models_dir() / "gamma").is_dir()  # not before the confirmation
    app.button(key="models_keep_user_gamma").click().run()
    app.button(key="models_delete_user_gamma").click().run()
    app.button(key="models_confirm_user_gamma").click().run()
    assert not app.exception
    assert not (user_models_dir() / "gamma").exists()
    assert (user_models_dir() / "beta").is_dir()


def test_upload_refuses_pickles_and_keeps_a_valid_zip(app, tiny_model_dir):
    app.file_uploader(key="models_upload").set_value(
        [("model.pth", b"\x80\x04pickle", "application/octet-stream")]).run()
    app.button(key="models_import").click().run()
    assert not app.exception
    assert "can run arbitrary code" in " ".join(e.value for e in app.error)
    app.file_uploader(key="models_upload").set_value(
        [("export.zip", export_model_zip(tiny_model_dir), "application/zip")]).run()
    app.button(key="models_import").click().run()
    assert not app.error, [e.value for e in app.error]
    assert (user_models_dir() / "tiny-test").is_dir()
    app.run()
    assert app.button(key="models_activate_user_tiny-test") is not None


def test_a_segmentation_model_is_listed_but_not_offered_as_the_classifier(
        monkeypatch, tmp_path, tiny_model_dir, tiny_segmenter_dir):
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.delenv("BUS_MODEL", raising=False)
    shutil.copytree(tiny_segmenter_dir, user_models_dir() / "outline")
    monkeypatch.setenv("BUS_SEGMENTER", str(user_models_dir() / "outline"))
    at = signed_in_app(timeout=60)
    at.run()
    at.switch_page("pages/models.py").run()
    assert not at.exception, [e.value for e in at.exception]
    text = page_text(at)
    assert "lesion outline" in text and "Suggests lesion outlines on the Diagnose" in text
    with pytest.raises(KeyError):
        at.button(key="models_activate_user_outline")
    at.switch_page("pages/evaluate.py").run()
    assert not at.exception
    assert "outline" not in " ".join(str(o) for o in at.multiselect[0].options)


def test_a_model_s_readme_is_shown_and_data_sets_are_named_by_name(monkeypatch, tmp_path,
                                                                    tiny_model_dir):
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.delenv("BUS_MODEL", raising=False)
    folder = copy_model(tiny_model_dir, user_models_dir() / "documented",
                        training_data={"sources": ["/data/BUSI", "/data/BUSBRA/labels.csv"]})
    (folder / "README.md").write_text("# Documented\n\nTrained on the Kaggle copy of BUSI.\n")
    at = signed_in_app(timeout=60).run()
    at.switch_page("pages/models.py").run()
    assert not at.exception, [e.value for e in at.exception]
    cards = [" ".join(m.value for m in e.markdown) for e in at.expander
             if e.label == "Model card"]
    assert any("Trained on the Kaggle copy of BUSI." in text for text in cards)
    data_lines = [m.value for m in at.markdown if "**Data**" in m.value]
    assert any("**Data** BUSI, BUSBRA" in m for m in data_lines)
    assert not any("labels" in m for m in data_lines)
