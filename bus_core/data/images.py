"""Reading image and mask files: any PNG / JPEG / BMP / TIFF / DICOM -> RGB uint8 array,
any mask file or array -> HxW bool array.

Conversion rules (the same for every source, so the app, the CLI and training agree):
- Greyscale, palette, CMYK and 1-bit images become RGB with equal channels where grey.
- Alpha (RGBA, LA, palette transparency) is dropped, not composited: scanners that save an
  alpha channel save it fully opaque, and dropping it keeps the pixels exactly as stored.
- More than 8 bits (16-bit PNG / TIFF, 32-bit integer or float TIFF, DICOM without a window):
  integer values that already lie in 0..255 are kept as they are (8-bit data stored in a
  16-bit container); anything else is stretched linearly from its minimum to its maximum
  onto 0..255. A constant image of that kind becomes black.
- DICOM: the rescale (modality LUT) is applied; if the file names a window (first Window
  Center / Window Width) the window maps onto 0..255, otherwise the rule above applies;
  MONOCHROME1 is inverted; YBR_FULL / YBR_FULL_422 are converted to RGB by pydicom;
  PALETTE COLOR goes through its lookup table. When the file has a
  SequenceOfUltrasoundRegions the image is cropped to its largest region.
- Multi-frame files (DICOM, multi-page TIFF): `frame` picks one, counting from 0.
- Image size is checked from the file header before any pixel is decoded; a deflated DICOM
  data set is inflated by pydicom only after a streamed count shows it stays within
  `MAX_INFLATED_BYTES`.
- EXIF orientation is not applied: pixels are returned as stored, so masks drawn on the same
  file line up.
"""

from __future__ import annotations

import io
import logging
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
import pydicom.pixels
from PIL import Image, UnidentifiedImageError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array
from pydicom.pixels.utils import get_nr_frames
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from bus_core.errors import BusError, InvalidImageError, MaskError

log = logging.getLogger(__name__)

MAX_PIXELS: int = 4096 * 4096
"""Largest image (width x height) we decode, from its header; larger files are refused as unsafe.
Far below PIL's decompression-bomb limit: ultrasound frames are about 1000 px per side."""

MAX_INFLATED_BYTES: int = 256 * 2**20
"""Largest data set a deflated DICOM file (transfer syntax Deflated Explicit VR Little Endian)
may inflate to: 256 MiB, about 80 RGB frames of 1024 x 1024. pydicom inflates such a file
whole in memory, so a small file can otherwise claim gigabytes."""

MIN_SIDE: int = 32
"""Smallest image side we accept: a smaller picture carries nothing for a model to read."""

WORKING_MAX_SIDE: int = 2048
"""Longest side of the images the app keeps: larger uploads are downscaled once when read
(`max_side`), which keeps every detail the model (<= 512 px) and the report need."""

RASTER_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
"""PIL formats we open; anything else is refused before its decoder runs."""

ASPECT_TOLERANCE = 0.02
"""A mask whose aspect ratio is within 2% of its image's is resized to fit it."""

MASK_THRESHOLD = 127
"""8-bit mask pixels brighter than this (in any channel) are lesion; 0/1 label masks use > 0."""

_SUPPORTED = "PNG, JPEG, BMP, TIFF or DICOM"
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_DICOM_SUFFIXES = (".dcm", ".dicom")

Source = str | Path | bytes | bytearray | memoryview | BinaryIO


def sniff_kind(data: bytes) -> str:
    """What the bytes look like: 'empty', 'png', 'jpeg', 'bmp', 'tiff', 'dicom', 'gif',
    'webp', 'pdf', 'text' or 'unknown' (from magic numbers only; nothing is decoded)."""
    signatures = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpeg", b"BM": "bmp",
                  b"II*\x00": "tiff", b"MM\x00*": "tiff", b"%PDF": "pdf", b"GIF87a": "gif",
                  b"GIF89a": "gif"}
    if not data:
        return "empty"
    if data[128:132] == b"DICM":
        return "dicom"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, kind in signatures.items():
        if data.startswith(magic):
            return kind
    return "text" if _looks_like_text(data[:1024]) else "unknown"


