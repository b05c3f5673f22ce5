"""Models on disk and the active one.

Models live in two places: the bundled `weights/` folder of the project (read-only releases)
and the user's model folder (`<data dir>/models`, trained or uploaded). The active model is
$BUS_MODEL, else the one chosen in `<data dir>/active_model.json`, else the bundled default
named in `weights/DEFAULT` (or the only bundled model).

User models can be renamed, deleted, exported as a zip and imported from uploaded files; bundled
ones are read-only. Imports accept only safetensors weights with a JSON card (never pickles), each
under its size cap (a zip is checked from its declared sizes, then while it is read), and
keep a model only once it loads. The active model and the user's models change one at a time
among the app servers sharing the data folder (`db.shared_lock`).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from bus_core import atomic
from bus_core.db import shared_lock
from bus_core.errors import ModelError, storage
from bus_core.models.build import load_model
from bus_core.models.card import CARD_FILE, TWO_STAGE_KEYS, WEIGHTS_FILE, ModelCard, read_card
from bus_core.roles import Identity, require
from bus_core.settings import BUNDLED_WEIGHTS_DIR, data_dir, user_models_dir

ACTIVE_FILE = "active_model.json"
MODELS_LOCK = "models"
"""The `shared_lock` held while the active model or the user's model folders change."""
PICKLE_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar",
                                    ".joblib")
MAX_WEIGHTS_BYTES = 1 << 30
"""Largest weights file an import accepts (1 GiB; the backbones of this app need far less)."""
MAX_CARD_BYTES = 1 << 20
"""Largest model card an import accepts (1 MiB; a card is a few kilobytes of JSON)."""
MAX_ZIP_RATIO = 20
"""A zip member over `MAX_CARD_BYTES` that claims to unpack to more than this many times its
packed size is refused before it is read: weights barely compress, zip bombs do."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ModelEntry:
    """A model folder with its card; `bundled` models ship with the project."""

    path: Path
    card: ModelCard
    bundled: bool

    @property
    def size_bytes(self) -> int:
        """Size of the weights file."""
        return (self.path / WEIGHTS_FILE).stat().st_size


def _model_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if (p / CARD_FILE).is_file() and (p / WEIGHTS_FILE).is_file())


def list_models(bundled_dir: Path = BUNDLED_WEIGHTS_DIR, user_dir: Path | None = None, *,
                task: str | None = None) -> list[ModelEntry]:
    """Every readable model (of `task`, when given): bundled first, then the user's
    (unreadable cards are skipped)."""
    entries = []
    for root, bundled in ((bundled_dir, True), (user_dir or user_models_dir(), False)):
        for folder in _model_dirs(root):
            try:
                entries.append(ModelEntry(folder, read_card(folder), bundled))
            except ModelError:
                continue
    return [e for e in entries if task is None or e.card.task == task]


def bundled_default(bundled_dir: Path = BUNDLED_WEIGHTS_DIR) -> Path | None:
    """The released model the app serves by default, or None when none is installed."""
    named = bundled_dir / "DEFAULT"
    if named.is_file():
        folder = bundled_dir / named.read_text().strip()
        if (folder / CARD_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
            return folder
    folders = _model_dirs(bundled_dir)
    return folders[0] if len(folders) == 1 else None


def active_model_path(bundled_dir: Path = BUNDLED_WEIGHTS_DIR) -> Path | None:
    """The active model folder (see module docstring), or None when no model is installed."""
    env = os.environ.get("BUS_MODEL")
    if env:
        return Path(env).expanduser()
    chosen = data_dir() / ACTIVE_FILE
    if chosen.is_file():
        try:
            folder = Path(json.loads(chosen.read_text())["path"])
        except (json.JSONDecodeError, KeyError, TypeError):
            folder = None
        if folder and (folder / CARD_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
            return folder
    return bundled_default(bundled_dir)


def active_segmenter_path(bundled_dir: Path = BUNDLED_WEIGHTS_DIR) -> Path | None:
    """The segmentation model that suggests outlines: $BUS_SEGMENTER, else the bundled one
    named in `weights/SEGMENTER`; None when none is installed."""
    env = os.environ.get("BUS_SEGMENTER")
    if env:
        return Path(env).expanduser()
    named = bundled_dir / "SEGMENTER"
    if named.is_file():
        folder = bundled_dir / named.read_text().strip()
        if (folder / CARD_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
            return folder
    return None


def two_stage_folders(folder: Path, card: ModelCard,
                      bundled_dir: Path = BUNDLED_WEIGHTS_DIR) -> tuple[Path, Path]:
    """(whole-image model, outline model) folders of a two-stage card (`ModelCard.two_stage`)
    of the model in `folder`: each found beside `folder`, else among the bundled models;
    ModelError naming the missing one."""
    found = []
    for key in TWO_STAGE_KEYS:
        name = card.two_stage[key]
        places = [folder.parent / name, bundled_dir / name]
        place = next((p for p in places
                      if (p / CARD_FILE).is_file() and (p / WEIGHTS_FILE).is_file()), None)
        if place is None:
            raise ModelError(f"{card.name} reads in two stages with the "
                             f"{key.replace('_', ' ')} '{name}', which is installed neither "
                             "beside it nor among the bundled models.")
        found.append(place)
    return found[0], found[1]


def set_active_model(path: str | Path, *, who: Identity) -> None:
    """Persist `path` as the active model for every session (role admin)."""
    require(who, "manage_models")
    folder = Path(path).resolve()
    if read_card(folder).task != "classification":  # also refuses folders that are not models
        raise ModelError("Only a classification model can be the active model; a segmentation "
                         "model suggests outlines and is chosen with BUS_SEGMENTER.")
    with shared_lock(MODELS_LOCK):
        _write_active(folder)


def _write_active(folder: Path) -> None:
    target = data_dir()
    with storage(f"save the choice of the active model in {target}"):
        target.mkdir(parents=True, exist_ok=True)
        atomic.write_text(target / ACTIVE_FILE, json.dumps({"path": str(folder)}))


def no_model_message(command_line: bool = False) -> str:
    """What to tell a user who has no model installed: in plain words for the app's pages,
    with the commands and settings for the command line."""
    if not command_line:
        return ("No model is installed. Ask whoever runs this app to add one (researchers train "
                "or add models on the Train and Model registry pages).")
    return ("No model is installed. The project ships its released model in weights/; train one "
            "with `python -m bus_core train --data DIR --out weights/NAME`, or point BUS_MODEL "
            "at a model folder (model.safetensors + card.json).")


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _user_model(path: str | Path, user_dir: Path | None) -> Path:
    """`path` as a model folder of the user's, or ModelError (bundled or foreign folders)."""
    folder = Path(path)
    root = user_dir or user_models_dir()
    if not _inside(folder, root) or folder.resolve() == root.resolve():
        raise ModelError(f"{folder.name} is not one of your models (it is not in {root}): "
                         "bundled models cannot be renamed or deleted.")
    read_card(folder)
    return folder


