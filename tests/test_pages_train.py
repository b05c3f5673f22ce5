"""The Train page through the whole app (AppTest): a tiny run to the end, cancel and resume."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from bus_core.models.build import load_model
from bus_core.models.registry import active_model_path
from bus_core.settings import user_models_dir
from bus_core.training.jobs import Job, jobs_dir, last_job
from tests.conftest import signed_in_app  # noqa: E402

APP = str(Path(__file__).resolve().parents[1] / "app.py")


@pytest.fixture
def app(monkeypatch, tmp_path):
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.delenv("BUS_MODEL", raising=False)
    at = signed_in_app(timeout=60)
    at.run()
    at.switch_page("pages/train.py").run()
    assert not at.exception, [e.value for e in at.exception]
    yield at
    job = last_job()
    if job is not None and job.is_alive():  # never leave a training process behind
        os.kill(job.pid, signal.SIGKILL)


def texts(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "success", "info", "warning", "error", "caption")
             for e in at.get(kind)]
    parts += [p.proto.text for p in at.get("progress")]
    return "\n".join(str(p) for p in parts)


def configure(at: AppTest, busi_dir: Path, name: str, epochs: int = 1, batch: int = 4) -> None:
    at.text_area(key="train_data").set_value(str(busi_dir))
    at.selectbox(key="train_init").set_value("random")
    at.radio(key="train_split_kind").set_value("New group-disjoint split")
    at.number_input(key="train_resize_densenet121").set_value(40)
    at.number_input(key="train_crop_densenet121").set_value(32)
    at.selectbox(key="train_device").set_value("cpu-fp32")
    at.number_input(key="train_batch").set_value(batch)
    at.number_input(key="train_epochs").set_value(epochs)
    at.text_input(key="train_name").set_value(name)
    at.run()
    assert not at.exception, [e.value for e in at.exception]


def poll(at: AppTest, text: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        if text in texts(at):
            return
        time.sleep(0.5)
    job = last_job()
    pytest.fail(f"{text!r} never appeared; page:\n{texts(at)}\n"
                f"log:\n{job.log_tail() if job else ''}")


def test_settings_show_device_counts_and_the_mask_leak_note(app, busi_dir):
    app.text_area(key="train_data").set_value(str(busi_dir)).run()
    page = texts(app)
    assert "18 images: normal 6, benign 6, malignant 6" in page
    assert "Runs on **CPU" in page
    app.selectbox(key="train_mode").set_value("mask").run()
    assert "Label leak" in " ".join(w.value for w in app.warning)
    app.radio(key="train_split_kind").set_value("Saved split file").run()
    app.text_input(key="train_split_file").set_value("splits/no-such-split.json").run()
    assert "does not exist" in " ".join(e.value for e in app.error)
    assert app.button(key="train_start").disabled
    app.text_input(key="train_split_file").set_value("no/such/split.json").run()  # not allowed
    assert "outside the folders the administrator allows" in " ".join(e.value for e in app.error)
    assert app.button(key="train_start").disabled
    assert "18 runs × 5 epochs" in texts(app)  # the default grid of the published method
    app.text_area(key="train_data").set_value("/etc").run()  # not an allowed data folder
    assert not app.exception
    assert "outside the folders the administrator allows" in " ".join(e.value for e in app.error)
    assert app.button(key="train_start").disabled


@pytest.mark.slow
def test_a_tiny_run_reaches_the_end_and_its_form_stays(app, busi_dir):
    configure(app, busi_dir, "tiny-run")
    app.button(key="train_start").click().run()
    assert not app.exception, [e.value for e in app.exception]
    poll(app, "Finished. The model is saved")
    assert app.get("progress")[0].value == 100
    assert any(m.label == "Accuracy" for m in app.metric)  # test-subset figures
    folder = user_models_dir() / "tiny-run"
    assert load_model(folder).card.input_size == {"resize": 40, "crop": 32, "fit": "crop"}
    assert str(folder) not in texts(app)  # named, not located, on the page
    assert active_model_path() != folder.resolve()  # made active in the registry, not here
    app.button(key="job_dismiss").click().run()
    assert app.button(key="train_start") is not None
    # the form comes back with the settings of the run, not the defaults
    assert app.number_input(key="train_epochs").value == 1
    assert app.selectbox(key="train_init").value == "random"
    assert app.number_input(key="train_crop_densenet121").value == 32


def poll_until(at: AppTest, done, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        if done():
            return
        time.sleep(0.5)
    job = last_job()
    pytest.fail(f"{what} never happened; page:\n{texts(at)}\nlog:\n"
                f"{job.log_tail() if job else ''}")


@pytest.mark.slow
def test_cancel_a_run_then_resume_it(app, busi_dir):
    """Cancel is asked for while the run is held still (SIGSTOP), so it always lands before
    the run could end: the outcome does not depend on how fast the machine trains."""
    configure(app, busi_dir, "long-run", epochs=30, batch=2)
    app.button(key="train_start").click().run()
    job = last_job()
    os.kill(job.pid, signal.SIGSTOP)
    try:
        app.run()
        with pytest.raises(KeyError):  # another run cannot start while this one runs...
            app.button(key="train_start")
        assert app.checkbox(key="train_force").value is False  # ...except for experts
        app.button(key="job_cancel").click().run()
    finally:
        os.kill(job.pid, signal.SIGCONT)
    poll(app, "Cancelled at epoch")
    assert last_job().status() == "cancelled"

    app.button(key="job_resume").click().run()
    assert not app.exception
    job = last_job()
    os.kill(job.pid, signal.SIGSTOP)
    try:
        app.run()
        app.button(key="job_cancel").click().run()
    finally:
        os.kill(job.pid, signal.SIGCONT)
    poll_until(app, lambda: last_job().status() == "cancelled", "the second cancel")
    events = last_job().events()
    assert [e["event"] for e in events].count("cancelled") == 2
    assert any(e["event"] == "start" and e["resumed"] for e in events)
    app.run()
    assert "Cancelled at epoch" in texts(app)


@pytest.mark.slow
def test_a_killed_grid_search_shows_its_results_and_offers_resume(app, tmp_path):
    out = tmp_path / "grid"
    (out / "train").mkdir(parents=True)
    rows = [{"lr": 0.001, "batch_size": 16, "optimizer": "adam", "val_macro_f1": 0.61,
             "val_accuracy": 0.7, "test_accuracy": 0.66, "training_time_s": 12.0,
             "model": str(out / "lr=0.001_batch_size=16_optimizer=adam")}]
    (out / "results.json").write_text(json.dumps(rows))  # what tune wrote before it died
    (out / rows[0]["model"]).mkdir()
    job = Job(pid=2 ** 22 + 4321, out=str(out), kind="tune", started=time.time(),
              command=["python"], config={"data": ["x"], "out": str(out)},
              grid={"lr": [0.001, 0.0001], "batch_size": [16], "optimizer": ["adam"]})
    jobs_dir().mkdir(parents=True)
    (jobs_dir() / "last.json").write_text(json.dumps(job.to_dict()))
    app.run()
    assert "process stopped without finishing" in texts(app)
    table = app.dataframe[0].value
    assert list(table["val_macro_f1"]) == [0.61]
    assert app.button(key="job_resume") is not None


def test_refused_combinations_and_failed_run_names(app, busi_dir):
    from bus_core.training.runs import ProgressLog, RunFiles

    configure(app, busi_dir, "again")
    app.radio(key="train_split_kind").set_value("Saved split file").run()
    app.number_input(key="train_max_per_class").set_value(3).run()
    assert "cannot be combined with a saved split file" in texts(app)
    assert "--" not in texts(app)  # plain words, no command-line options
    assert app.button(key="train_start").disabled
    app.number_input(key="train_max_per_class").set_value(0)
    app.radio(key="train_split_kind").set_value("New group-disjoint split").run()
    ProgressLog(RunFiles(user_models_dir() / "again").progress).write("error", message="x")
    app.text_input(key="train_name").set_value("again").run()
    assert "'again' holds only a failed run: starting replaces it." in texts(app)
    assert not app.button(key="train_start").disabled


def test_the_form_shows_the_last_job_s_settings_and_a_long_job_needs_a_tick(app, busi_dir):
    from bus_core.training.runs import ProgressLog, RunFiles

    out = user_models_dir() / "last-run"
    job = Job(pid=2 ** 22 + 4322, out=str(out), kind="train", started=time.time(),
              command=["python"], config={
                  "data": [str(busi_dir)], "out": str(out), "init": "random", "resize": 40,
                  "crop": 32, "epochs": 3, "batch_size": 4, "device": "cpu-fp32",
                  "lr": 0.001, "name": "last-run"})
    jobs_dir().mkdir(parents=True)
    (jobs_dir() / "last.json").write_text(json.dumps(job.to_dict()))
    ProgressLog(RunFiles(out).progress).write("step", epoch=1, epochs=3, step=1, steps=4,
                                              images_per_s=0.01, loss=1.0, mean_loss=1.0,
                                              accuracy=0.5, lr=0.001)  # a slow machine
    at = signed_in_app(timeout=60).run()  # a new visit (a reload)
    at.switch_page("pages/train.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.number_input(key="train_epochs").value == 3
    assert at.number_input(key="train_batch").value == 4
    assert at.number_input(key="train_lr").value == 0.001
    assert at.number_input(key="train_crop_densenet121").value == 32
    assert at.selectbox(key="train_init").value == "random"
    assert at.radio(key="train_split_kind").value == "New group-disjoint split"
    assert at.text_input(key="train_name").value == "last-run"
    assert "18 images" in texts(at)  # the data caption describes the data shown
    assert not at.warning or "Session State" not in " ".join(w.value for w in at.warning)
    # 3 epochs x 18 x 0.7 images at 0.01 images/s: over an hour, so Start waits for a tick
    at.text_input(key="train_name").set_value("next-run").run()
    assert at.button(key="train_start").disabled
    at.checkbox(key="train_long_ok").check().run()
    assert "Expected to take about 1 h 03 min" in at.checkbox(key="train_long_ok").label
    assert not at.button(key="train_start").disabled


def test_the_input_size_cannot_go_below_what_the_architecture_takes(app):
    crop = app.number_input(key="train_crop_densenet121")
    assert crop.min == 32 and "at least 32" in crop.label
    app.selectbox(key="train_arch").set_value("inception_v3").run()
    assert app.number_input(key="train_crop_inception_v3").min == 75