def load_image(source: Source, *, name: str | None = None, frame: int = 0,
               max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE,
               max_side: int | None = None) -> np.ndarray:
    """The image in `source` (a path, bytes or a binary file object read from its current
    position) as an HxWx3 uint8 RGB array.

    `name` is the file name shown in error messages (default: the path's or file object's
    name). `frame` picks one frame of a multi-frame DICOM or multi-page TIFF. With `max_side`
    an image whose longer side exceeds it is downscaled (area averaging, aspect kept) to that
    side. Raises `InvalidImageError` for anything that is not a readable image of at most
    `max_pixels` pixels with both sides at least `min_side`.
    """
    data, name = _read_source(source, name)
    label = _label(name)
    if _is_dicom(data, name):
        image = _load_dicom(data, label, frame, max_pixels)
    else:
        image = _load_raster(data, label, frame, max_pixels)
    check_min_side(image, label, min_side)
    return image if max_side is None else downscale(image, max_side)


def frame_count(path: str | Path) -> int:
    """How many frames `load_image` can pick from the file (`frame`): those of a multi-frame
    DICOM or multi-page TIFF, read from the header; 1 for other files and for files it cannot
    read (`load_image` then says what is wrong with them)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        if _is_dicom(head, Path(path).name):
            with open(path, "rb") as fh:
                check_inflated_size(fh, _label(Path(path).name))
                ds = pydicom.dcmread(fh, stop_before_pixels=True, force=True)
            return max(1, get_nr_frames(ds, warn=False))
        if sniff_kind(head) == "tiff":
            with Image.open(path, formats=("TIFF",)) as image:
                return max(1, getattr(image, "n_frames", 1))
    except Exception:  # damaged headers of many kinds: load_image describes the file
        return 1
    return 1


def check_min_side(image: np.ndarray, label: str = "The image", min_side: int = MIN_SIDE) -> None:
    """Raise `InvalidImageError` when a side of `image` is shorter than `min_side` pixels."""
    h, w = image.shape[:2]
    if min(h, w) < min_side:
        raise InvalidImageError(
            f"{label} is too small to read ({w} x {h} pixels); an ultrasound image needs at "
            f"least {min_side} x {min_side} pixels.")


def downscale(image: np.ndarray, max_side: int) -> np.ndarray:
    """`image` (HxW or HxWxC uint8) with its longer side at most `max_side` (aspect kept, area
    averaging); returned unchanged when already small enough."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def load_mask(source: Source | np.ndarray, *, shape: tuple[int, int] | None = None,
              name: str | None = None) -> np.ndarray:
    """The lesion mask in `source` (a file like `load_image` takes, or an array) as an HxW
    bool array.

    Bool arrays are kept; float arrays are lesion where > 0.5; integer pixels (files are read
    as 8-bit RGB) are lesion where any channel is > `MASK_THRESHOLD`, or > 0 for masks whose
    values are only 0 and 1. With `shape` (H, W) a mask of another size but the same aspect
    ratio (within 2%) is resized by nearest neighbour; any other size raises `MaskError`.
    Unreadable files raise `InvalidImageError`.
    """
    if isinstance(source, np.ndarray):
        values = source
    else:
        data, name = _read_source(source, name)
        values = load_image(data, name=name, min_side=1)
    label = f"The mask '{name}'" if name else "The mask"
    mask = _threshold(values, label)
    if shape is None or mask.shape == tuple(shape):
        return mask
    return _fit_mask(mask, (int(shape[0]), int(shape[1])), label)


def image_to_png_bytes(image: np.ndarray) -> bytes:
    """PNG file bytes of a uint8 (HxW, HxWx3 or HxWx4) or bool (HxW) array."""
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        raise ValueError(f"image_to_png_bytes needs a uint8 or bool array, not {image.dtype}.")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# --- sources -------------------------------------------------------------------------------

