import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bus_core.errors import BusError, DataError, StorageError
from bus_core.models.build import load_model
from bus_core.roles import PermissionDeniedError
from bus_core.training.jobs import (
    Job,
    JobBusyError,
    config_to_argv,
    current_job,
    jobs_dir,
    last_job,
    resume_job,
    start_training,
    start_tuning,
)
from bus_core.training.train import TrainConfig, config_from_args, get_args_parser
from tests.conftest import ADMIN, person


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def tiny_config(busi_dir: Path, out: Path, **kw) -> TrainConfig:
    kw = {"epochs": 1, "batch_size": 4, **kw}
    return TrainConfig(data=[str(busi_dir)], out=str(out), resize=40, crop=32,
                       device="cpu-fp32", save_dtype="float32", **kw)


def wait_for(job: Job, predicate: Callable[[], bool], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    job.cancel(who=ADMIN)
    pytest.fail(f"timed out; job output:\n{job.log_tail()}")


def finished(job: Job) -> str:
    wait_for(job, lambda: not job.is_alive())
    return job.status()


def steps(job: Job) -> int:
    return sum(e["event"] == "step" for e in job.events())


def test_config_to_argv_round_trips_through_the_cli_parser(tmp_path):
    config = TrainConfig(data=["a", "b"], out="o", extra_train=["x"], split="s.json", lr=3e-05,
                         max_per_class=7, resize=40, crop=32, combine_threshold=0.25,
                         input_mode="mask-leakfree", checkpoint_every=0.5, name="run 1")
    args = get_args_parser().parse_args(config_to_argv(config))
    assert config_from_args(args) == config
    switched = dataclasses.replace(config, style_augment=True, ema=0.99)
    assert config_from_args(get_args_parser().parse_args(config_to_argv(switched))) == switched
    assert "--max-per-class" not in config_to_argv(TrainConfig(data=["a"], out="o"))


def test_stale_job_file_is_cleared(tmp_path):
    stale = Job(pid=2 ** 22 + 12345, out=str(tmp_path), kind="train", started=0.0,
                command=["x"])
    jobs_dir().mkdir(parents=True)
    (jobs_dir() / "current.json").write_text(json.dumps(stale.to_dict()))
    assert current_job() is None
    assert not (jobs_dir() / "current.json").exists()


@pytest.mark.slow
def test_run_to_the_end_with_one_job_at_a_time(busi_dir, tmp_path, data_dir):
    job = start_training(tiny_config(busi_dir, tmp_path / "m"), who=ADMIN)
    assert current_job() == job and last_job() == job
    with pytest.raises(JobBusyError) as busy:
        start_training(tiny_config(busi_dir, tmp_path / "other"), who=ADMIN)
    assert busy.value.job.pid == job.pid and "Another training job" in str(busy.value)
    environ = Path(f"/proc/{job.pid}/environ")
    if environ.is_file():  # the job sees this session's data folder
        assert f"BUS_DATA_DIR={data_dir}".encode() in environ.read_bytes().split(b"\0")
    assert finished(job) == "done", job.log_tail()
    assert current_job() is None and last_job() == job
    assert job.events()[-1]["event"] == "done"
    assert load_model(tmp_path / "m").card.metrics["test"]["n"] > 0
    assert job.log_path.is_file()


def test_cancelling_needs_the_researcher_role(tmp_path):
    job = Job(pid=0, out=str(tmp_path / "run"), kind="train", started=0.0, command=[])
    with pytest.raises(PermissionDeniedError, match="needs the researcher role"):
        job.cancel(who=person("c", "clinician"))
    assert not job.cancel_requested() and not job.files.cancel.exists()
    job.cancel(who=person("r", "researcher"))
    assert job.cancel_requested() and job.files.cancel.exists()


@pytest.mark.slow
def test_kill_then_resume_then_cancel_then_resume(busi_dir, tmp_path):
    """Each request is made while the job loads (or is held still), so none can come too late:
    a cancel made before the first step stops the run after that step."""
    config = tiny_config(busi_dir, tmp_path / "m", epochs=2, batch_size=2, checkpoint_every=0.0)
    job = start_training(config, who=ADMIN)
    job.cancel(who=ADMIN)  # lands before the first step: the run stops after one step, checkpointed
    assert finished(job) == "cancelled", job.log_tail()
    assert steps(job) == 1
    checkpoint = tmp_path / "m" / "train" / "checkpoint.pt"
    assert checkpoint.is_file()

    job = resume_job(job, who=ADMIN)
    os.kill(job.pid, signal.SIGKILL)
    assert finished(job) == "killed"

    job = resume_job(job, who=ADMIN)
    job.cancel(who=ADMIN)
    assert job.cancel_requested()
    assert finished(job) == "cancelled", job.log_tail()
    assert job.events()[-1]["event"] == "cancelled"
    assert any(e["event"] == "start" and e["resumed"] for e in job.events())
    assert steps(job) == 2

    job = resume_job(job, who=ADMIN)
    assert finished(job) == "done", job.log_tail()
    assert load_model(tmp_path / "m").card.metrics["history"][-1]["epoch"] == 2


@pytest.mark.slow
def test_grid_search_job_writes_its_results_table(busi_dir, tmp_path):
    grid = {"lr": [1e-3, 1e-4], "optimizer": ["sgd"]}
    job = start_tuning(tiny_config(busi_dir, tmp_path / "grid"), grid, who=ADMIN)
    assert job.kind == "tune" and "tune" in job.command
    assert finished(job) == "done", job.log_tail()
    rows = job.results()
    assert sorted(r["lr"] for r in rows) == [1e-4, 1e-3]
    assert all(Path(r["model"]).name.startswith("lr=") for r in rows)
    assert job.events()[-1]["event"] == "done"


def test_a_job_that_cannot_start_is_failed(tmp_path):
    job = start_training(TrainConfig(data=[str(tmp_path / "missing")], out=str(tmp_path / "m"),
                                     device="cpu-fp32"), who=ADMIN)
    assert finished(job) == "failed"
    assert "does not exist" in job.events()[-1]["message"]
    assert sys.executable == job.command[0]


def test_log_tail_keeps_the_last_state_of_progress_bars(tmp_path):
    job = Job(pid=1, out=str(tmp_path), kind="train", started=0.0, command=["x"])
    job.run_dir.mkdir()
    job.log_path.write_bytes(b"start\nepoch 1: 10%\repoch 1: 50%\repoch 1: 100%\r\n{\"a\": 1}\n")
    assert job.log_tail().splitlines() == ["start", "epoch 1: 100%", '{"a": 1}']
    assert job.log_tail(max_chars=9).splitlines()[-1] == '{"a": 1}'


def test_an_unwritable_run_folder_is_a_clear_error(busi_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the run folder should be")
    with pytest.raises(StorageError, match="Could not start the job"):
        start_training(tiny_config(busi_dir, blocker / "run"), who=ADMIN)
    assert current_job() is None


def test_a_failed_run_folder_can_be_deleted_and_nothing_else(tmp_path, busi_dir):
    from bus_core.training.jobs import delete_failed_run, is_failed_run
    from bus_core.training.runs import ProgressLog, RunFiles

    failed = tmp_path / "failed"
    ProgressLog(RunFiles(failed).progress).write("error", message="no ImageNet weights")
    assert is_failed_run(failed)
    delete_failed_run(failed, who=ADMIN)
    assert not failed.exists()

    unrelated = tmp_path / "mine"
    (unrelated / "train").mkdir(parents=True)
    (unrelated / "notes.txt").write_text("keep me")
    resumable = tmp_path / "resumable"
    RunFiles(resumable).dir.mkdir(parents=True)
    RunFiles(resumable).checkpoint.write_bytes(b"checkpoint")
    for folder in (unrelated, resumable, tmp_path / "absent"):
        assert not is_failed_run(folder)
    with pytest.raises(BusError, match="not deleted"):
        delete_failed_run(resumable, who=ADMIN)
    assert resumable.exists() and unrelated.exists()


def test_max_per_class_with_a_saved_split_is_refused_before_starting(busi_dir, tmp_path):
    with pytest.raises(DataError, match="cannot be combined with a saved split"):
        start_training(tiny_config(busi_dir, tmp_path / "run", split="s.json", max_per_class=2),
                       who=ADMIN)
    assert current_job() is None and not (tmp_path / "run").exists()


def test_a_finished_job_process_is_reaped_without_anyone_asking(tmp_path, monkeypatch):
    """A page that never polls the job again must not leave a <defunct> process behind."""
    from bus_core.training import jobs
    from bus_core.training.train import TrainConfig

    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    job = jobs._spawn("train", TrainConfig(data=[], out=str(tmp_path / "run")), ["--help"], None)
    deadline = time.monotonic() + 120
    while Path(f"/proc/{job.pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{job.pid}").exists(), "the ended process was never reaped"
