"""Models on disk and the active one.

Models live in two places: the bundled `weights/` folder of the project (read-only releases)
and the user's model folder (`<data dir>/models`, trained or uploaded). The active model is
$BUS_MODEL, else the one chosen in `<data dir>/active_model.json`, else the bundled default
named in `weights/DEFAULT` (or the only bundled model).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from bus_core.errors import ModelError
from bus_core.models import CARD_FILE, WEIGHTS_FILE, ModelCard, read_card
from bus_core.settings import BUNDLED_WEIGHTS_DIR, data_dir, user_models_dir

ACTIVE_FILE = "active_model.json"


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


def list_models(bundled_dir: Path = BUNDLED_WEIGHTS_DIR,
                user_dir: Path | None = None) -> list[ModelEntry]:
    """Every readable model: bundled first, then the user's (unreadable cards are skipped)."""
    entries = []
    for root, bundled in ((bundled_dir, True), (user_dir or user_models_dir(), False)):
        for folder in _model_dirs(root):
            try:
                entries.append(ModelEntry(folder, read_card(folder), bundled))
            except ModelError:
                continue
    return entries


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


def set_active_model(path: str | Path) -> None:
    """Persist `path` as the active model for every session of this user."""
    folder = Path(path).resolve()
    read_card(folder)  # refuse folders that are not models
    target = data_dir()
    target.mkdir(parents=True, exist_ok=True)
    (target / ACTIVE_FILE).write_text(json.dumps({"path": str(folder)}))


def no_model_message() -> str:
    """What to tell a user who has no model installed."""
    return ("No model is installed. The project ships its released model in weights/; train one "
            "with `python -m bus_core train --data DIR --out weights/NAME`, or point BUS_MODEL "
            "at a model folder (model.safetensors + card.json).")
