"""Tests for bus_core.data.images: every supported format and mode, DICOM, bad files, masks."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.pixels import convert_color_space, set_pixel_data
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    UltrasoundImageStorage,
    generate_uid,
)

from bus_core.data import images as bio
from bus_core.data.images import image_to_png_bytes, load_image, load_mask, sniff_kind
from bus_core.errors import InvalidImageError, MaskError

H, W = 32, 40


def rgb_pattern(h: int = H, w: int = W) -> np.ndarray:
    """A deterministic RGB image with distinct channels."""
    yy, xx = np.mgrid[:h, :w]
    return np.stack([xx * 6, yy * 7, (xx + yy) * 3], axis=-1).astype(np.uint8)


def gray_pattern(h: int = H, w: int = W) -> np.ndarray:
    return rgb_pattern(h, w)[..., 0]


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` (the pixel data is not there)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + png_chunk(b"IEND", b""))


def write_dicom(path: Path, pixels: np.ndarray, photometric: str, bits_stored: int = 8,
                **attributes: object) -> Path:
    """A conformant ultrasound DICOM file (Explicit VR Little Endian) holding `pixels`."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    set_pixel_data(ds, pixels, photometric, bits_stored)
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def deflate_dicom(path: Path) -> Path:
    """The DICOM file at `path` rewritten as Deflated Explicit VR Little Endian."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def deflated_dicom_bomb(path: Path, pixel_bytes: int) -> Path:
    """A small deflated DICOM file whose pixel data inflates to `pixel_bytes` zeros."""
    deflate_dicom(write_dicom(path, gray_pattern(), "MONOCHROME2"))
    data = path.read_bytes()
    fh = io.BytesIO(data)
    read_preamble(fh, force=False)
    _read_file_meta_info(fh)
    start = fh.tell()
    dataset = zlib.decompress(data[start:], -zlib.MAX_WBITS)
    dataset = dataset[:dataset.rindex(b"\xe0\x7f\x10\x00")]  # up to the real pixel data
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with path.open("wb") as out:
        out.write(data[:start])
        out.write(packer.compress(dataset + b"\xe0\x7f\x10\x00OB\0\0"
                                  + struct.pack("<I", pixel_bytes)))
        zeros = bytes(2**24)
        for _ in range(pixel_bytes // len(zeros)):
            out.write(packer.compress(zeros))
        out.write(packer.flush())
    return path


def region(x0: int, y0: int, x1: int, y1: int) -> Dataset:
    item = Dataset()
    item.RegionLocationMinX0, item.RegionLocationMinY0 = x0, y0
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = x1, y1
    return item


def check_rgb(array: np.ndarray, shape: tuple[int, int] = (H, W)) -> None:
    assert array.shape == (*shape, 3)
    assert array.dtype == np.uint8


# --- raster formats and modes -------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_rgb_lossless_formats_round_trip(fmt: str) -> None:
    rgb = rgb_pattern()
    out = load_image(encode(Image.fromarray(rgb), fmt))
    check_rgb(out)
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_round_trip_is_close() -> None:
    rgb = rgb_pattern()
    out = load_image(encode(Image.fromarray(rgb), "JPEG", quality=95))
    check_rgb(out)
    assert np.abs(out.astype(int) - rgb).mean() < 4


def test_grayscale_becomes_three_equal_channels() -> None:
    gray = gray_pattern()
    out = load_image(encode(Image.fromarray(gray), "PNG"))
    check_rgb(out)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray)


def test_rgba_alpha_is_dropped_not_composited() -> None:
    rgb = rgb_pattern()
    rgba = np.dstack([rgb, np.full((H, W), 10, np.uint8)])
    out = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(out, rgb)


def test_la_alpha_is_dropped() -> None:
    gray = gray_pattern()
    la = Image.fromarray(np.dstack([gray, np.zeros_like(gray)]), "LA")
    np.testing.assert_array_equal(load_image(encode(la, "PNG"))[..., 1], gray)


def test_palette_image_uses_its_colours() -> None:
    palette_image = Image.fromarray(rgb_pattern()).quantize(colors=16)
    expected = np.asarray(palette_image.convert("RGB"))
    out = load_image(encode(palette_image, "PNG"))
    check_rgb(out)
    np.testing.assert_array_equal(out, expected)


def test_palette_with_transparency_is_read_without_warning(recwarn: pytest.WarningsRecorder
                                                           ) -> None:
    palette_image = Image.fromarray(rgb_pattern()).quantize(colors=8)
    out = load_image(encode(palette_image, "PNG", transparency=bytes([0, 128, 255])))
    np.testing.assert_array_equal(out, np.asarray(palette_image.convert("RGB")))
    assert not [w for w in recwarn if "Transparency" in str(w.message)]


def test_cmyk_tiff_is_converted() -> None:
    rgb = rgb_pattern()
    cmyk = Image.fromarray(rgb).convert("CMYK")
    out = load_image(encode(cmyk, "TIFF"))
    np.testing.assert_array_equal(out, np.asarray(cmyk.convert("RGB")))


def test_one_bit_image() -> None:
    bits = gray_pattern() > 100
    out = load_image(encode(Image.fromarray(bits), "PNG"))
    np.testing.assert_array_equal(out[..., 0], np.where(bits, 255, 0))


def test_16bit_png_is_stretched_min_to_max() -> None:
    values = (np.arange(H * W, dtype=np.uint16).reshape(H, W) * 40 + 1000)
    out = load_image(encode(Image.fromarray(values), "PNG"))
    check_rgb(out)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert np.all(np.diff(out[..., 0].ravel().astype(int)) >= 0)  # order is kept


def test_16bit_tiff_is_stretched() -> None:
    values = np.linspace(300, 60000, H * W).reshape(H, W).astype(np.uint16)
    out = load_image(encode(Image.fromarray(values), "TIFF"))
    check_rgb(out)
    expected = np.round((values - 300.0) * 255 / (60000 - 300)).astype(np.uint8)
    assert np.abs(out[..., 0].astype(int) - expected).max() <= 1


def test_16bit_holding_8bit_values_is_kept() -> None:
    gray = gray_pattern()
    out = load_image(encode(Image.fromarray(gray.astype(np.uint16)), "PNG"))
    np.testing.assert_array_equal(out[..., 2], gray)


def test_constant_16bit_image_becomes_black() -> None:
    values = np.full((H, W), 1000, np.uint16)
    out = load_image(encode(Image.fromarray(values), "PNG"))
    check_rgb(out)
    assert not out.any()


def test_float_tiff_is_stretched() -> None:
    values = np.linspace(0.0, 1.0, H * W, dtype=np.float32).reshape(H, W)
    out = load_image(encode(Image.fromarray(values), "TIFF"))
    assert out.min() == 0 and out.max() == 255


def test_multi_page_tiff_frame_choice() -> None:
    pages = [Image.fromarray(np.full((H, W), value, np.uint8)) for value in (10, 20, 30)]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert load_image(data, frame=2)[0, 0, 0] == 30
    with pytest.raises(InvalidImageError, match="frame 3 does not exist"):
        load_image(data, frame=3)


# --- sources --------------------------------------------------------------------------------

def test_path_str_bytes_and_file_objects_agree(tmp_path: Path) -> None:
    rgb = rgb_pattern()
    path = tmp_path / "scan.png"
    Image.fromarray(rgb).save(path)
    with path.open("rb") as handle:
        from_handle = load_image(handle)
    for out in (load_image(path), load_image(str(path)), load_image(path.read_bytes()),
                load_image(bytearray(path.read_bytes())), load_image(io.BytesIO(path.read_bytes())),
                from_handle):
        np.testing.assert_array_equal(out, rgb)


def test_messages_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(InvalidImageError, match="'notes.png'"):
        load_image(path)
    with pytest.raises(InvalidImageError, match="'upload.png'"):
        load_image(b"junk", name="upload.png")
    named = io.BytesIO(b"junk")
    named.name = "/some/dir/from-handle.png"
    with pytest.raises(InvalidImageError, match="'from-handle.png'"):
        load_image(named)
    with pytest.raises(InvalidImageError, match="^The file "):
        load_image(b"junk")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidImageError, match="'absent.png' was not found"):
        load_image(tmp_path / "absent.png")


# --- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize(("data", "message"), [
    (b"", "is empty"),
    (np.random.default_rng(0).bytes(500), "not an image file we can read"),
    (b"Patient notes: lesion 12 mm\n" * 10, "is a text file"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "is a PDF document"),
    (encode(Image.fromarray(rgb_pattern()), "GIF"), "is a GIF image"),
    (encode(Image.fromarray(rgb_pattern()), "GIF", save_all=True,
            append_images=[Image.fromarray(gray_pattern())]), "is a GIF image"),
    (encode(Image.fromarray(rgb_pattern()), "WEBP"), "is a WEBP image"),
])
def test_unreadable_bytes(data: bytes, message: str) -> None:
    with pytest.raises(InvalidImageError, match=message) as info:
        load_image(data, name="scan.png")
    assert "'scan.png'" in str(info.value)


def test_text_file_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "report.txt"
    path.write_text("BI-RADS 3\n")
    with pytest.raises(InvalidImageError, match="'report.txt' is a text file"):
        load_image(path)


def test_truncated_png() -> None:
    data = encode(Image.fromarray(rgb_pattern()), "PNG")
    with pytest.raises(InvalidImageError, match="truncated or damaged"):
        load_image(data[: len(data) // 2], name="cut.png")


def test_header_over_max_pixels_is_refused_before_decoding() -> None:
    with pytest.raises(InvalidImageError, match=r"too large.*9000 x 7000") as info:
        load_image(png_with_header_size(9000, 7000), name="bomb.png")
    assert info.value.__cause__ is None  # refused by our header check, not by a decoder


def test_pil_decompression_bomb_error_is_converted() -> None:
    with pytest.raises(InvalidImageError, match="'bomb.png' is too large") as info:
        load_image(png_with_header_size(30000, 30000), name="bomb.png")
    assert isinstance(info.value.__cause__, Image.DecompressionBombError)


def test_max_pixels_argument() -> None:
    data = encode(Image.fromarray(gray_pattern()), "PNG")
    with pytest.raises(InvalidImageError, match="limit is 1,000 pixels"):
        load_image(data, max_pixels=1000)
    assert load_image(data, max_pixels=H * W).shape == (H, W, 3)


def test_zero_size_png() -> None:
    with pytest.raises(InvalidImageError, match="'empty.png'.*damaged"):
        load_image(png_with_header_size(0, 5), name="empty.png")


@pytest.mark.filterwarnings("ignore::UserWarning")  # decoders warn about the damage they see
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "DICOM"])
def test_corrupted_files_raise_only_invalid_image_error(fmt: str, tmp_path: Path) -> None:
    if fmt == "DICOM":
        data = write_dicom(tmp_path / "a.dcm", gray_pattern(), "MONOCHROME2").read_bytes()
    else:
        data = encode(Image.fromarray(rgb_pattern()), fmt)
    rng = np.random.default_rng(1)
    for _ in range(40):
        damaged = bytearray(data)
        positions = rng.integers(0, len(data), size=8)
        damaged[positions[0]:positions[0] + 4] = b""
        for position in positions[1:]:
            damaged[min(position, len(damaged) - 1)] = int(rng.integers(0, 256))
        try:
            out = load_image(bytes(damaged), name="x.dcm" if fmt == "DICOM" else "x")
        except InvalidImageError as error:
            assert str(error).startswith("'x")
        else:
            assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


# --- DICOM ---------------------------------------------------------------------------------

def test_dicom_monochrome2_8bit(tmp_path: Path) -> None:
    gray = gray_pattern()
    out = load_image(write_dicom(tmp_path / "a.dcm", gray, "MONOCHROME2"))
    check_rgb(out)
    np.testing.assert_array_equal(out[..., 0], gray)
    np.testing.assert_array_equal(out[..., 2], gray)


def test_deflated_dicom_is_read(tmp_path: Path) -> None:
    gray = gray_pattern()
    path = deflate_dicom(write_dicom(tmp_path / "a.dcm", gray, "MONOCHROME2"))
    assert np.array_equal(load_image(path)[..., 0], gray)


def test_deflated_dicom_bomb_is_refused_before_it_inflates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bio, "MAX_INFLATED_BYTES", 64 * 2**20)
    path = deflated_dicom_bomb(tmp_path / "bomb.dcm", 256 * 2**20)
    assert path.stat().st_size < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(InvalidImageError, match="unpacks to more than 64 MB"):
            load_image(path)
        assert bio.frame_count(path) == 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


def test_dicom_detected_by_preamble_without_suffix(tmp_path: Path) -> None:
    gray = gray_pattern()
    data = write_dicom(tmp_path / "a.dcm", gray, "MONOCHROME2").read_bytes()
    assert sniff_kind(data) == "dicom"
    np.testing.assert_array_equal(load_image(io.BytesIO(data))[..., 0], gray)


def test_dicom_without_preamble_is_read_when_named_dcm(tmp_path: Path) -> None:
    gray = gray_pattern()
    data = write_dicom(tmp_path / "a.dcm", gray, "MONOCHROME2").read_bytes()[132:]
    np.testing.assert_array_equal(load_image(data, name="scan.DCM")[..., 0], gray)
    with pytest.raises(InvalidImageError, match="'scan.bin' is not an image file"):
        load_image(data, name="scan.bin")


def test_dicom_16bit_is_stretched(tmp_path: Path) -> None:
    values = np.linspace(100, 4000, H * W).reshape(H, W).astype(np.uint16)
    out = load_image(write_dicom(tmp_path / "a.dcm", values, "MONOCHROME2", 12))
    check_rgb(out)
    expected = np.round((values - 100.0) * 255 / 3900).astype(np.uint8)
    assert np.abs(out[..., 0].astype(int) - expected).max() <= 1


def test_dicom_16bit_uses_rescale_and_window(tmp_path: Path) -> None:
    values = np.linspace(0, 4000, H * W).reshape(H, W).astype(np.uint16)
    path = write_dicom(tmp_path / "a.dcm", values, "MONOCHROME2", 12, RescaleSlope=1,
                       RescaleIntercept=-1000, WindowCenter=0, WindowWidth=1000)
    out = load_image(path)[..., 0].astype(int)
    hounsfield = values.astype(float) - 1000
    assert np.all(out[hounsfield <= -500] == 0)
    assert np.all(out[hounsfield >= 500] == 255)
    middle = np.abs(hounsfield) < 400
    expected = (hounsfield[middle] + 500) * 255 / 1000
    assert np.abs(out[middle] - expected).max() <= 1


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    gray = gray_pattern()
    out = load_image(write_dicom(tmp_path / "a.dcm", gray, "MONOCHROME1"))
    np.testing.assert_array_equal(out[..., 1], 255 - gray)


def test_dicom_rgb(tmp_path: Path) -> None:
    rgb = rgb_pattern()
    np.testing.assert_array_equal(load_image(write_dicom(tmp_path / "a.dcm", rgb, "RGB")), rgb)


def test_dicom_ybr_full_is_converted_to_rgb(tmp_path: Path) -> None:
    rgb = rgb_pattern()
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    out = load_image(write_dicom(tmp_path / "a.dcm", ybr, "YBR_FULL"))
    check_rgb(out)
    assert np.abs(out.astype(int) - rgb).max() <= 2


def test_dicom_multi_frame(tmp_path: Path) -> None:
    frames = np.stack([np.full((H, W), value, np.uint8) for value in (5, 50, 150)])
    path = write_dicom(tmp_path / "cine.dcm", frames, "MONOCHROME2")
    assert load_image(path)[0, 0, 0] == 5
    assert load_image(path, frame=2)[0, 0, 0] == 150
    with pytest.raises(InvalidImageError, match=r"'cine.dcm' has 3 frames.*frame 3 does not"):
        load_image(path, frame=3)
    with pytest.raises(InvalidImageError, match="frame -1 does not exist"):
        load_image(path, frame=-1)


def test_dicom_ultrasound_region_crop_uses_largest_region(tmp_path: Path) -> None:
    rgb = rgb_pattern()
    regions = [region(1, 1, 4, 4), region(5, 3, 30, 20)]
    path = write_dicom(tmp_path / "a.dcm", rgb, "RGB", SequenceOfUltrasoundRegions=regions)
    np.testing.assert_array_equal(load_image(path, min_side=1), rgb[3:21, 5:31])


def test_dicom_region_outside_image_is_ignored(tmp_path: Path) -> None:
    rgb = rgb_pattern()
    path = write_dicom(tmp_path / "a.dcm", rgb, "RGB",
                       SequenceOfUltrasoundRegions=[region(500, 500, 600, 600)])
    np.testing.assert_array_equal(load_image(path), rgb)


def test_dicom_size_checked_before_decoding(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "big.dcm", gray_pattern(), "MONOCHROME2")
    with pytest.raises(InvalidImageError, match="'big.dcm' is too large"):
        load_image(path, max_pixels=100)


def test_dicom_zero_rows(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "zero.dcm", gray_pattern(), "MONOCHROME2", Rows=0)
    with pytest.raises(InvalidImageError, match="'zero.dcm' contains no pixels"):
        load_image(path)


def test_dicom_without_pixels_and_truncated(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "a.dcm", gray_pattern(), "MONOCHROME2")
    data = path.read_bytes()
    with pytest.raises(InvalidImageError, match="could not be decoded"):
        load_image(data[:-200], name="cut.dcm")
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(tmp_path / "empty.dcm")
    with pytest.raises(InvalidImageError, match="'empty.dcm' is a DICOM file without an image"):
        load_image(tmp_path / "empty.dcm")


def test_dcm_suffix_on_junk_and_on_png(tmp_path: Path) -> None:
    with pytest.raises(InvalidImageError, match="'junk.dcm' is not an image file"):
        load_image(np.random.default_rng(3).bytes(400), name="junk.dcm")
    png = encode(Image.fromarray(rgb_pattern()), "PNG")
    np.testing.assert_array_equal(load_image(png, name="misnamed.dcm"), rgb_pattern())


# --- masks ---------------------------------------------------------------------------------

def test_mask_threshold_at_127() -> None:
    values = np.zeros((H, W), np.uint8)
    values[0, :4] = [127, 128, 200, 255]
    mask = load_mask(encode(Image.fromarray(values), "PNG"))
    assert mask.dtype == bool and mask.shape == (H, W)
    assert mask[0, :4].tolist() == [False, True, True, True]
    assert mask.sum() == 3


def test_mask_zero_one_labels_and_colour_channels() -> None:
    labels = np.zeros((H, W), np.uint8)
    labels[2:5, 2:5] = 1
    np.testing.assert_array_equal(load_mask(encode(Image.fromarray(labels), "PNG")), labels == 1)
    red = np.zeros((H, W, 3), np.uint8)
    red[10:12, 10:12, 0] = 255
    assert load_mask(encode(Image.fromarray(red), "PNG")).sum() == 4


def test_mask_arrays() -> None:
    boolean = np.zeros((H, W), bool)
    boolean[1, 1] = True
    np.testing.assert_array_equal(load_mask(boolean), boolean)
    assert load_mask(np.where(boolean, 0.9, 0.2)).sum() == 1
    with pytest.raises(MaskError, match="not a 2-D image"):
        load_mask(np.zeros(5, np.uint8))


def test_mask_resized_when_aspect_matches() -> None:
    big = np.zeros((2 * H, 2 * W), np.uint8)
    big[8:24, 10:30] = 255
    mask = load_mask(encode(Image.fromarray(big), "PNG"), shape=(H, W))
    expected = np.zeros((H, W), bool)
    expected[4:12, 5:15] = True
    np.testing.assert_array_equal(mask, expected)


def test_mask_aspect_within_tolerance_is_resized() -> None:
    mask = load_mask(np.ones((100, 126), bool), shape=(200, 250))  # 0.8% off
    assert mask.shape == (200, 250) and mask.all()


def test_mask_wrong_aspect_names_both_sizes() -> None:
    data = encode(Image.fromarray(np.zeros((H, H), np.uint8)), "PNG")
    with pytest.raises(MaskError, match=r"'m.png' is 32 x 32 pixels but the image is 40 x 32"):
        load_mask(data, shape=(H, W), name="m.png")


def test_unreadable_mask_file(tmp_path: Path) -> None:
    path = tmp_path / "lesion_mask.png"
    path.write_bytes(b"")
    with pytest.raises(InvalidImageError, match="'lesion_mask.png' is empty"):
        load_mask(path, shape=(H, W))


# --- helpers -------------------------------------------------------------------------------

def test_image_to_png_bytes_round_trip() -> None:
    rgb = rgb_pattern()
    np.testing.assert_array_equal(load_image(image_to_png_bytes(rgb)), rgb)
    mask = gray_pattern() > 100
    np.testing.assert_array_equal(load_mask(image_to_png_bytes(mask)), mask)
    with pytest.raises(ValueError, match="uint8 or bool"):
        image_to_png_bytes(np.zeros((2, 2), np.float32))


@pytest.mark.parametrize(("fmt", "kind"), [("PNG", "png"), ("JPEG", "jpeg"), ("BMP", "bmp"),
                                           ("TIFF", "tiff")])
def test_sniff_kind(fmt: str, kind: str) -> None:
    assert sniff_kind(encode(Image.fromarray(rgb_pattern()), fmt)) == kind


def test_default_limit_is_sane() -> None:
    assert 10_000_000 <= bio.MAX_PIXELS <= Image.MAX_IMAGE_PIXELS


# --- real data -----------------------------------------------------------------------------

def test_busi_grayscale_and_rgb_images(busi_or_skip: Path) -> None:
    found: dict[str, Path] = {}
    for path in sorted(busi_or_skip.glob("*/*).png")):
        with Image.open(path) as image:
            found.setdefault(image.mode, path)
        if {"L", "RGB"} <= found.keys():
            break
    assert {"L", "RGB"} <= found.keys(), "BUSI should hold both grayscale and RGB images"
    gray = load_image(found["L"])
    assert gray.dtype == np.uint8 and gray.ndim == 3 and gray.shape[2] == 3
    assert np.array_equal(gray[..., 0], gray[..., 2])
    with Image.open(found["RGB"]) as image:
        size = image.size
    colour = load_image(found["RGB"])
    assert colour.dtype == np.uint8 and colour.shape == (size[1], size[0], 3)
    mask_path = found["L"].with_name(found["L"].stem + "_mask.png")
    if mask_path.exists():
        assert load_mask(mask_path, shape=gray.shape[:2]).shape == gray.shape[:2]


def test_tiny_images_are_refused_masks_are_not() -> None:
    data = encode(Image.fromarray(np.zeros((1, 1), np.uint8)), "PNG")
    with pytest.raises(InvalidImageError, match=r"too small to read \(1 x 1 pixels\)"):
        load_image(data)
    assert load_mask(data, shape=(H, H)).shape == (H, H)


def test_one_bit_bomb_of_7700_px_is_refused_by_default() -> None:
    data = encode(Image.new("1", (7700, 7700)), "PNG")
    assert len(data) < 20_000
    with pytest.raises(InvalidImageError, match="too large"):
        load_image(data)


def test_max_side_downscales_keeping_aspect() -> None:
    data = encode(Image.fromarray(np.full((300, 600), 200, np.uint8)), "PNG")
    image = load_image(data, max_side=100)
    assert image.shape == (50, 100, 3) and int(image.min()) == 200
    assert load_image(data, max_side=600).shape == (300, 600, 3)


def write_jpeg_dicom(path: Path, jpeg: bytes, shape: tuple[int, int]) -> Path:
    """An ultrasound DICOM whose one frame is the JPEG baseline stream `jpeg`."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    path = write_dicom(path, np.zeros(shape, np.uint8), "MONOCHROME2")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path)
    return path


def test_jpeg_compressed_dicom_is_decoded(tmp_path: Path) -> None:
    gray = gray_pattern()
    path = write_jpeg_dicom(tmp_path / "us.dcm", encode(Image.fromarray(gray), "JPEG",
                                                         quality=95), gray.shape)
    image = load_image(path)
    assert image.shape == (H, W, 3)
    assert np.abs(image[..., 0].astype(int) - gray).mean() < 4


def test_dicom_codec_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gray = gray_pattern()
    path = write_jpeg_dicom(tmp_path / "us.dcm", b"\xff\xd8\xff" + b"\x00" * 64, gray.shape)
    with pytest.raises(InvalidImageError, match="'us.dcm' is a DICOM file whose image could not "
                                                "be decoded: its pixel data is damaged"):
        load_image(path)

    class Missing:
        is_available = False

    monkeypatch.setattr("pydicom.pixels.get_decoder", lambda uid: Missing())
    with pytest.raises(InvalidImageError, match=r"compressed as JPEG Baseline \(Process 1\) "
                                                r"\(1\.2\.840\.10008\.1\.2\.4\.50\), which this "
                                                "installation cannot decode"):
        load_image(path)
