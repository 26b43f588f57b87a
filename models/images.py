"""Load any radiograph (PNG 8/16-bit, RGB(A), JPEG, DICOM) as one float32 grey-scale array in [0, 1].

Every image consumer (GLoRIA, ECAMP pre-training, downstream tasks) reads pixels through
`load_grayscale`, so a DICOM, a 16-bit PNG and an RGB PNG of the same film come out with the same
orientation and polarity (bone bright, air dark). A DICOM's polarity comes from its
PhotometricInterpretation tag, which is sometimes wrong (the real `Fake_MONOHR1.dcm` fixture stores
positive pixels under MONOCHROME1): after obeying the header the loader checks the result with
`looks_inverted` and flips a chest film that came out as a negative, with a warning. `image_size` is the cheap
check the report extraction runs on every listed image: it reads the header and the end-of-file marker (plus,
for a JPEG, its entropy-coded data: see `_decode_jpeg_to_last_block`), or decodes fully when asked.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

DICOM_SUFFIXES = {".dcm", ".dicom"}
JPEG_START = b"\xff\xd8"
JPEG_END = b"\xff\xd9"
# Zero bytes in place of a JPEG's end marker: libjpeg reads up to 8 bytes ahead of the last block it decodes.
JPEG_SCAN_PAD = b"\x00" * 16
JPEG_CUT_SHORT = (
    "truncated JPEG file: the image data stops before the last block (end-of-image marker re-appended "
    "after a cut; it would decode with grey fill)"
)
PNG_END = b"IEND"
# pydicom drops a pixel data element that the end of the file cuts off, so "missing" often means truncated.
NO_PIXEL_DATA = "DICOM file has no complete pixel data (missing, or the file is truncated)"


class ImageLoadError(Exception):
    """An image that cannot be used; `reason` says why in words a user can act on."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ConstantImageError(ImageLoadError):
    """Every pixel has one value (a blank export, a failed conversion): it decodes, and it shows nothing.

    `value` is in the file's own units (0-255 for 8-bit, stored values after the DICOM LUTs); the size is
    kept so that a caller can name a more basic problem (too small to be a radiograph) first.
    """

    def __init__(self, path: str | os.PathLike, value: float, height: int, width: int):
        super().__init__(path, f"constant image (every pixel = {value:g})")
        self.value, self.height, self.width = value, height, width


def load_grayscale(
    path: str | os.PathLike, fix_polarity: bool = True, reject_constant: bool = False
) -> np.ndarray:
    """Decode `path` to a float32 [H, W] array in [0, 1], higher = more attenuating (bone, heart).

    `fix_polarity`: a DICOM that obeys its header but looks like a negative chest film is flipped back
    (with a warning naming the file); PNG/JPEG carry no polarity tag and are taken as they are.
    `reject_constant`: ConstantImageError for an image whose pixels all have one value (an all-black
    export); without it such an image loads as all zeros (a constant DICOM) or its one grey level.
    """
    path = Path(path)
    _require_file(path)
    if _is_dicom(path):
        pixels = _load_dicom(path, reject_constant)
        if fix_polarity and looks_inverted(pixels):
            warnings.warn(
                f"{path}: looks like a negative after applying its PhotometricInterpretation; flipped",
                stacklevel=2,
            )
            pixels = 1.0 - pixels
        return pixels
    return _load_pil(path, reject_constant)


def image_size(path: str | os.PathLike, decode: bool = False) -> tuple[int, int]:
    """(height, width) of a usable image; raises ImageLoadError for a missing, truncated or non-image file,
    and ConstantImageError for one whose pixels all have one value.

    Without `decode` only the header and the format's end marker (JPEG EOI, PNG IEND) are read, which
    catches files cut short at a fraction of the cost of decoding; a sequential JPEG is also decoded at 1/8
    scale (see `_decode_jpeg_to_last_block`), which shows a constant one. A constant PNG, DICOM or
    progressive JPEG is found only with `decode`, which decodes the pixels.
    """
    path = Path(path)
    _require_file(path)
    if decode:
        shape = load_grayscale(path, fix_polarity=False, reject_constant=True).shape
        return shape[0], shape[1]
    if _is_dicom(path):
        return _dicom_header_size(path)
    return _pil_header_size(path)


# --------------------------------------------------------------------------- common


def describe_path_error(path: str | os.PathLike, err: OSError | ValueError) -> str:
    """Words for why a path cannot be looked up or opened (os calls raise ValueError for a NUL byte)."""
    if "\x00" in os.fspath(path):
        return "path contains a NUL byte"
    if isinstance(err, ValueError):
        return str(err)
    if err.errno == errno.ELOOP:
        return f"symlink loop ({err.strerror})"
    return err.strerror or str(err)  # e.g. "File name too long", "Permission denied"


