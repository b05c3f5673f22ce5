"""Shared fixtures: tiny synthetic BUSI-layout data and tiny model folders."""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

os.environ.setdefault("BUS_DATA_DIR", str(Path("/tmp") / f"bus-tests-{os.getpid()}"))
# The PyTorch forward pass unless a test asks for OpenVINO (tests/runtime/test_backends.py):
# converting every tiny test model would only slow the suite down.
os.environ.setdefault("BUS_BACKEND", "torch")

from bus_core.roles import Identity  # noqa: E402 - after the environment above

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BUSI = SHARED_DATA / "BUSI"

ADMIN = Identity("Admin", frozenset({"admin"}))
"""An administrator (every action)."""


def person(name: str = "Dr Test", *roles: str) -> Identity:
    """A signed-in user called `name` with `roles` (default: clinician)."""
    return Identity(name, frozenset(roles or ("clinician",)))


def signed_in_app(*roles: str, name: str = "Dr Test", timeout: float = 60) -> AppTest:
    """app.py as an AppTest whose session is signed in as the local user `name` with `roles`
    (default: every role), created without a password in the app's database ($BUS_DATABASE_URL,
    else the data folder's)."""
    from bus_core.clinic.accounts import Accounts, new_session
    from bus_core.clinic.cases import open_store
    from bus_core.db import default_database
    from bus_core.roles import ROLES, operator
    from ui.common import SESSION_KEY

    with open_store(default_database()) as store:
        accounts = Accounts(store)
        user = accounts.get(name) or accounts.add(operator(), name, roles or ROLES, None)
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=timeout)
    at.session_state[SESSION_KEY] = new_session(user.identity())
    return at


def opened_page(page: str) -> AppTest:
    """app.py signed in with every role (`signed_in_app`), on `pages/<page>.py`, without an
    exception."""
    at = signed_in_app()
    at.run()
    at.switch_page(f"pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def synthetic_image(label: str, rng: np.random.Generator, size: tuple[int, int] = (72, 88)
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A speckled grayscale 'ultrasound' (RGB uint8) and its lesion mask (bool).

    Benign lesions are dark round blobs, malignant ones dark irregular blobs, normal images have
    none (and an empty mask), so a tiny model can learn something in a few steps.
    """
    h, w = size
    image = rng.normal(120, 25, size=(h, w)).clip(0, 255)
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros((h, w), bool)
    if label != "normal":
        cy, cx = rng.integers(h // 3, 2 * h // 3), rng.integers(w // 3, 2 * w // 3)
        r = rng.integers(8, 14)
        if label == "benign":
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        else:
            angle = np.arctan2(yy - cy, xx - cx)
            radius = r * (1 + 0.4 * np.sin(5 * angle))
            mask = np.hypot(yy - cy, xx - cx) < radius
        image[mask] = rng.normal(40, 10, size=int(mask.sum())).clip(0, 255)
    gray = image.astype(np.uint8)
    return np.stack([gray] * 3, axis=-1), mask


def texts(at: AppTest) -> str:
    """Every text an AppTest page shows (markdown, captions, messages, code, titles)."""
    return " ".join(str(e.value) for kind in ("markdown", "caption", "error", "success",
                                              "warning", "info", "code", "title", "subheader")
                    for e in at.get(kind))


@pytest.fixture
def case_ids(monkeypatch, tmp_path) -> list[int]:
    """Three saved cases in a fresh data folder; the third was corrected (normal -> benign) by
    Dr Old."""
    from bus_core.clinic.cases import open_store
    from bus_core.db import default_db_path

    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.delenv("BUS_MODEL", raising=False)
    rng = np.random.default_rng(0)
    ids = []
    with open_store(default_db_path()) as store:
        for label in ("benign", "malignant", "normal"):
            image, mask = synthetic_image(label, rng)
            case = store.save_case(image, image_name=f"{label}.png",
                                   masks=[mask] if mask.any() else [], model_name="tiny",
                                   model_hash="0" * 64, probabilities={label: 0.9},
                                   predicted_label=label, who=person("Dr New"))
            ids.append(case.id)
        store.review_case(ids[2], label="benign", who=person("Dr Old"))
    return ids


def write_busi(root: Path, per_class: int = 6, seed: int = 0) -> Path:
    """A BUSI-layout folder under root/BUSI with `per_class` images per class."""
    rng = np.random.default_rng(seed)
    base = root / "BUSI"
    for label in ("normal", "benign", "malignant"):
        folder = base / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(1, per_class + 1):
            image, mask = synthetic_image(label, rng)
            Image.fromarray(image[..., 0]).save(folder / f"{label} ({i}).png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(folder / f"{label} ({i})_mask.png")
    return base


@pytest.fixture(scope="session")
def busi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic BUSI-layout dataset (6 images per class, with masks)."""
    return write_busi(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained DenseNet121 model folder with a 32-px input size (fast on CPU)."""
    import torch

    from bus_core.models.build import build_model, save_model
    from bus_core.models.card import new_card

    torch.manual_seed(0)
    card = new_card("tiny-test", "densenet121", input_size={"resize": 40, "crop": 32})
    return save_model(build_model("densenet121"), card, tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="session")
def tiny_segmenter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained segmentation model folder (DenseNet121 U-Net) with a 64-px input."""
    import torch

    from bus_core.models.build import save_model
    from bus_core.models.card import ModelCard
    from bus_core.models.unet import SEG_ARCH, DenseNetUNet

    torch.manual_seed(0)
    card = ModelCard(name="tiny-seg", arch=SEG_ARCH, task="segmentation", classes=["lesion"],
                     input_size={"resize": 64, "crop": 64, "fit": "pad"},
                     postprocess={"threshold": 0.5, "min_area": 0.0, "fill_holes": True})
    return save_model(DenseNetUNet(), card, tmp_path_factory.mktemp("s") / "tiny-seg")


def copy_model(source: Path, dest: Path, **card_changes) -> Path:
    """A copy of the model folder `source` at `dest` with some card fields changed."""
    import json
    import shutil

    shutil.copytree(source, dest)
    card = json.loads((dest / "card.json").read_text())
    card.update(card_changes)
    (dest / "card.json").write_text(json.dumps(card))
    return dest


def blob_probabilities(self, images):
    """Stand-in for `Segmenter.probabilities`: a disc in the middle of each image (p = 0.9),
    or nothing at all for images whose top-left pixel is pure white."""
    out = []
    for image in images:
        h, w = image.shape[:2]
        yy, xx = np.mgrid[:h, :w]
        disc = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 5) ** 2) * 0.9
        out.append(np.zeros((h, w)) if image[0, 0].min() == 255 else disc)
    return out


