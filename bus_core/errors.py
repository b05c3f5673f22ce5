"""The exceptions bus_core raises for bad input. Each carries a message a clinician can read;
the app shows `str(error)` and never a traceback."""


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