def path_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot even be looked up (NUL byte, symlink loop, name too long, no permission), or None.

    A path that is merely missing is not a problem here: the image check names it "file does not exist".
    """
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as err:
        return describe_path_error(path, err)
    return None


def _require_file(path: Path) -> None:
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise ImageLoadError(path, "file does not exist") from None
    except (OSError, ValueError) as err:
        raise ImageLoadError(path, describe_path_error(path, err)) from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageLoadError(path, "not a regular file")
    if info.st_size == 0:
        raise ImageLoadError(path, "file is empty (0 bytes)")


def _is_dicom(path: Path) -> bool:
    """DICOM by suffix or by the 'DICM' magic at byte 128 (MIMIC DICOMs have no suffix rules)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with path.open("rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


def _require_variation(path: Path, pixels: np.ndarray) -> None:
    """ConstantImageError when every pixel of `pixels` (the file's own values) is the same."""
    low, high = float(pixels.min()), float(pixels.max())
    if low == high:
        raise ConstantImageError(path, low, pixels.shape[0], pixels.shape[1])


def _to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1]; a constant image becomes all zeros rather than NaN."""
    pixels = pixels.astype(np.float32, copy=False)
    low, high = float(pixels.min()), float(pixels.max())
    if high <= low:
        return np.zeros_like(pixels, dtype=np.float32)
    return (pixels - low) / (high - low)


# --------------------------------------------------------------------------- PIL formats


def _open_pil(path: Path, source: io.BytesIO | None = None) -> Image.Image:
    """Open `source` (the bytes of `path`) or `path` itself; errors name `path`."""
    try:
        return Image.open(path if source is None else source)
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file (no known image format header)") from None
    except Image.DecompressionBombError as err:
        raise ImageLoadError(path, f"image too large: {err}") from None
    except OSError as err:
        raise ImageLoadError(path, f"cannot open image: {err}") from None


def _load_pil(path: Path, reject_constant: bool = False) -> np.ndarray:
    im = _decode_jpeg_to_last_block(path, reduce=1)
    if im is None:
        im = _open_pil(path)
    with im:
        try:
            im.load()
            im = ImageOps.exif_transpose(im)
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageLoadError(path, f"cannot decode {im.format or 'image'} data: {err}") from None
        return _pil_to_unit_gray(path, im, reject_constant)


def _pil_to_unit_gray(path: Path, im: Image.Image, reject_constant: bool = False) -> np.ndarray:
    """8-bit modes are scaled by 255, 16-bit by 65535 (full range kept), float images min-max."""
    scale: float | None
    if im.mode.startswith("I;16"):
        pixels, scale = np.asarray(im, dtype=np.float32), 65535.0
    elif im.mode == "I":
        pixels = np.asarray(im, dtype=np.float32)
        scale = 65535.0 if pixels.max() <= 65535 and pixels.min() >= 0 else None
    elif im.mode == "F":
        pixels, scale = np.asarray(im, dtype=np.float32), None
    else:
        if im.mode != "L":
            # RGB(A), LA, palette and 1-bit images: ITU-R 601 luma, alpha ignored.
            im = im.convert("L")
        pixels, scale = np.asarray(im, dtype=np.float32), 255.0
        if pixels.ndim != 2:
            raise ImageLoadError(path, f"unexpected pixel array shape {pixels.shape} for mode {im.mode}")
    if reject_constant:
        _require_variation(path, pixels)
    return pixels / scale if scale else _to_unit_range(pixels)


def _pil_header_size(path: Path) -> tuple[int, int]:
    with _open_pil(path) as im:
        fmt, (width, height) = im.format, im.size
    end = {"JPEG": JPEG_END, "PNG": PNG_END}.get(fmt or "")
    if end is not None:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 64))
            tail = f.read().rstrip(b"\x00\r\n ")
        if end not in tail[-12:]:
            raise ImageLoadError(path, f"truncated {fmt} file (no end-of-image marker)")
    if fmt == "JPEG":
        im = _decode_jpeg_to_last_block(path, reduce=8)
        if im is not None:
            with im:
                low, high = (im if im.mode == "L" else im.convert("L")).getextrema()
            if low == high:  # a constant JPEG decodes to the same constant at 1/8 scale
                raise ConstantImageError(path, low, height, width)
    return height, width


# --------------------------------------------------------------------------- JPEG cut short and re-terminated


def _decode_jpeg_to_last_block(path: Path, reduce: int) -> Image.Image | None:
    """The decoded image (at 1/`reduce` scale) of a single-scan sequential JPEG, or ImageLoadError when its
    entropy-coded data stops before the last block; None for other files (not JPEG, progressive, multi-scan).

    libjpeg decodes a JPEG that was cut short and re-terminated with an end marker (FF D9) "successfully",
    filling the missing blocks with grey, and Pillow keeps no trace of libjpeg's warning. Decoded from its
    bytes with the end marker replaced by `JPEG_SCAN_PAD`, the same file runs out of data instead, which
    Pillow reports as "image file is truncated" (LOAD_TRUNCATED_IMAGES off, Pillow's default); a complete
    file decodes as before. Progressive and multi-scan JPEGs need their end marker before the first row,
    so they are not covered. Cost (CPU time, `bench/image_check.py`): at full scale it is the decode
    `load_grayscale` does anyway, plus one in-memory copy of the file; at 1/8 scale (what the header check
    adds) it reads the whole file and entropy-decodes it: 0.15 ms for header + end marker alone, +1 ms for a
    512x512 JPEG, +10 ms for a 2544x3056 JPEG of 0.7 MB and +35 ms at 2.6 MB (a quarter of a full decode).
    """
    try:
        with path.open("rb") as f:
            if f.read(2) != JPEG_START:
                return None
            data = JPEG_START + f.read()
    except OSError as err:
        raise ImageLoadError(path, f"cannot read file: {describe_path_error(path, err)}") from None
    if not _single_sequential_scan(data):
        return None
    end = data.rfind(JPEG_END)
    im = _open_pil(path, io.BytesIO((data if end < 0 else data[:end]) + JPEG_SCAN_PAD))
    if reduce > 1:
        im.draft("L", (max(1, im.width // reduce), max(1, im.height // reduce)))
    try:
        im.load()
    except (OSError, SyntaxError, ValueError) as err:
        im.close()
        if end >= 0 and _decodes(data):
            raise ImageLoadError(path, JPEG_CUT_SHORT) from None
        raise ImageLoadError(path, f"cannot decode JPEG data: {err}") from None
    return im


def _decodes(data: bytes) -> bool:
    """Whether Pillow decodes `data` as it is (then a failure without the end marker means a cut)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except (OSError, SyntaxError, ValueError):
        return False
    return True


def _single_sequential_scan(data: bytes) -> bool:
    """True for a Huffman sequential JPEG (SOF0/SOF1) whose first scan holds every component: the only
    layout whose entropy-coded data must reach the last block before the end marker."""
    components, pos = None, 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in (0xC0, 0xC1) and pos + 9 < len(data):
            components = data[pos + 9]
        elif 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return False  # progressive, lossless or arithmetic-coded frame
        elif marker == 0xDA:
            return components is not None and data[pos + 4] == components
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return False


# --------------------------------------------------------------------------- DICOM


def _read_dicom(path: Path, stop_before_pixels: bool = False) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as err:
        raise ImageLoadError(path, f"not a DICOM file: {err}") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError) as err:
        raise ImageLoadError(path, f"cannot read DICOM file: {err}") from None


