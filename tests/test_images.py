"""Image loader on the three real radiographs and on files derived from them (16-bit, RGBA, JPEG, DICOM)."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from models.images import ConstantImageError, ImageLoadError, image_size, load_grayscale, looks_inverted

from .conftest import REAL_DATA

REAL = REAL_DATA / "images"
NIH_PNG = REAL / "00000001_000.png"  # 8-bit grayscale
TBX_PNG = REAL / "tb0005.png"  # RGB
FAKE_MONO1 = REAL / "Fake_MONOHR1.dcm"  # tagged MONOCHROME1, JPEG baseline


def radiograph_layout(pixels: np.ndarray) -> dict[str, float]:
    """Robust region statistics of a frontal chest radiograph in display polarity."""
    h, w = pixels.shape
    rows = slice(int(0.25 * h), int(0.75 * h))
    profile = np.median(pixels[rows], axis=0)
    k = w // 20
    smooth = np.convolve(profile, np.ones(k) / k, mode="same")[k:-k]
    return {
        "spine": float(np.median(pixels[rows, int(0.45 * w) : int(0.55 * w)])),
        "lungs": float(
            max(
                np.median(pixels[rows, int(0.2 * w) : int(0.35 * w)]),
                np.median(pixels[rows, int(0.65 * w) : int(0.8 * w)]),
            )
        ),
        "brightest_column": (int(np.argmax(smooth)) + k) / w,
        "top": float(np.median(pixels[: int(0.1 * h)])),
        "bottom": float(np.median(pixels[int(0.9 * h) :])),
    }


def assert_upright_positive_radiograph(pixels: np.ndarray) -> None:
    stats = radiograph_layout(pixels)
    assert stats["spine"] > stats["lungs"] + 0.3, stats  # bone/mediastinum bright, lungs dark
    assert 0.45 < stats["brightest_column"] < 0.58, stats  # the spine column sits in the middle
    assert stats["bottom"] > stats["top"] + 0.3, stats  # abdomen at the bottom, neck/air at the top
    assert not looks_inverted(pixels)


def write_dicom(path: Path, stored: np.ndarray, photometric: str, slope: float = 1.0, intercept: float = 0.0):
    """An uncompressed 16-bit single-frame DICOM with the given stored values and rescale."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def nih() -> np.ndarray:
    return load_grayscale(NIH_PNG)


def test_real_png_8bit_is_scaled_by_255(nih):
    raw = np.asarray(Image.open(NIH_PNG))
    assert nih.shape == (512, 512) and nih.dtype == np.float32
    np.testing.assert_array_equal(nih, raw.astype(np.float32) / 255)
    assert_upright_positive_radiograph(nih)


def test_real_rgb_png_becomes_luma(tmp_path):
    pixels = load_grayscale(TBX_PNG)
    assert pixels.shape == (512, 512) and pixels.dtype == np.float32
    expected = np.asarray(Image.open(TBX_PNG).convert("L"), dtype=np.float32) / 255
    np.testing.assert_array_equal(pixels, expected)
    assert_upright_positive_radiograph(pixels)


def test_real_monochrome1_dicom_follows_its_header_and_is_flagged_as_negative():
    # The stored pixels of this file already have radiograph polarity, yet its header says MONOCHROME1:
    # obeying the header (DICOM standard) gives the negative, which `looks_inverted` catches.
    stored = pydicom.dcmread(FAKE_MONO1).pixel_array.astype(np.float32)
    assert_upright_positive_radiograph(stored / stored.max())
    pixels = load_grayscale(FAKE_MONO1, fix_polarity=False)
    assert pixels.shape == (1024, 1024) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, 1 - (stored - stored.min()) / (stored.max() - stored.min()), atol=1e-6)
    assert looks_inverted(pixels)
    np.testing.assert_allclose(
        radiograph_layout(pixels)["spine"], 1 - radiograph_layout(stored / 254)["spine"], atol=0.01
    )


