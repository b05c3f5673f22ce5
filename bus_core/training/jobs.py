"""Training and grid searches as background processes that outlive the page that started them.

A job is `python -m bus_core train ...` (or `tune ...`) started in its own session, its output in
`<out>/train/stdout.log`. One job runs at a time on a machine: the running job is recorded in
`<data dir>/jobs/current.json` (a second caller gets `JobBusyError` with that job; app servers
sharing the data folder check and start jobs one at a time, `db.shared_lock`), and the most
recent job, running or not, in `<data dir>/jobs/last.json` so the app can show how it ended.

A job's state comes from its process and its progress file: a dead process whose progress has no
final event was killed (or crashed hard) and can be resumed from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bus_core import atomic
from bus_core.db import shared_lock
from bus_core.errors import BusError, storage
from bus_core.roles import Identity, require
from bus_core.settings import PROJECT_ROOT, data_dir
from bus_core.training.runs import RunFiles, read_progress, run_state
from bus_core.training.train import BACKGROUND_ENV, TrainConfig, check_config
from bus_core.training.tune import DEFAULT_GRID, RESULTS_FILE, combinations, run_name

log = logging.getLogger(__name__)

JobStatus = Literal["running", "done", "cancelled", "failed", "killed"]
"""A background job's state; 'killed': its process died without finishing (resume it)."""

CURRENT_FILE = "current.json"
LAST_FILE = "last.json"
CANCEL_MARKER = ".cancel-requested"

# Processes started by this Python process, polled through their Popen (each is reaped by a
# thread waiting for it, so none stays a zombie).
_CHILDREN: dict[int, subprocess.Popen] = {}


class JobBusyError(BusError):
    """Another training job is running; `job` is that job."""

    def __init__(self, job: Job) -> None:
        super().__init__(
            f"Another training job is running (process {job.pid}, writing {job.out}, started "
            f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(job.started))}). Wait for it to "
            "finish or cancel it first.")
        self.job = job


def jobs_dir() -> Path:
    """Where the job files live: <data dir>/jobs."""
    return data_dir() / "jobs"


def config_to_argv(config: TrainConfig) -> list[str]:
    """The command-line options of `python -m bus_core train` that rebuild `config` exactly
    (`None` and false fields are left out, true ones are switches; list fields repeat their
    option)."""
    argv: list[str] = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(config, f.name)
        option = "--" + f.name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:  # a switch (store_true)
            argv.append(option)
            continue
        for item in value if isinstance(value, list) else [value]:
            argv += [option, repr(item) if isinstance(item, float) else str(item)]
    return argv


def grid_to_argv(grid: dict[str, list[Any]]) -> list[str]:
    """`--grid NAME=V1,V2` options of `python -m bus_core tune` for `grid`."""
    argv: list[str] = []
    for name, values in grid.items():
        argv += ["--grid", f"{name}=" + ",".join(repr(v) if isinstance(v, float) else str(v)
                                                 for v in values)]
    return argv


def _pid_alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():  # no procfs (macOS): trust the signal check
        return True
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = (proc / "cmdline").read_bytes()
    except OSError:
        return False
    return state not in ("Z", "X") and b"bus_core" in cmdline  # zombie or reused pid: dead