def check_model_name(name: str) -> str:
    """`name` stripped, if it can name a model folder; ModelError with the rule otherwise."""
    name = name.strip()
    if not _NAME.match(name):
        raise ModelError(f"{name!r} cannot be a model name: use 1 to 64 letters, digits, dots, "
                         "dashes or underscores, starting with a letter or digit.")
    return name


def _is_active(folder: Path) -> bool:
    chosen = data_dir() / ACTIVE_FILE
    try:
        return Path(json.loads(chosen.read_text())["path"]).resolve() == folder.resolve()
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return False


def rename_model(path: str | Path, new_name: str, *, who: Identity,
                 user_dir: Path | None = None) -> Path:
    """Rename one of the user's models (role admin): its folder and the name in its card. The
    active model stays active under its new name. Returns the new folder."""
    require(who, "manage_models")
    name = check_model_name(new_name)
    with shared_lock(MODELS_LOCK):
        folder = _user_model(path, user_dir)
        target = folder.parent / name
        if target.exists() and target.resolve() != folder.resolve():
            raise ModelError(f"A model named {name} already exists: choose another name.")
        was_active = _is_active(folder)
        card = json.loads((folder / CARD_FILE).read_text())
        card["name"] = name
        with storage(f"rename the model {folder.name}"):
            atomic.write_text(folder / CARD_FILE, json.dumps(card, indent=2))
            folder.rename(target)
        if was_active:
            _write_active(target.resolve())
    return target


def delete_model(path: str | Path, *, who: Identity, user_dir: Path | None = None) -> None:
    """Delete one of the user's models (never a bundled one; role admin). If it was the active
    model, the app goes back to the default one."""
    require(who, "manage_models")
    with shared_lock(MODELS_LOCK):
        folder = _user_model(path, user_dir)
        with storage(f"delete the model {folder.name}"):
            if _is_active(folder):
                (data_dir() / ACTIVE_FILE).unlink(missing_ok=True)
            shutil.rmtree(folder)


def export_model_zip(path: str | Path) -> bytes:
    """A zip of a model's weights and card (model.safetensors + card.json at its root)."""
    folder = Path(path)
    read_card(folder)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name in (WEIGHTS_FILE, CARD_FILE):
            archive.write(folder / name, arcname=name)
    return buffer.getvalue()


def _refuse_unsafe(name: str) -> None:
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ModelError(f"{PurePosixPath(name).name} is a pickle-based checkpoint ({suffix}), "
                         "which can run arbitrary code when opened, so it is refused. Export the "
                         f"model as {WEIGHTS_FILE} (safetensors) plus its {CARD_FILE}.")


