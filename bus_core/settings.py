"""Where the product keeps its files: the bundled weights and the user's data folder."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_WEIGHTS_DIR = PROJECT_ROOT / "weights"
DEFAULT_DATA_DIR = Path("~/.bus_classifier")


def data_dir() -> Path:
    """The user's data folder (cases, trained models, settings): $BUS_DATA_DIR or
    ~/.bus_classifier. Not created here."""
    return Path(os.environ.get("BUS_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()


DATABASE_URL_ENV = "BUS_DATABASE_URL"


def database_url() -> str | None:
    """The shared database the app uses instead of `<data dir>/cases.sqlite`: $BUS_DATABASE_URL
    (a SQLAlchemy URL such as postgresql+psycopg://user@host/db), or None when unset."""
    return os.environ.get(DATABASE_URL_ENV, "").strip() or None


def keep_file_names() -> bool:
    """Whether the case store keeps uploaded files' own names (BUS_KEEP_FILE_NAMES=1, an
    administrator's choice) instead of pseudonyms; off by default, as names can identify a
    patient."""
    return os.environ.get("BUS_KEEP_FILE_NAMES", "").strip().lower() in ("1", "true", "yes")


def user_models_dir() -> Path:
    """Where models trained or uploaded by the user live."""
    return data_dir() / "models"


def default_dataset_dir() -> Path | None:
    """BUSI beside the project ($BUS_DATASET or ../shared/data/BUSI) when it exists."""
    env = os.environ.get("BUS_DATASET")
    candidate = Path(env).expanduser() if env else PROJECT_ROOT.parent / "shared" / "data" / "BUSI"
    return candidate if candidate.is_dir() else None


LOG_LEVEL_ENV = "BUS_LOG_LEVEL"


def configure_logging() -> None:
    """Send bus_core's log records to stderr at $BUS_LOG_LEVEL (default WARNING); a problem
    that is worked around (a skipped mask, an unreadable job file) is logged, not hidden."""
    level = os.environ.get(LOG_LEVEL_ENV, "WARNING").upper()
    logger = logging.getLogger("bus_core")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level if level in logging.getLevelNamesMapping() else "WARNING")
