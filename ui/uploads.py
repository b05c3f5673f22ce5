"""Uploaded files -> decoded images and masks, read once per upload and kept in the session
(images downscaled to `images.WORKING_MAX_SIDE`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from streamlit.runtime.uploaded_file_manager import UploadedFile

from bus_core.data.images import WORKING_MAX_SIDE, load_image, load_mask
from bus_core.errors import BusError
from ui.state import digest, memo

log = logging.getLogger("bus_core.ui.uploads")

IMAGE_TYPES: list[str] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff", "dcm", "dicom"]
"""The formats the upload help names; any file is accepted and recognised by its content
(DICOM files from a PACS often have no extension at all)."""
MASK_TYPES: list[str] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff"]


@dataclass(frozen=True)
class Upload:
    """One uploaded image: decoded (`image`) or refused (`error`); `key` is a content hash."""

    name: str
    key: str
    image: np.ndarray | None = None
    error: BusError | None = None


def decode_bytes(name: str, data: bytes, frame: int = 0) -> Upload:
    """A file's bytes decoded as an upload is (frame `frame` of a multi-frame file); the key
    names the frame too."""
    key = digest(data) if frame == 0 else f"{digest(data)}-{frame}"
    try:
        return Upload(name, key, image=load_image(data, name=name, frame=frame,
                                                  max_side=WORKING_MAX_SIDE))
    except BusError as exc:
        return Upload(name, key, error=exc)


def _decode(file: UploadedFile) -> Upload:
    return decode_bytes(file.name, file.getvalue())


def read_uploads(files: Sequence[UploadedFile]) -> list[Upload]:
    """The uploaded images, decoded once per upload (by file id) in this session."""
    return [memo("upload", (f.file_id, f.name), lambda f=f: _decode(f), max_entries=64)
            for f in files]


def unique(uploads: Sequence[Upload]) -> tuple[list[Upload], list[Upload]]:
    """(first upload of each content, later copies of the same content)."""
    seen: set[str] = set()
    first, copies = [], []
    for upload in uploads:
        (copies if upload.key in seen else first).append(upload)
        seen.add(upload.key)
    return first, copies


def read_case_files(path: str, mask_paths: Sequence[str]) -> tuple[Upload, list[np.ndarray]]:
    """An image opened from a dataset (e.g. from the Evaluate page) and its mask files."""
    name = Path(path).name
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return Upload(name, digest(path.encode()), error=BusError(f"Cannot open {path}: {exc}")), []
    upload = memo("case_file", path, lambda: decode_bytes(name, data), max_entries=8)
    masks: list[np.ndarray] = []
    if upload.image is not None:
        for mask_path in mask_paths:
            try:
                masks.append(load_mask(mask_path, shape=upload.image.shape[:2]))
            except BusError as exc:  # the image is still worth showing without that mask
                log.warning("Skipping the mask %s of %s: %s", mask_path, name, exc)
    return upload, masks


def read_masks(files: Sequence[UploadedFile], shape: tuple[int, int]
               ) -> tuple[list[np.ndarray], list[BusError], list[str]]:
    """The uploaded mask files fitted to an image of `shape` (H, W), the errors of those that
    cannot be used, and warnings for files that repeat an earlier file (used once)."""
    masks, errors, warnings = [], [], []
    seen: dict[str, str] = {}
    for f in files:
        content = digest(f.getvalue())
        if content in seen:
            warnings.append(f"'{f.name}' is the same file as '{seen[content]}': it is used once.")
            continue
        seen[content] = f.name
        try:
            masks.append(memo("mask", (f.file_id, f.name, shape),
                              lambda f=f: load_mask(f.getvalue(), shape=shape, name=f.name)))
        except BusError as exc:
            errors.append(exc)
    return masks, errors, warnings