@dataclass(frozen=True)
class Job:
    """A background training (`kind` 'train') or grid search (`kind` 'tune') process."""

    pid: int
    out: str
    kind: str
    started: float
    command: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] | None = None

    @property
    def files(self) -> RunFiles:
        """The job's run files (a grid search: those of the search itself, not of a run)."""
        return RunFiles(Path(self.out))

    @property
    def run_dir(self) -> Path:
        """<out>/train: progress (training) or job files (grid search), and the log."""
        return self.files.dir

    @property
    def log_path(self) -> Path:
        """The process's stdout and stderr."""
        return self.files.log

    def train_config(self) -> TrainConfig:
        """The job's training settings (for a grid search: the base settings)."""
        return TrainConfig(**self.config)

    def is_alive(self) -> bool:
        """True while the job's process runs."""
        return _pid_alive(self.pid)

    def progress_path(self) -> Path:
        """The progress file of the training run in progress (a grid search: its latest run)."""
        if self.kind == "train":
            return self.files.progress
        runs = [RunFiles(Path(self.out) / run_name(c)).progress
                for c in combinations(self.grid or DEFAULT_GRID)]
        started = [p for p in runs if p.is_file()]
        return max(started, key=lambda p: p.stat().st_mtime) if started else runs[0]

    def events(self) -> list[dict[str, Any]]:
        """The progress events of the training run in progress (see `progress_path`)."""
        return read_progress(self.progress_path())

    def cancel_requested(self) -> bool:
        """True once `cancel` was called."""
        return (self.run_dir / CANCEL_MARKER).is_file()

    def cancel(self, *, who: Identity) -> None:
        """Ask the job to stop cleanly after the current step (it keeps a resumable checkpoint);
        `who` needs the researcher role.

        Safe to call again: while the job still runs, a repeated call reaches a training run
        that started meanwhile (the next run of a grid search, or a run that was loading).
        """
        require(who, "train")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / CANCEL_MARKER).touch()
        if self.kind == "train":
            self.files.cancel.touch()
            return
        progress = self.progress_path()
        if progress.is_file() and run_state(read_progress(progress)) == "running":
            RunFiles(progress.parent.parent).cancel.touch()
        elif self.is_alive():  # between two runs: nothing to checkpoint, interrupt the search
            os.kill(self.pid, signal.SIGINT)

    def status(self) -> JobStatus:
        """'running', 'done', 'cancelled', 'failed', or 'killed' (the process died without
        finishing: resume it). Only events written since this job started count, so a resumed
        run killed while loading is 'killed', not the state of the run it resumed."""
        if self.is_alive():
            return "running"
        if self.kind == "tune":
            return self._tune_status()
        state = run_state([e for e in self.events() if e.get("time", 0) >= self.started])
        if state in ("done", "cancelled", "failed"):
            return state
        if state == "not started" and not self.files.config.is_file():
            return "failed"  # stopped before the run began (bad options): nothing to resume
        return "cancelled" if self.cancel_requested() else "killed"

    def _tune_status(self) -> JobStatus:
        if len(self.results()) == len(combinations(self.grid or DEFAULT_GRID)) and \
                (Path(self.out) / "results.json").is_file():
            return "done"
        if self.cancel_requested():
            return "cancelled"
        if run_state(self.events()) == "failed" or not (Path(self.out) / run_name(
                combinations(self.grid or DEFAULT_GRID)[0])).is_dir():
            return "failed"
        return "killed"

    def results(self) -> list[dict[str, Any]]:
        """Grid-search result rows, best first: the runs finished so far (`tune` rewrites its
        results file after every run)."""
        table = Path(self.out) / RESULTS_FILE
        if not table.is_file():
            return []
        try:
            return list(json.loads(table.read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            log.warning("Cannot read the grid results %s: %s", table, exc)
            return []

    def log_tail(self, max_chars: int = 4000) -> str:
        """The end of the job's output (progress bars collapsed to their last state)."""
        if not self.log_path.is_file():
            return ""
        with open(self.log_path, "rb") as fh:
            fh.seek(max(0, self.log_path.stat().st_size - max_chars))
            text = fh.read().decode("utf-8", errors="replace")
        return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (the job file's content)."""
        return dataclasses.asdict(self)


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(content, indent=2))


def _read_job(path: Path) -> Job | None:
    """The job in `path`; None when there is none (no file) or it cannot be read (logged)."""
    try:
        return Job(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        log.warning("Ignoring the unreadable job file %s: %s", path, exc)
        return None


def current_job() -> Job | None:
    """The running job, or None (a job file whose process is dead is removed)."""
    path = jobs_dir() / CURRENT_FILE
    job = _read_job(path)
    if job is not None and job.is_alive():
        return job
    if path.is_file() and _read_job(path) == job:  # not replaced by a new job meanwhile
        path.unlink(missing_ok=True)
    return None


def last_job() -> Job | None:
    """The most recently started job, whether it still runs or not."""
    return _read_job(jobs_dir() / LAST_FILE)


CONFIRM_LONGER_THAN_S = 3600.0
"""A job expected to run longer than this starts only once its user has confirmed it."""

TRAIN_SHARE = 0.7
"""The share of the images a run trains on (a new split's training subset)."""


def expected_duration(config: TrainConfig, images: int, previous: Job | None,
                      runs: int = 1) -> float | None:
    """Seconds `runs` runs of `config` over `images` images are expected to train, at the
    speed the `previous` job measured with the same architecture, input size and device; None
    without such a measurement."""
    if previous is None:
        return None
    before = previous.train_config()
    if (before.arch, before.size, before.device) != (config.arch, config.size, config.device):
        return None
    speeds = [e["images_per_s"] for e in previous.events()
              if e["event"] == "step" and e.get("images_per_s")]
    if not speeds:
        return None
    if config.max_per_class:
        images = min(images, 3 * config.max_per_class)
    return runs * config.epochs * images * TRAIN_SHARE / speeds[-1]


def _starting(out: str | Path) -> contextlib.AbstractContextManager[None]:
    """Turns file errors while a job starts into a `StorageError` naming its run folder."""
    return storage(f"start the job (its run folder is {out})")


def _launch(kind: str, config: TrainConfig, argv: list[str], force: bool,
            grid: dict[str, list[Any]] | None = None) -> Job:
    with _starting(config.out), shared_lock("jobs"):
        running = current_job()
        if running is not None and not force:
            raise JobBusyError(running)
        return _spawn(kind, config, argv, grid)


def _spawn(kind: str, config: TrainConfig, argv: list[str],
           grid: dict[str, list[Any]] | None) -> Job:
    files = RunFiles(Path(config.out))
    files.dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "bus_core", kind, *argv]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{BACKGROUND_ENV: "1"},
               PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                        os.environ.get("PYTHONPATH")])))
    with open(files.log, "ab") as log:
        log.write(f"\n$ {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    _CHILDREN[process.pid] = process
    # reaped as soon as it ends, whether or not a page asks about it (no <defunct> process)
    threading.Thread(target=process.wait, name=f"reap-{process.pid}", daemon=True).start()
    job = Job(pid=process.pid, out=str(config.out), kind=kind, started=time.time(),
              command=command, config=dataclasses.asdict(config), grid=grid)
    _write_json(jobs_dir() / CURRENT_FILE, job.to_dict())
    _write_json(jobs_dir() / LAST_FILE, job.to_dict())
    return job


def _absolute(config: TrainConfig) -> TrainConfig:
    """`config` with its file paths absolute, so the job does not depend on a working folder."""
    def resolve(path: str) -> str:
        return str(Path(path).expanduser().resolve())

    init = config.init if config.init in ("random", "imagenet") else resolve(config.init)
    return dataclasses.replace(
        config, data=[resolve(p) for p in config.data], out=resolve(config.out),
        extra_train=[resolve(p) for p in config.extra_train], init=init,
        split=resolve(config.split) if config.split else None)


def start_training(config: TrainConfig, *, who: Identity, resume: bool = False,
                   force: bool = False) -> Job:
    """Start `python -m bus_core train` for `config` in the background for `who` (role
    researcher; `resume`: continue the run in `config.out` from its last checkpoint).

    Raises `JobBusyError` while another job runs, unless `force`.
    """
    require(who, "train")
    check_config(config)
    config = _absolute(config)
    files = RunFiles(Path(config.out))
    with _starting(config.out):
        for stale in (files.cancel, files.dir / CANCEL_MARKER):
            stale.unlink(missing_ok=True)
    argv = config_to_argv(config) + (["--resume"] if resume else [])
    return _launch("train", config, argv, force)


def start_tuning(config: TrainConfig, grid: dict[str, list[Any]] | None = None, *,
                 who: Identity, force: bool = False) -> Job:
    """Start `python -m bus_core tune` (one run per combination of `grid` under `config.out`)
    in the background for `who` (role researcher). Finished runs in `config.out` are reused,
    so this also resumes a search.

    Raises `JobBusyError` while another job runs, unless `force`.
    """
    require(who, "train")
    check_config(config)
    config = _absolute(config)
    grid = {k: list(v) for k, v in (grid or DEFAULT_GRID).items()}
    if not combinations(grid):
        raise BusError("The grid is empty: give at least one value for every setting.")
    out = Path(config.out)
    with _starting(config.out):
        for stale in (out / RESULTS_FILE, out / "results.csv", RunFiles(out).dir / CANCEL_MARKER):
            stale.unlink(missing_ok=True)
    return _launch("tune", config, config_to_argv(config) + grid_to_argv(grid), force, grid)


def resume_job(job: Job, *, who: Identity, force: bool = False) -> Job:
    """Start again a killed or cancelled job from where it stopped (role researcher)."""
    if job.kind == "tune":
        return start_tuning(job.train_config(), job.grid, who=who, force=force)
    return start_training(job.train_config(), who=who, resume=True, force=force)


def is_failed_run(folder: str | Path) -> bool:
    """True for the folder of a training run that failed or never started: it holds only the
    run's `train/` files (no model) and no checkpoint to resume from."""
    root = Path(folder)
    files = RunFiles(root)
    if not files.dir.is_dir() or {p.name for p in root.iterdir()} != {files.dir.name}:
        return False
    return not files.checkpoint.is_file() and \
        run_state(read_progress(files.progress)) in ("failed", "not started")


def delete_failed_run(folder: str | Path, *, who: Identity) -> None:
    """Delete the folder of a failed run (see `is_failed_run`; role researcher); anything else
    is refused."""
    require(who, "train")
    root = Path(folder)
    with shared_lock("jobs"):
        running = current_job()
        if running is not None and Path(running.out).resolve() == root.resolve():
            raise BusError("This run is still going: cancel it before deleting its folder.")
        if not is_failed_run(root):
            raise BusError(f"{root} holds a model or a run that can be resumed: it is not "
                           "deleted.")
        with storage(f"delete the failed run {root}"):
            shutil.rmtree(root)
