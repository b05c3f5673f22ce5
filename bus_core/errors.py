"""The exceptions bus_core raises for bad input. Each carries a message a clinician can read;
the app shows `str(error)` and never a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class BusError(Exception):
    """Base class: anything the user can fix (bad file, bad mask, bad data, bad model)."""


class InvalidImageError(BusError, ValueError):
    """An image or mask file that cannot be read: corrupt, empty, not an image, too large."""


class MaskError(BusError, ValueError):
    """A mask that cannot be used: empty after combining, wrong size, nothing painted."""


class DataError(BusError, ValueError):
    """A dataset folder or CSV manifest that cannot be used (missing files, unknown labels)."""


class ModelError(BusError):
    """A model that cannot be loaded: missing weights, card/weights mismatch, unsafe format."""


class StorageError(BusError):
    """A file or folder that cannot be written or read: no permission, a file where a folder
    should be, a full disk. `str()` names the path (for the log and the command line);
    `plain` says what went wrong without it (for the app's pages)."""

    def __init__(self, message: str, plain: str | None = None) -> None:
        super().__init__(message)
        self.plain = plain or message


class StoreError(StorageError):
    """The case store cannot be used: folder not writable, database damaged, busy or too new,
    or an image file missing."""


class DeviceError(BusError, ValueError):
    """A compute device that was asked for but is not available on this machine."""


class PathNotAllowedError(BusError):
    """A path typed in the app that lies outside the folders the administrator allows for data
    (`bus_core.data.roots`), or a manifest that names files outside its own folder. The message
    names neither the path nor whether it exists."""


class CompareError(BusError, ValueError):
    """An architecture comparison that cannot run as asked (rows, input size, initialisation,
    or a row folder trained with other settings)."""


def storage_message(action: str, exc: OSError) -> str:
    """'Could not <action>: <reason> (<path>). <hint>' for an `OSError`."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename else ""
    return (f"Could not {action}: {reason}{where}. Choose a folder you can write to, or ask "
            "whoever runs this machine for access.")


def plain_storage_message(exc: OSError) -> str:
    """What an `OSError` means for the app's user, without the path."""
    reason = exc.strerror or type(exc).__name__
    return (f"The app could not store or read its files ({reason}). Ask whoever runs this "
            "machine to free disk space or grant access.")


@contextlib.contextmanager
def storage(action: str) -> Iterator[None]:
    """Raise any `OSError` of the block as a `StorageError` that says what could not be done
    (`action`, e.g. "save the run folder")."""
    try:
        yield
    except OSError as exc:
        raise StorageError(storage_message(action, exc), plain=plain_storage_message(exc)) \
            from exc
