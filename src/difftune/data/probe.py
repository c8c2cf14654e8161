"""Look at one file without trusting it: is it a usable image, and what will be done to it?

Every refusal is a :class:`Problem` with a named reason; nothing here raises for a bad file.
The pixel count is read from the header and checked *before* any decoding, so a decompression
bomb is refused without allocating its pixels.
"""

from __future__ import annotations

import codecs
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from difftune.data.transforms import has_transparency
from difftune.fileio import file_sha256

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
#: Files that operating systems leave in folders, with what they are.
SYSTEM_FILES = {
    ".ds_store": "macOS Finder metadata",
    "thumbs.db": "Windows thumbnail cache",
    "desktop.ini": "Windows folder settings",
    "ehthumbs.db": "Windows thumbnail cache",
}


@dataclass
class Problem:
    """Something wrong (or changed) about one file or metadata line.

    ``severity`` is ``skipped`` (the file or line is not used), ``warning`` (used, but check it)
    or ``note`` (handled automatically, e.g. EXIF rotation applied).
    """

    name: str
    kind: str
    detail: str
    severity: str = "skipped"

    @property
    def line(self) -> str:
        return f"{self.name}: {self.kind}: {self.detail}"


@dataclass
class ImageInfo:
    size: tuple[int, int]  # (height, width) after EXIF orientation
    digest: str
    notes: list[str] = field(default_factory=list)


def file_digest(path: Path) -> str:
    return file_sha256(path)


def non_image_reason(path: Path) -> str:
    low = path.name.lower()
    if low in SYSTEM_FILES:
        return SYSTEM_FILES[low]
    if low.startswith("._"):
        return "macOS resource fork (AppleDouble file)"
    suffix = path.suffix.lower() or "(no extension)"
    return f"unsupported file type {suffix}"


def describe_mode(img: Image.Image) -> list[str]:
    """Notes on what converting ``img`` to upright 8-bit RGB will do."""
    notes = []
    frames = getattr(img, "n_frames", 1)
    if getattr(img, "is_animated", False) and frames > 1:
        notes.append(f"animated ({frames} frames): the first frame is used")
    orientation = img.getexif().get(0x0112, 1)
    if orientation not in (1, None):
        notes.append(f"EXIF orientation {orientation} applied")
    if img.mode == "CMYK":
        notes.append("CMYK converted to RGB")
    elif img.mode.startswith("I;16") or img.mode == "I":
        notes.append(f"{'16' if img.mode.startswith('I;16') else '32'}-bit greyscale scaled to 8-bit")
    elif img.mode == "F":
        notes.append("32-bit float greyscale scaled to 8-bit")
    if has_transparency(img):
        notes.append("transparency composited on data.background")
    return notes


def probe_image(path: Path, *, min_size: int, max_pixels: int) -> ImageInfo | Problem:
    """Check one image file: readable, within the size limits, fully decodable."""
    name = str(path)
    try:
        if path.stat().st_size == 0:
            return Problem(name, "empty file", "0 bytes")
        digest = file_digest(path)
    except OSError as exc:
        return Problem(name, "unreadable file", str(exc))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    return Problem(name, "too large", f"{w}x{h} = {w * h:,} pixels is above data.max_pixels "
                                   f"({max_pixels:,}); refused without decoding")
                if min(w, h) < min_size:
                    return Problem(name, "too small", f"{w}x{h} is below data.min_size ({min_size} px)")
                notes = describe_mode(img)
                if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                    w, h = h, w
                img.load()
    except Image.DecompressionBombError as exc:
        return Problem(name, "too large", f"{exc}; refused without decoding")
    except UnidentifiedImageError:
        return Problem(name, "not an image", "not a readable image (corrupt, or not really "
                       f"{path.suffix or 'an image'})")
    except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, ...
        return Problem(name, "corrupt image", f"could not be decoded ({type(exc).__name__}: {exc})")
    return ImageInfo((h, w), digest, notes)


def read_text_file(path: Path) -> tuple[str, str | None, str]:
    """Text of a caption or metadata file, trying UTF-8, UTF-8 with BOM, UTF-16 with BOM, then cp1252.

    Returns ``(text, problem_or_None, severity)``; a cp1252 fallback is a warning to check.
    """
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16"), "read as UTF-16 (BOM)", "note"
        except UnicodeDecodeError:
            pass
    try:
        return raw.decode("utf-8-sig"), None, "note"
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("cp1252"), "not UTF-8; read as Windows-1252 (cp1252): check the text, save as UTF-8", "warning"
    except UnicodeDecodeError:
        return (raw.decode("cp1252", errors="replace"),
                "not UTF-8 nor Windows-1252; undecodable bytes replaced: save it as UTF-8", "warning")