def _read_source(source: Source, name: str | None) -> tuple[bytes, str | None]:
    """The bytes of `source` and its display name (`name`, else the file's name, if any)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), name
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = name or path.name
        try:
            return path.read_bytes(), name
        except FileNotFoundError as exc:
            raise InvalidImageError(f"{_label(name)} was not found.") from exc
        except OSError as exc:
            raise InvalidImageError(
                f"{_label(name)} could not be opened ({exc.strerror}).") from exc
    if hasattr(source, "read"):
        own_name = getattr(source, "name", None)
        name = name or (Path(own_name).name if isinstance(own_name, str) else None)
        data = source.read()
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("load_image needs a file opened in binary mode ('rb').")
        return bytes(data), name
    raise TypeError(f"Cannot read an image from a {type(source).__name__}.")


def _label(name: str | None) -> str:
    """How a file is named at the start of a message: 'scan.png', or 'The file'."""
    return f"'{name}'" if name else "The file"


def _is_dicom(data: bytes, name: str | None) -> bool:
    """DICOM preamble, or a .dcm name on bytes that are no other known format."""
    named_dicom = name is not None and name.lower().endswith(_DICOM_SUFFIXES)
    return sniff_kind(data) == "dicom" or named_dicom and sniff_kind(data) == "unknown"


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start > len(head) - 4  # only a character cut at the end
    return True


def _not_readable(data: bytes, label: str) -> InvalidImageError:
    """The error for bytes that are not an image we can read, saying what they are."""
    kind = sniff_kind(data)
    if kind == "empty":
        return InvalidImageError(f"{label} is empty (0 bytes).")
    if kind == "pdf":
        return InvalidImageError(
            f"{label} is a PDF document, not an image. Please export the image itself "
            f"as {_SUPPORTED}.")
    if kind in ("png", "jpeg", "bmp", "tiff"):
        return InvalidImageError(
            f"{label} looks like a {kind.upper()} file but is damaged, so we cannot read it.")
    if kind in ("gif", "webp"):
        return InvalidImageError(
            f"{label} is a {kind.upper()} image (a format for web graphics and animations, "
            f"which loses ultrasound detail); please export the frame as {_SUPPORTED}.")
    if kind == "text":
        return InvalidImageError(
            f"{label} is a text file, not an image. Please choose a {_SUPPORTED} image.")
    return InvalidImageError(f"{label} is not an image file we can read ({_SUPPORTED}).")


def _check_size(width: int, height: int, label: str, max_pixels: int) -> None:
    """Refuse empty and too-large images, from the sizes in the header."""
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{label} contains no pixels (its size is {width} x {height}).")
    if width * height > max_pixels:
        raise _too_large(label, f"{width} x {height} pixels", max_pixels)


def _too_large(label: str, size: str, max_pixels: int) -> InvalidImageError:
    return InvalidImageError(
        f"{label} is too large to open safely ({size}; the limit is {max_pixels:,} pixels).")


# --- PNG / JPEG / BMP / TIFF ---------------------------------------------------------------

def _load_raster(data: bytes, label: str, frame: int, max_pixels: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data), formats=RASTER_FORMATS) as image:
            _check_size(*image.size, label, max_pixels)
            _seek_frame(image, frame, label)
            image.load()
            return _pil_to_rgb(image)
    except BusError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large(label, "its header claims a huge size", max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise _not_readable(data, label) from exc
    except Exception as exc:  # PIL raises many kinds (OSError, SyntaxError, ...) on bad data
        raise InvalidImageError(
            f"{label} could not be read completely: it may be truncated or damaged.") from exc


def _seek_frame(image: Image.Image, frame: int, label: str) -> None:
    count = getattr(image, "n_frames", 1)
    if not 0 <= frame < count:
        raise InvalidImageError(_frame_message(label, frame, count))
    if frame:
        image.seek(frame)


def _frame_message(label: str, frame: int, count: int) -> str:
    return (f"{label} has {count} frame{'s' if count != 1 else ''} (numbered 0 to {count - 1}); "
            f"frame {frame} does not exist.")


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _HIGH_DEPTH_MODES:
        return _gray_to_rgb(_to_uint8(np.asarray(image)))
    if image.mode == "L":  # most ultrasound files: cheaper than PIL's convert and a copy
        return _gray_to_rgb(np.asarray(image))
    if image.mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB")).copy()


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """High-depth values -> uint8: kept if integers in 0..255, else stretched min..max."""
    values = np.nan_to_num(values.astype(np.float64, copy=False))
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 255 and np.array_equal(values, np.round(values)):
        return values.astype(np.uint8)
    return _stretch(values, low, high)


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto 0..255 (clipping outside); black if high <= low."""
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = (values.astype(np.float64, copy=False) - low) * (255.0 / (high - low))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