def test_three_real_radiographs_load_to_the_same_orientation_and_polarity(nih):
    """The acceptance check: 8-bit PNG, RGB PNG and the MONOCHROME1 DICOM all come out as positive,
    upright frontal films (the DICOM's wrong tag is detected and corrected, with a warning)."""
    with pytest.warns(UserWarning, match="Fake_MONOHR1.dcm: looks like a negative"):
        dicom = load_grayscale(FAKE_MONO1)
    stored = pydicom.dcmread(FAKE_MONO1).pixel_array.astype(np.float32)
    np.testing.assert_allclose(dicom, (stored - stored.min()) / (stored.max() - stored.min()), atol=1e-6)
    layouts = []
    for pixels in (nih, load_grayscale(TBX_PNG), dicom):
        assert_upright_positive_radiograph(pixels)
        assert not looks_inverted(pixels)
        layouts.append(radiograph_layout(pixels))
    for layout in layouts:  # same ordering of regions in every film: spine column over the lungs, centred
        assert layout["spine"] > layout["lungs"] + 0.1
        assert 0.4 < layout["brightest_column"] < 0.6


def test_monochrome1_dicom_with_rescale_loads_like_the_png(tmp_path, nih):
    values = np.asarray(Image.open(NIH_PNG), dtype=np.int32)
    # MONOCHROME1: high stored value = dark. Modality LUT: out = 2 * stored - 100.
    mono1 = write_dicom(
        tmp_path / "mono1.dcm", 4095 - values * 16, "MONOCHROME1", slope=2.0, intercept=-100.0
    )
    mono2 = write_dicom(tmp_path / "mono2.dcm", 100 + values * 8, "MONOCHROME2")
    for path in (mono1, mono2):
        pixels = load_grayscale(path)
        np.testing.assert_allclose(pixels, nih, atol=1e-5)
        assert_upright_positive_radiograph(pixels)
        assert image_size(path) == (512, 512)