@pytest.fixture(autouse=True)
def data_roots_with_tmp(monkeypatch: pytest.MonkeyPatch,
                        tmp_path_factory: pytest.TempPathFactory) -> None:
    """The app accepts data under pytest's temporary folder (where tests write theirs) besides
    its default folders (bus_core.data.roots)."""
    from bus_core.data.roots import DATA_ROOTS_ENV, data_roots

    monkeypatch.delenv(DATA_ROOTS_ENV, raising=False)
    roots = [*data_roots(), tmp_path_factory.getbasetemp()]
    monkeypatch.setenv(DATA_ROOTS_ENV, os.pathsep.join(map(str, roots)))


def _postgres_bin() -> Path | None:
    """The folder of PostgreSQL's initdb and pg_ctl (on PATH or Debian's), or None."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return debian[-1].parent if debian else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen, timeout: float = 15) -> None:
    """Ask a server process to end, and kill it if it has not within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on a free local port for the test session (its
    superuser 'bus', no password); yields its URL without a database name. Skips without
    PostgreSQL. initdb refuses root, so as root the cluster runs as the user 'postgres' (or
    'nobody')."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb; apt-get install postgresql)")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="bus-pg-"))
    if os.geteuid() == 0:
        import pwd

        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            owner = pwd.getpwnam("nobody")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", owner.pw_name, "--"]
    port = free_port()
    data = folder / "data"
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "bus", "-A",
                    "trust", "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    pg_ctl = [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-w"]
    subprocess.run([*pg_ctl, "-l", str(folder / "log"), "-o",
                    f"-p {port} -h 127.0.0.1 -k {folder} -F", "start"], check=True,
                   capture_output=True)
    try:
        yield f"postgresql+psycopg://bus@127.0.0.1:{port}"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


_databases = itertools.count()


def new_postgres_database(server: str) -> str:
    """The URL of a new, empty database on the test cluster `server`."""
    import psycopg

    name = f"test_{os.getpid()}_{next(_databases)}"
    with psycopg.connect(server.replace("postgresql+psycopg", "postgresql") + "/postgres",
                         autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{server}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> str:
    """A new, empty case database on each backend: a SQLite file, or a database on the test
    PostgreSQL cluster. The data folder (where a PostgreSQL store keeps its images) is
    tmp_path; BUS_DATABASE_URL is left unset."""
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("BUS_DATABASE_URL", raising=False)
    if request.param == "sqlite":
        return str(tmp_path / "cases.sqlite")
    return new_postgres_database(request.getfixturevalue("postgres_server"))


@pytest.fixture
def busi_or_skip() -> Path:
    """The real BUSI folder beside the project, or skip."""
    if not BUSI.is_dir():
        pytest.skip("../shared/data/BUSI is not available")
    return BUSI


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests on the real data sets ('realdata') and in Chromium ('browser'), so a quick
    loop can leave them out with the tests marked 'slow' (training, torchrun, benchmark, int8,
    several processes, most OpenVINO compiles):
    `pytest -m 'not slow and not realdata and not browser'`."""
    for item in items:
        if "busi_or_skip" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.realdata)
        if Path(str(item.fspath)).parent.name == "e2e":
            item.add_marker(pytest.mark.browser)