# --- DICOM ---------------------------------------------------------------------------------

def _load_dicom(data: bytes, label: str, frame: int, max_pixels: int) -> np.ndarray:
    check_inflated_size(io.BytesIO(data), label)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        count = get_nr_frames(ds, warn=False)
    except Exception as exc:  # pydicom raises many kinds on damaged headers
        raise _not_dicom(data, label) from exc
    if "PixelData" not in ds:
        raise _not_dicom(data, label, "without an image in it")
    _check_size(columns, rows, label, max_pixels)
    if not 0 <= frame < count:
        raise InvalidImageError(_frame_message(label, frame, count))
    try:
        rgb = _dicom_frame_rgb(ds, frame)
    except Exception as exc:  # decoder / LUT errors on damaged or unsupported pixel data
        raise _undecodable_dicom(ds, label, exc) from exc
    return _crop_ultrasound_region(rgb, ds)


def check_inflated_size(fh: BinaryIO, label: str, limit: int | None = None) -> None:
    """Refuse (`InvalidImageError`) a deflated DICOM file in `fh` whose data set inflates to
    more than `limit` bytes (default `MAX_INFLATED_BYTES`), counted in bounded chunks before
    pydicom inflates it whole. Other files pass; `fh` is left at its start."""
    limit = MAX_INFLATED_BYTES if limit is None else limit
    start = fh.tell()
    try:
        read_preamble(fh, force=True)
        meta = _read_file_meta_info(fh)
    except Exception:  # a damaged header: the reader that follows says what is wrong
        meta = None
    try:
        if meta is None or meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflated = 0
        while chunk := inflater.unconsumed_tail or fh.read(2**20):
            inflated += len(inflater.decompress(chunk, 2**20))
            if inflated > limit:
                raise InvalidImageError(
                    f"{label} is a deflated DICOM file that unpacks to more than "
                    f"{limit // 2**20} MB, which is too large to open safely.")
            if inflater.eof:
                return
    except zlib.error:
        return  # damaged compressed data: pydicom's own error describes the file
    finally:
        fh.seek(start)


def _undecodable_dicom(ds, label: str, exc: Exception) -> InvalidImageError:
    """The error for DICOM pixel data that failed to decode, naming a compression we lack."""
    syntax = UID(str(getattr(ds.get("file_meta"), "TransferSyntaxUID", "") or ""))
    known = syntax.is_valid and syntax.is_transfer_syntax
    try:
        decodable = known and pydicom.pixels.get_decoder(syntax).is_available
    except NotImplementedError:  # a transfer syntax pydicom has no decoder for at all
        decodable = False
    if known and syntax.is_compressed and not decodable:
        return InvalidImageError(
            f"{label} is a DICOM file compressed as {syntax.name} ({syntax}), which this "
            "installation cannot decode. Export it uncompressed (or as PNG), or ask whoever "
            "runs this app to add a decoder for that compression.")
    log.info("DICOM pixel data of %s not decoded: %s", label, exc)
    return InvalidImageError(
        f"{label} is a DICOM file whose image could not be decoded: its pixel data is damaged "
        "or does not match its header.")