def test_16bit_rgba_and_jpeg_variants_match_the_8bit_png(tmp_path, nih):
    values = np.asarray(Image.open(NIH_PNG), dtype=np.uint16)
    Image.fromarray(values * 257).save(tmp_path / "16.png")  # full 16-bit range
    rgba = np.stack([values.astype(np.uint8)] * 3 + [np.full_like(values, 200, dtype=np.uint8)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    Image.open(NIH_PNG).save(tmp_path / "q95.jpg", quality=95)
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    np.testing.assert_allclose(load_grayscale(tmp_path / "16.png"), nih, atol=1e-6)
    np.testing.assert_allclose(load_grayscale(tmp_path / "rgba.png"), nih, atol=1 / 255 + 1e-6)
    jpeg = load_grayscale(tmp_path / "q95.jpg")
    assert float(np.abs(jpeg - nih).mean()) < 0.01
    assert_upright_positive_radiograph(jpeg)


def test_image_size_is_height_then_width(tmp_path):
    ramp = np.tile(np.arange(200, dtype=np.uint8), (300, 1))  # not constant: a constant image is refused
    Image.fromarray(ramp).save(tmp_path / "tall.png")
    Image.fromarray(ramp).save(tmp_path / "tall.jpg")
    for name in ("tall.png", "tall.jpg"):
        assert image_size(tmp_path / name) == (300, 200)
        assert image_size(tmp_path / name, decode=True) == (300, 200)
    assert load_grayscale(tmp_path / "tall.png").shape == (300, 200)
    assert image_size(FAKE_MONO1) == (1024, 1024)


def test_constant_image_loads_as_zeros_not_nan(tmp_path):
    path = write_dicom(tmp_path / "flat.dcm", np.full((8, 8), 7), "MONOCHROME2")
    pixels = load_grayscale(path)
    assert pixels.shape == (8, 8) and not np.isnan(pixels).any() and float(pixels.max()) == 0.0


def test_a_constant_image_is_rejected_naming_its_value_in_the_files_units(tmp_path):
    """Reliability #17f: an all-black image was taken as a usable radiograph."""
    Image.new("L", (96, 80), 0).save(tmp_path / "black.jpg")
    Image.new("L", (96, 80), 0).save(tmp_path / "black.png")
    Image.fromarray(np.full((80, 96), 65535, dtype=np.uint16)).save(tmp_path / "white16.png")
    Image.new("RGB", (96, 80), (200, 200, 200)).save(tmp_path / "grey_rgb.png")
    write_dicom(tmp_path / "flat.dcm", np.full((80, 96), 7), "MONOCHROME2", slope=2.0, intercept=-4.0)
    expected = {"black.jpg": 0, "black.png": 0, "white16.png": 65535, "grey_rgb.png": 200, "flat.dcm": 10}
    for name, value in expected.items():
        with pytest.raises(ConstantImageError) as err:
            load_grayscale(tmp_path / name, reject_constant=True)
        assert str(err.value) == f"{tmp_path / name}: constant image (every pixel = {value})"
        assert (err.value.height, err.value.width) == (80, 96)
        with pytest.raises(ConstantImageError):
            image_size(tmp_path / name, decode=True)
        assert load_grayscale(tmp_path / name).shape == (80, 96)  # other readers still load it
    with pytest.raises(ConstantImageError, match=r"black.jpg: constant image \(every pixel = 0\)$"):
        image_size(tmp_path / "black.jpg")  # the header check decodes a sequential JPEG at 1/8 scale
    assert image_size(tmp_path / "black.png") == (80, 96)  # a PNG's header check decodes nothing
    one_dot = np.zeros((80, 96), dtype=np.uint8)
    one_dot[40, 48] = 1
    Image.fromarray(one_dot).save(tmp_path / "dot.png")
    assert load_grayscale(tmp_path / "dot.png", reject_constant=True)[40, 48] == pytest.approx(1 / 255)


def _truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def test_missing_empty_and_non_image_files(tmp_path):
    with pytest.raises(ImageLoadError, match="file does not exist") as err:
        load_grayscale(tmp_path / "nope.png")
    assert err.value.path == str(tmp_path / "nope.png") and err.value.reason == "file does not exist"
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        image_size(tmp_path / "empty.jpg")
    text = tmp_path / "report.jpg"
    text.write_text("FINDINGS: not an image\n")
    for call in (load_grayscale, image_size):
        with pytest.raises(ImageLoadError, match=r"report\.jpg: not an image file"):
            call(text)
    fake_dicom = tmp_path / "fake.dcm"
    fake_dicom.write_text("hello")
    with pytest.raises(ImageLoadError, match="fake.dcm: (not a DICOM file|cannot read DICOM)"):
        load_grayscale(fake_dicom)


def test_truncated_jpeg_and_png_are_caught_by_header_check_and_decode(tmp_path):
    Image.open(NIH_PNG).save(tmp_path / "full.jpg", quality=90)
    half_jpg = _truncate(tmp_path / "full.jpg", tmp_path / "half.jpg")
    half_png = _truncate(NIH_PNG, tmp_path / "half.png")
    with pytest.raises(ImageLoadError, match="half.jpg: truncated JPEG file"):
        image_size(half_jpg)
    with pytest.raises(ImageLoadError, match="half.png: truncated PNG file"):
        image_size(half_png)
    with pytest.raises(ImageLoadError, match="half.jpg: cannot decode JPEG data"):
        load_grayscale(half_jpg)
    with pytest.raises(ImageLoadError, match="half.png: cannot decode PNG data"):
        load_grayscale(half_png)
    assert image_size(tmp_path / "full.jpg") == (512, 512)


def test_truncated_dicom(tmp_path):
    full = write_dicom(tmp_path / "full.dcm", np.arange(64 * 64).reshape(64, 64) % 4096, "MONOCHROME2")
    half = _truncate(full, tmp_path / "half.dcm")
    with pytest.raises(ImageLoadError, match=r"half.dcm: truncated DICOM pixel data \(\d+ of 8192 bytes\)"):
        image_size(half)
    with pytest.raises(ImageLoadError, match="half.dcm: cannot decode DICOM pixel data"):
        load_grayscale(half)
    half_real = _truncate(FAKE_MONO1, tmp_path / "half_real.dcm")  # JPEG-compressed pixel data cut off
    for call in (load_grayscale, image_size):
        with pytest.raises(ImageLoadError, match="half_real.dcm: .*truncated"):
            call(half_real)


def test_decompression_bomb_is_a_load_error_not_a_crash(tmp_path):
    Image.new("1", (20000, 10000)).save(tmp_path / "huge.png")  # 2e8 pixels > 2 x PIL's MAX_IMAGE_PIXELS
    for call in (load_grayscale, image_size):
        with pytest.raises(ImageLoadError, match="huge.png: image too large"):
            call(tmp_path / "huge.png")


def _cut_to_a_third_and_reterminate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 3] + b"\xff\xd9")
    return dst