def _load_dicom(path: Path, reject_constant: bool = False) -> np.ndarray:
    """Stored values -> modality LUT (rescale slope/intercept) -> VOI window if any -> [0, 1] -> invert
    MONOCHROME1 so that, as for PNG/JPEG radiographs, higher means more attenuating."""
    ds = _read_dicom(path)
    if "PixelData" not in ds:
        raise ImageLoadError(path, NO_PIXEL_DATA)
    try:
        pixels = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for bad/truncated pixel data
        raise ImageLoadError(path, f"cannot decode DICOM pixel data: {err}") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageLoadError(path, f"multi-frame DICOM ({frames} frames) is not a single radiograph")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3:
        # Colour DICOM (pydicom already converted YBR to RGB): luma as for RGB PNGs.
        pixels = pixels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        if reject_constant:
            _require_variation(path, pixels)
        return _to_unit_range(pixels)
    pixels = apply_modality_lut(pixels, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        pixels = apply_voi_lut(pixels, ds)
    if reject_constant:
        _require_variation(path, np.asarray(pixels))
    pixels = _to_unit_range(np.asarray(pixels))
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels
    return pixels


def _dicom_header_size(path: Path) -> tuple[int, int]:
    ds = _read_dicom(path)
    if "PixelData" not in ds:
        raise ImageLoadError(path, NO_PIXEL_DATA)
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageLoadError(path, "DICOM file has no Rows/Columns")
    height, width = int(ds.Rows), int(ds.Columns)
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        expected = height * width * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
        if len(ds.PixelData) < expected:
            raise ImageLoadError(
                path, f"truncated DICOM pixel data ({len(ds.PixelData)} of {expected} bytes)"
            )
    return height, width


# --------------------------------------------------------------------------- polarity diagnostic


def looks_inverted(pixels: np.ndarray, margin: float = 0.1) -> bool:
    """True when a *frontal* chest radiograph looks like a negative: the spine/mediastinum column (middle
    tenth of the width) is darker than both lung bands by more than `margin`.

    A DICOM whose PhotometricInterpretation is wrong (MONOCHROME1 on MONOCHROME2 pixels, as in the
    real `Fake_MONOHR1.dcm` fixture) loads as a negative when the header is obeyed; this finds such files.
    Only meaningful for PA/AP views: on a lateral view the middle of the image is not the spine.
    """
    height, width = pixels.shape
    rows = slice(int(0.25 * height), int(0.75 * height))
    column = float(np.median(pixels[rows, int(0.45 * width) : int(0.55 * width)]))
    right_lung = float(np.median(pixels[rows, int(0.2 * width) : int(0.35 * width)]))
    left_lung = float(np.median(pixels[rows, int(0.65 * width) : int(0.8 * width)]))
    return column + margin < min(right_lung, left_lung)