def _cap(name: str) -> int:
    """The most bytes the file `name` of an upload may hold."""
    return MAX_WEIGHTS_BYTES if name.lower().endswith(".safetensors") else MAX_CARD_BYTES


def _check_size(name: str, size: int) -> None:
    if size > _cap(name):
        raise ModelError(f"{name} is larger than the {_cap(name):,} bytes a model upload may "
                         "hold: this is not a model of this app.")


def _check_names(names: list[str]) -> tuple[str, str]:
    """The (weights, card) names of an upload's files; `ModelError` unless they are exactly
    one .safetensors and one .json file (pickles named as such)."""
    for name in names:
        _refuse_unsafe(name)
    weights = [n for n in names if n.lower().endswith(".safetensors")]
    cards = [n for n in names if n.lower().endswith(".json")]
    if len(weights) != 1 or len(cards) != 1 or len(names) != 2:
        found = ", ".join(sorted(PurePosixPath(n).name for n in names)) or "nothing"
        raise ModelError(f"A model upload is exactly two files, {WEIGHTS_FILE} (weights, "
                         f"safetensors) and {CARD_FILE} (its model card), or a zip holding only "
                         f"those two; got {found}.")
    return weights[0], cards[0]


def _unzip(name: str, data: bytes) -> dict[str, bytes]:
    """The weights and card in the zip `data`, each checked against its cap from the sizes
    the zip declares and again while it is read."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{name} is not a readable zip file.") from exc
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()
                   and not m.filename.startswith("__MACOSX/")]
        _check_names([m.filename for m in members])
        for member in members:
            _check_size(member.filename, member.file_size)
            if member.file_size > MAX_CARD_BYTES and \
                    member.file_size > MAX_ZIP_RATIO * max(member.compress_size, 1):
                raise ModelError(f"{member.filename} in {name} claims to unpack to "
                                 f"{member.file_size:,} bytes from {member.compress_size:,}: "
                                 "this is not a model of this app.")
        return {PurePosixPath(m.filename).name: _read_member(archive, m, name)
                for m in members}


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, name: str) -> bytes:
    """A member's bytes, read in chunks and refused as soon as they pass its cap."""
    content = bytearray()
    try:
        with archive.open(member) as fh:
            while chunk := fh.read(1 << 20):
                content += chunk
                _check_size(member.filename, len(content))
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise ModelError(f"{member.filename} in {name} is damaged or does not match the sizes "
                         "its zip declares, so it was not imported.") from exc
    return bytes(content)


def _model_files(files: Mapping[str, bytes]) -> tuple[bytes, bytes]:
    """The (weights, card) bytes of an upload: a .safetensors and a .json, or a zip of both."""
    if len(files) == 1 and next(iter(files)).lower().endswith(".zip"):
        name, data = next(iter(files.items()))
        files = _unzip(name, data)
    weights, card = _check_names(list(files))
    for file_name, data in files.items():
        _check_size(file_name, len(data))
    return files[weights], files[card]


def _free_folder(root: Path, name: str) -> Path:
    candidate, n = root / name, 2
    while candidate.exists():
        candidate, n = root / f"{name}-{n}", n + 1
    return candidate


def import_model(files: Mapping[str, bytes], *, who: Identity,
                 user_dir: Path | None = None) -> Path:
    """Keep an uploaded model (role researcher) in the user's model folder and return its
    folder.

    `files` maps file names to contents: a `.safetensors` and a `.json` card, or one `.zip` of
    both. Pickle checkpoints (.pt, .pth, .pkl, .ckpt, ...) and zips with other files are refused;
    the model must load (card and weights must match) before it is kept.
    """
    require(who, "upload_model")
    weights, card_bytes = _model_files(files)
    try:
        card = ModelCard.from_dict(json.loads(card_bytes))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as exc:
        raise ModelError(f"The uploaded {CARD_FILE} is not a bus_core model card.") from exc
    root = user_dir or user_models_dir()
    action = f"keep the uploaded model in {root}"
    with storage(action):
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".upload-"))
    try:
        with storage(action):
            (staging / WEIGHTS_FILE).write_bytes(weights)
            (staging / CARD_FILE).write_bytes(card_bytes)
            load_model(staging, label="the uploaded model")
            try:
                name = check_model_name(card.name)
            except ModelError:
                name = "uploaded-model"
            with shared_lock(MODELS_LOCK):
                target = _free_folder(root, name)
                if card.name != target.name:  # the card names its folder, like trained models
                    raw = json.loads(card_bytes)
                    raw["name"] = target.name
                    atomic.write_text(staging / CARD_FILE, json.dumps(raw, indent=2))
                staging.rename(target)
            return target
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
