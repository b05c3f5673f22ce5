"""Uploaded files -> images and masks: downscaling, duplicate masks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from bus_core.data.images import WORKING_MAX_SIDE, image_to_png_bytes
from ui import state
from ui.uploads import read_masks, read_uploads


@dataclass
class FakeUpload:
    """What the upload helpers use of Streamlit's UploadedFile."""

    name: str
    data: bytes
    file_id: str = ""

    def getvalue(self) -> bytes:
        return self.data


@pytest.fixture(autouse=True)
def session(monkeypatch: pytest.MonkeyPatch) -> dict:
    fake: dict = {}
    monkeypatch.setattr(state.st, "session_state", fake)
    return fake


def test_duplicate_mask_files_are_used_once_with_a_warning() -> None:
    mask = np.zeros((40, 50), bool)
    mask[10:20, 10:30] = True
    data = image_to_png_bytes(mask)
    files = [FakeUpload("a.png", data, "1"), FakeUpload("b.png", data, "2")]
    masks, errors, warnings = read_masks(files, (40, 50))  # type: ignore[arg-type]
    assert len(masks) == 1 and not errors
    assert warnings == ["'b.png' is the same file as 'a.png': it is used once."]


def test_large_uploads_are_kept_downscaled() -> None:
    big = np.asarray(Image.new("L", (WORKING_MAX_SIDE * 2, 600), 128))
    [upload] = read_uploads([FakeUpload("big.png", image_to_png_bytes(big), "1")])  # type: ignore[list-item]
    assert upload.image is not None
    assert upload.image.shape == (300, WORKING_MAX_SIDE, 3)