def _not_dicom(data: bytes, label: str, problem: str = "that is damaged") -> InvalidImageError:
    """A DICOM file (preamble present) with `problem`, or bytes that are no image at all."""
    if sniff_kind(data) != "dicom":
        return _not_readable(data, label)
    return InvalidImageError(f"{label} is a DICOM file {problem}; we cannot read it.")


def _dicom_frame_rgb(ds, frame: int) -> np.ndarray:
    """One frame of `ds` as HxWx3 uint8 RGB (YBR converted by pydicom, raw=False)."""
    pixels = pixel_array(ds, index=frame, raw=False, as_rgb=True)
    interpretation = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if interpretation == "PALETTE COLOR":
        colour = apply_color_lut(pixels, ds)
        return colour if colour.dtype == np.uint8 else (colour >> 8).astype(np.uint8)
    if pixels.ndim == 3:
        return pixels if pixels.dtype == np.uint8 else _stretch(
            pixels, 0, 2 ** int(ds.get("BitsStored", 16)) - 1)
    gray = _dicom_gray_to_uint8(pixels, ds)
    if interpretation == "MONOCHROME1":
        gray = 255 - gray
    return _gray_to_rgb(gray)


def _dicom_gray_to_uint8(pixels: np.ndarray, ds) -> np.ndarray:
    """Rescale (modality LUT), then the first window if the file has one, else `_to_uint8`."""
    values = apply_modality_lut(pixels, ds)
    window = _first_window(ds)
    if window is None:
        return _to_uint8(values)
    centre, width = window
    return _stretch(values, centre - width / 2, centre + width / 2)


def _first_window(ds) -> tuple[float, float] | None:
    """The first (Window Center, Window Width) pair, if the file has a usable one."""
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is None or width is None:
        return None
    centre, width = (float(np.ravel(np.asarray(v, dtype=float))[0]) for v in (centre, width))
    return (centre, width) if width > 0 else None


def _crop_ultrasound_region(image: np.ndarray, ds) -> np.ndarray:
    """Crop to the largest region of SequenceOfUltrasoundRegions (if any lies in the image)."""
    regions = ds.get("SequenceOfUltrasoundRegions") or []
    boxes = []
    for region in regions:
        try:
            x0, y0 = int(region.RegionLocationMinX0), int(region.RegionLocationMinY0)
            x1, y1 = int(region.RegionLocationMaxX1), int(region.RegionLocationMaxY1)
        except (AttributeError, TypeError, ValueError):
            continue
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, image.shape[1] - 1), min(y1, image.shape[0] - 1)
        if x1 >= x0 and y1 >= y0:
            boxes.append((x0, y0, x1, y1))
    if not boxes:
        return image
    x0, y0, x1, y1 = max(boxes, key=lambda b: (b[2] - b[0] + 1) * (b[3] - b[1] + 1))
    return np.ascontiguousarray(image[y0:y1 + 1, x0:x1 + 1])


# --- masks ---------------------------------------------------------------------------------

def _threshold(values: np.ndarray, label: str) -> np.ndarray:
    if values.ndim == 3:
        values = values.max(axis=-1)
    if values.ndim != 2 or 0 in values.shape:
        raise MaskError(f"{label} is not a 2-D image (its array shape is {values.shape}).")
    if values.dtype == bool:
        return values.copy()
    if values.dtype.kind == "f":
        return values > 0.5
    return values > (0 if values.max() <= 1 else MASK_THRESHOLD)


def _fit_mask(mask: np.ndarray, shape: tuple[int, int], label: str) -> np.ndarray:
    """Resize `mask` to `shape` (nearest neighbour) if the aspect ratios agree."""
    (h, w), (height, width) = mask.shape, shape
    if abs((w / h) / (width / height) - 1) > ASPECT_TOLERANCE:
        raise MaskError(
            f"{label} is {w} x {h} pixels but the image is {width} x {height} pixels "
            "(width x height); a mask must have the same size or shape as its image.")
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.intp), w - 1)
    return mask[rows[:, None], cols[None, :]]