def test_jpeg_cut_short_with_its_end_marker_re_appended_is_rejected_by_header_check_and_decode(tmp_path):
    Image.open(NIH_PNG).save(tmp_path / "full.jpg", quality=90)
    Image.open(TBX_PNG).save(tmp_path / "colour.jpg", quality=90)
    for name in ("full", "colour"):
        cut = _cut_to_a_third_and_reterminate(tmp_path / f"{name}.jpg", tmp_path / f"{name}_cut.jpg")
        with Image.open(cut) as im:  # the problem: Pillow decodes it without a word, grey below the cut
            im.load()
            assert np.asarray(im.convert("L"))[-8:].std() == 0
        for call in (image_size, load_grayscale):
            with pytest.raises(ImageLoadError, match=rf"{name}_cut.jpg: truncated JPEG file") as err:
                call(cut)
            assert "the image data stops before the last block (end-of-image marker re-appended" in (
                err.value.reason
            )
    cut_late = tmp_path / "cut_late.jpg"  # even the last 1% of the coded data missing
    data = (tmp_path / "full.jpg").read_bytes()
    cut_late.write_bytes(data[: len(data) * 99 // 100] + b"\xff\xd9")
    with pytest.raises(ImageLoadError, match="the image data stops before the last block"):
        image_size(cut_late)
    # Complete files still pass, with or without restart markers, trailing bytes or optimised tables.
    assert image_size(tmp_path / "full.jpg") == (512, 512)
    Image.open(NIH_PNG).save(tmp_path / "rst.jpg", quality=90, restart_marker_rows=2, optimize=True)
    (tmp_path / "trailing.jpg").write_bytes(data + b"\r\n")
    for name in ("full.jpg", "colour.jpg", "rst.jpg", "trailing.jpg"):
        assert image_size(tmp_path / name) == (512, 512), name
        assert load_grayscale(tmp_path / name).shape == (512, 512), name


def test_progressive_jpeg_is_not_covered_by_the_scan_check_but_still_loads(tmp_path):
    """Progressive JPEGs need their end marker before the first row: the check skips them (documented)."""
    Image.open(NIH_PNG).save(tmp_path / "prog.jpg", quality=90, progressive=True)
    assert image_size(tmp_path / "prog.jpg") == (512, 512)
    assert float(np.abs(load_grayscale(tmp_path / "prog.jpg") - load_grayscale(NIH_PNG)).mean()) < 0.01


def test_symlink_loop_nul_byte_and_too_long_path_are_load_errors_with_the_reason(tmp_path):
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    for call in (image_size, load_grayscale):
        with pytest.raises(
            ImageLoadError, match=r"loop.jpg: symlink loop \(Too many levels of symbolic links\)"
        ):
            call(loop)
    with pytest.raises(ImageLoadError, match="path contains a NUL byte"):
        image_size("a\x00b.jpg")
    with pytest.raises(ImageLoadError, match="File name too long"):
        load_grayscale(tmp_path / ("x" * 5000 + ".jpg"))
    with pytest.raises(ImageLoadError, match="File name too long"):
        image_size(tmp_path / ("d/" * 2500 + "x.jpg"))
    with pytest.raises(ImageLoadError, match="file does not exist"):
        image_size(tmp_path / "missing" / "x.jpg")
