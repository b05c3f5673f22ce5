"""Several app servers on one data folder (and one PostgreSQL database): one training job at a
time, one shared case store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bus_core.clinic.accounts import Accounts
from bus_core.clinic.cases import open_store
from bus_core.training.jobs import config_to_argv, current_job
from bus_core.training.train import TrainConfig
from tests.clinic.test_cases import save
from tests.conftest import free_port, new_postgres_database, person, stop_process

REPO = Path(__file__).resolve().parents[1]

STARTER = """
import sys, time
from pathlib import Path
from bus_core.training.jobs import JobBusyError, start_training
from bus_core.training.train import config_from_args, get_args_parser
from tests.conftest import ADMIN

go, argv = Path(sys.argv[1]), sys.argv[2:]
config = config_from_args(get_args_parser().parse_args(argv))
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
try:
    print("started", start_training(config, who=ADMIN).pid, flush=True)
except JobBusyError as busy:
    print("busy", busy.job.pid, flush=True)
"""


@pytest.fixture(params=["folder", "postgresql"])
def shared_env(request: pytest.FixtureRequest, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment of servers sharing the data folder tmp_path/data, and (param
    'postgresql') a PostgreSQL database."""
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("BUS_DATABASE_URL", raising=False)
    if request.param == "postgresql":
        url = new_postgres_database(request.getfixturevalue("postgres_server"))
        monkeypatch.setenv("BUS_DATABASE_URL", url)
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_two_processes_starting_a_job_at_once_start_one(shared_env, busi_dir, tmp_path):
    go = tmp_path / "go"
    starters = []
    for name in ("a", "b"):
        config = TrainConfig(data=[str(busi_dir)], out=str(tmp_path / name), epochs=1,
                             resize=40, crop=32, device="cpu-fp32")
        starters.append(subprocess.Popen(
            [sys.executable, "-c", STARTER, str(go), *config_to_argv(config)], cwd=REPO,
            env=shared_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        for starter in starters:
            assert starter.stdout.readline() == "ready\n", starter.stderr.read()
        go.touch()
        outcomes = sorted(starter.communicate(timeout=60)[0].split() for starter in starters)
        assert [kind for kind, _ in outcomes] == ["busy", "started"], outcomes
        assert outcomes[0][1] == outcomes[1][1]  # the loser names the winner's job
        job = current_job()
        assert job is not None and str(job.pid) == outcomes[1][1]
    finally:
        job = current_job()
        if job is not None:
            os.killpg(job.pid, signal.SIGKILL)


def health(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5) as reply:
        return reply.read().decode()


def start_app(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    """`streamlit run app.py` on `port` with `env`, its output in `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1",
             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_app_servers_share_one_folder_and_database(shared_env, tmp_path):
    """Both servers answer while a user and a case are added through the library and the
    command line; both see the same store (the one BUS_DATA_DIR / BUS_DATABASE_URL name)."""
    ports = [free_port(), free_port()]
    apps = [start_app(shared_env, port, tmp_path / f"app{port}.log") for port in ports]
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                assert [health(port) for port in ports] == ["ok", "ok"]
                break
            except OSError:
                assert all(app.poll() is None for app in apps), [
                    (tmp_path / f"app{port}.log").read_text() for port in ports]
                assert time.monotonic() < deadline, "the app servers did not start"
                time.sleep(0.5)
        added = subprocess.run(
            [sys.executable, "-m", "bus_core", "users", "add", "dr.a", "--role", "clinician",
             "--no-password"], cwd=REPO, env=shared_env, capture_output=True, text=True)
        assert added.returncode == 0, added.stderr
        with open_store() as store:
            case = save(store, who=person("dr.a"))
            assert Accounts(store).get("dr.a") is not None
            backend = store.engine.dialect.name
        assert backend == ("postgresql" if "BUS_DATABASE_URL" in shared_env else "sqlite")
        with open_store() as store:
            assert store.get_case(case.id).owner == "dr.a"
        assert [health(port) for port in ports] == ["ok", "ok"]
        assert all(app.poll() is None for app in apps)
    finally:
        for app in apps:
            stop_process(app, timeout=30)
