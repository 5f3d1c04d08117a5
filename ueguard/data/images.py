"""Image decode/encode layer: photo files <-> numpy arrays, with nothing lost that need not be.

``load_image`` turns any supported file into a :class:`DecodedImage` (HxWxC pixels, C = 1 or 3, 8- or
16-bit, EXIF orientation applied, alpha and ICC profile kept aside), and ``save_image`` writes protected
pixels back beside that metadata, atomically. The protection itself works on ``to_float()`` values in
[0, 1]; ``quantize`` brings them back to integers.

Decisions a reader should know about (each is explained where it is implemented):

* Every way a file can fail to decode raises :class:`ImageReadError` naming the file and a reason a user
  can act on; no Pillow traceback escapes for a bad file.
* Lossless formats (PNG, TIFF, BMP) never lose information silently: what they cannot store (alpha or
  16-bit in BMP; 16-bit grayscale with alpha in PNG or TIFF, for which Pillow has no mode) raises
  :class:`ImageWriteError` listing the formats that can. Lossy formats (JPEG, WebP, GIF) reduce 16-bit
  to 8-bit, since losing precision is what the user asked for by choosing them; JPEG still refuses alpha
  rather than flattening it onto a guessed background.
* Mode ``F`` (32-bit float TIFF) is rejected: its values have no fixed range, so any mapping to [0, 1] would
  be a guess.
* Only the ICC profile is carried over by default, and only a well-formed one of at most
  :data:`ICC_MAX_BYTES` (any other is dropped with a note, so no arbitrary payload rides along). EXIF is
  not written: orientation has already been applied, EXIF can hold a thumbnail of the unprotected
  original, and GPS and maker notes are private. ``load_image(..., keep_metadata=True)`` keeps an
  allow-list of descriptive EXIF tags (see :func:`clean_exif`) for formats that can store it (JPEG, PNG,
  WebP); it never keeps the thumbnail, maker notes, orientation or tags that identify a person or device.
  XMP, IPTC and PNG text chunks are never carried over.
* A file claiming more pixels than its size can hold, or than the memory left can decode and protect,
  is refused from its header before any pixel is decoded (see :data:`MAX_PIXELS_PER_BYTE` and
  :data:`PEAK_BYTES_PER_VALUE`), so one bad file fails alone instead of exhausting the machine.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import pathlib
import struct
import threading
import warnings
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ueguard._crash import kill_point
from ueguard.data.safe_fs import LinkError, write_atomically

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "LOSSY_FORMATS",
    "lossy_suffix",
    "OUTPUT_FORMATS",
    "SUPPORTED_SUFFIXES",
    "DecodedImage",
    "ImageFileError",
    "ImageReadError",
    "ImageWriteError",
    "load_image",
    "output_path",
    "quantize",
    "resolve_format",
    "save_image",
]

SUPPORTED_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
)
"""File suffixes (lower-case, with the dot) that ueguard reads."""

DEFAULT_MAX_PIXELS = 178_956_970
"""Decompression-bomb limit on width x height, Pillow's own default (``Image.MAX_IMAGE_PIXELS``)."""

MAX_PIXELS_PER_BYTE = 10_000
"""The most pixels a file may claim per byte it holds, once it claims over :data:`PLAUSIBLE_PIXELS`.

A photo takes bits per pixel (a JPEG about 1–4, a PNG more), and even a blank image stays under this:
Deflate expands at most about 1,032×, so a 1-bit PNG of one colour holds about 8,300 pixels per byte,
and baseline JPEG needs some bits for every 8×8 block. A file claiming more — a 781-byte JPEG whose
header says 13000×13000 — is a decompression bomb or a truncated file, refused from its header before
anything is decoded, whatever ``max_pixels`` allows."""

PLAUSIBLE_PIXELS = 1 << 24
"""Below this many pixels (16.8 M; 48 MB of 8-bit RGB) a file is never refused for its pixels per byte."""

PEAK_BYTES_PER_VALUE = 12
"""Bytes of memory per pixel value (width × height × channels) that decoding one image and protecting it
at its native size take at the peak, an upper estimate: about 10 counted over the steps (the 8-bit
image and its array copy, the float32 perturbation resized to the native size and its resampling, the
output, the decoded output), with some slack. A file whose
estimate exceeds the memory this process can still get (:func:`available_memory`) fails alone, with its
name, instead of the process being killed."""

ICC_MAX_BYTES = 512 * 1024
"""The largest ICC profile carried over. Display and working-space profiles (sRGB, Display P3, Adobe RGB)
take a few KB and LUT-based RGB device profiles (scanners, cameras) at most a few hundred KB; a larger
one is dropped (with a note), as is one that is not a well-formed profile (see ``_icc_problem``)."""

OUTPUT_FORMATS: tuple[str, ...] = ("png", "jpeg", "webp", "keep")
"""Values accepted for the output format; ``keep`` writes each file in its source format."""

LOSSY_FORMATS: frozenset[str] = frozenset({"jpeg", "webp", "gif"})
"""Resolved formats whose encoder may alter the protected pixels, so callers must measure what survived.

GIF is here although only ``keep`` produces it: it stores at most 256 palette colours. WebP is here even
though ``quality=100`` selects its lossless mode, because grayscale still comes back as 3 channels.
"""

_SUFFIX_FORMATS = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".webp": "webp",
    ".bmp": "bmp",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".gif": "gif",
}
_FORMAT_SUFFIXES = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


def lossy_suffix(path: str | pathlib.Path) -> bool:
    """Whether a file named ``path`` is written in a lossy format (by its suffix: JPEG, WebP, GIF)."""
    return _SUFFIX_FORMATS.get(pathlib.Path(path).suffix.lower()) in LOSSY_FORMATS

# Pillow names of the formats load_image accepts. Pillow's JPEG opener also returns the multi-picture
# JPEGs that phones write, named "MPO"; their first picture is an ordinary JPEG, reported as "JPEG".
_PILLOW_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


class ImageFileError(Exception):
    """A file ueguard could not read or write; ``str(e)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike[str], reason: str, errno: int | None = None) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        self.errno = errno  # the OS error number when the file system refused (ENOSPC, EACCES, ...)
        super().__init__(f"{self.path}: {reason}")


class ImageReadError(ImageFileError):
    """A source file that cannot be decoded (missing, unreadable, not an image, corrupt, too large)."""


class ImageWriteError(ImageFileError):
    """An output that cannot be written: the format cannot hold the image, or the file system refused."""


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """One decoded image, ready for the protection and for writing back.

    ``pixels`` is HxWxC with C = 1 (grayscale) or 3 (colour), uint8 (``max_value`` 255) or uint16
    (``max_value`` 65535, only for 16-bit grayscale: 16-bit colour is refused when read, as Pillow decodes
    only its high byte), with EXIF
    orientation already applied. ``alpha`` is HxW uint8 (Pillow decodes every alpha channel at 8 bits) or
    None; it is never perturbed, only carried over. ``source_format`` is Pillow's name of the decoded
    format ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"). ``icc_profile`` is kept only when it describes
    ``pixels``' colour space (a CMYK profile is dropped once CMYK has been converted to RGB). ``exif``
    is a cleaned EXIF block (see :func:`clean_exif`), present only when ``load_image`` was asked to keep
    metadata and the file had any. ``notes`` say what was dropped from the file that a user may miss
    (an oversized or malformed ICC profile); protect records them in the manifest.
    """

    pixels: np.ndarray
    alpha: np.ndarray | None
    max_value: int
    source_format: str
    icc_profile: bytes | None = None
    exif: bytes | None = None
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.pixels.ndim != 3 or self.pixels.shape[2] not in (1, 3):
            raise ValueError(f"pixels must be HxWx1 or HxWx3, got shape {self.pixels.shape}")
        expected_dtype = _DTYPE_FOR_MAX.get(self.max_value)
        if expected_dtype is None:
            raise ValueError(f"max_value must be 255 or 65535, got {self.max_value}")
        if self.pixels.dtype != expected_dtype:
            raise ValueError(
                f"pixels dtype {self.pixels.dtype} does not match max_value {self.max_value} "
                f"(expected {np.dtype(expected_dtype)})"
            )
        if self.max_value == 65535 and self.pixels.shape[2] != 1:
            raise ValueError(
                "16-bit pixels must be grayscale: Pillow can neither decode nor write 16-bit colour"
            )
        if self.alpha is not None and (
            self.alpha.shape != self.pixels.shape[:2] or self.alpha.dtype != np.uint8
        ):
            raise ValueError(
                f"alpha must be uint8 of shape {self.pixels.shape[:2]}, "
                f"got {self.alpha.dtype} of shape {self.alpha.shape}"
            )

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[2])

    @property
    def grayscale(self) -> bool:
        return self.channels == 1

    @property
    def has_alpha(self) -> bool:
        return self.alpha is not None

    def to_float(self) -> np.ndarray:
        """Pixels as HxWxC float32 in [0, 1] (``pixels / max_value``); ``quantize`` inverts it exactly."""
        values = self.pixels.astype(np.float32)
        values /= np.float32(self.max_value)
        return values


_DTYPE_FOR_MAX = {255: np.uint8, 65535: np.uint16}


def quantize(values: np.ndarray, max_value: int) -> np.ndarray:
    """Map floats in [0, 1] to integers: ``rint(values * max_value)`` clipped to ``[0, max_value]``.

    Rounding is half-to-even (``np.rint``), so 0.5/255 maps to 0 and 1.5/255 to 2. The result is uint8
    for ``max_value`` 255 and uint16 for 65535. NaN or infinite values are rejected: they mean a bug
    upstream, and casting them to integers would silently write garbage pixels.
    """
    dtype = _DTYPE_FOR_MAX.get(max_value)
    if dtype is None:
        raise ValueError(f"max_value must be 255 or 65535, got {max_value}")
    if not np.issubdtype(values.dtype, np.floating):
        raise TypeError(f"quantize expects floating-point values, got {values.dtype}")
    if not np.isfinite(values).all():
        raise ValueError("cannot quantize NaN or infinite values")
    # Computed in float32 (or the input's wider type): float32 holds every integer up to 2**24 exactly,
    # so even 16-bit values round correctly, and a large photo is not copied to float64.
    scaled = np.multiply(values, max_value, dtype=np.result_type(values.dtype, np.float32))
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, max_value, out=scaled)
    return scaled.astype(dtype)


def resolve_format(fmt: str, source_suffix: str) -> str:
    """The concrete format to write: ``fmt`` itself, or for ``keep`` the format ``source_suffix`` names.

    ``keep`` maps .png → png, .jpg/.jpeg → jpeg, .webp → webp, .bmp → bmp, .tif/.tiff → tiff and
    .gif → gif (case-insensitive). The suffix, not the decoded content, decides, so that the written
    file always matches the name ``output_path`` gives it.
    """
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; expected one of {', '.join(OUTPUT_FORMATS)}")
    if fmt != "keep":
        return fmt
    try:
        return _SUFFIX_FORMATS[source_suffix.lower()]
    except KeyError:
        raise ValueError(
            f"cannot keep the format of a {source_suffix!r} file; "
            f"supported suffixes: {', '.join(sorted(SUPPORTED_SUFFIXES))}"
        ) from None


def output_path(relative_src: pathlib.PurePath, fmt: str) -> pathlib.PurePath:
    """Where the protected copy of ``relative_src`` goes, relative to the output root.

    Same directories and base name; the suffix becomes .png, .jpg or .webp, or stays as it is for
    ``keep``. Two sources differing only in suffix (``a.jpg``, ``a.png``) map to the same output for a
    non-``keep`` format; detecting that is the caller's job, since it needs the whole file list.
    """
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; expected one of {', '.join(OUTPUT_FORMATS)}")
    if fmt == "keep":
        return relative_src
    return relative_src.with_suffix(_FORMAT_SUFFIXES[fmt])


# --------------------------------------------------------------------------------------------------
# Decoding


def load_image(
    path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS, keep_metadata: bool = False
) -> DecodedImage:
    """Decode the first frame of an image file, with EXIF orientation applied.

    Pillow modes map as follows: ``1`` and ``L`` → 1 channel uint8; ``LA`` → gray + alpha; ``P``,
    ``RGB`` and ``L`` with a transparency key → RGBA / LA, so the key becomes a real alpha channel that
    survives perturbed pixels; ``RGBA`` → RGB + alpha; ``I;16*`` and ``I`` with values in 0..65535 →
    1 channel uint16; ``F`` is rejected (see the module docstring); anything else (CMYK, YCbCr, ...) →
    RGB. A transparency key on 16-bit grayscale is not carried over: it would need a 16-bit gray plus alpha
    image, which no Pillow writer can store losslessly.

    ``max_pixels`` bounds width x height, read from the header before any pixel is decoded; so do the
    pixels-per-byte and memory checks (see :data:`MAX_PIXELS_PER_BYTE`, :data:`PEAK_BYTES_PER_VALUE`).
    ``keep_metadata`` keeps a cleaned EXIF block in ``exif`` (see :func:`clean_exif`). Raises
    :class:`ImageReadError` for every kind of bad file.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    _allow_pillow_up_to(max_pixels)
    with _open_source(path) as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise ImageReadError(path, "zero-byte file")
        img, source_format = _decode(path, fh, max_pixels)
    try:
        decoded = _to_decoded(path, img, source_format)
    except MemoryError as err:
        raise ImageReadError(path, f"not enough memory to convert {img.width}x{img.height} pixels") from err
    exif = _read_exif(img) if keep_metadata else None
    return dataclasses.replace(decoded, exif=exif) if exif else decoded


def _read_exif(img: Image.Image) -> bytes | None:
    """The cleaned EXIF of a decoded image; an EXIF block Pillow cannot parse is dropped, not fatal."""
    try:
        return clean_exif(img.getexif())
    except Exception:  # only Pillow's EXIF parser runs here
        return None


# The EXIF tags --keep-metadata keeps: an allow-list, so a tag not named here (owner name, body and lens
# serial numbers, host computer, user comment, artist, image unique ID, maker notes, thumbnails, XMP,
# IPTC, vendor blobs, ...) is never written. Orientation is not kept either: it is applied to the pixels.
_EXIF_KEPT = {
    "main": frozenset({
        0x010E,  # ImageDescription
        0x010F, 0x0110,  # Make, Model (the camera)
        0x0132,  # DateTime
        0x8298,  # Copyright
    }),
    "exif": frozenset({
        0x9000, 0xA001,  # ExifVersion, ColorSpace (how to read the rest, and the pixels' colour space)
        0x9003, 0x9004, 0x9010, 0x9011, 0x9012, 0x9290, 0x9291, 0x9292,  # dates, time zones, sub-seconds
        0x829A, 0x829D, 0x8822, 0x8827, 0x8830, 0x8831, 0x8832, 0x8833,  # exposure time, f-number, program, ISO
        0x9201, 0x9202, 0x9203, 0x9204, 0x9205, 0x9206, 0x9207, 0x9208, 0x9209, 0x920A,  # APEX values, metering,
        # light source, flash, focal length
        0xA215, 0xA217, 0xA402, 0xA403, 0xA404, 0xA405, 0xA406, 0xA407, 0xA408, 0xA409, 0xA40A, 0xA40C,
        # exposure index, sensing method, exposure mode, white balance, zoom, 35 mm focal length, scene,
        # gain, contrast, saturation, sharpness, subject distance range
        0xA432, 0xA433, 0xA434,  # LensSpecification, LensMake, LensModel (not the lens serial number)
    }),
    "gps": frozenset(range(0x0000, 0x0020)),  # the GPS IFD's own tags (GPSVersionID … GPSHPositioningError)
}
_EXIF_MAX_VALUE_BYTES = 512  # longer byte strings are opaque blobs (previews hide there), never text


def clean_exif(exif: Image.Exif) -> bytes | None:
    """The EXIF worth keeping with ``--keep-metadata``, as bytes for Pillow's ``exif=``, or None.

    Kept: only the tags of ``_EXIF_KEPT`` — the camera (make, model, lens make/model/specification), the
    dates, the exposure settings, the description and copyright — and the GPS block: what the user asked
    for. Everything else is dropped, among it what identifies a person or a device beyond the camera
    model (owner name, body and lens serial numbers, host computer, artist, user comment, image unique
    ID), the thumbnail (IFD1 is not written at all: it is a small copy of the *unprotected* image), the
    orientation (already applied), maker notes, XMP/IPTC, and any byte string over 512 bytes.
    """
    if not exif:
        return None
    from PIL import ExifTags

    cleaned = Image.Exif()
    cleaned.update({tag: value for tag, value in exif.items() if _keep_exif_value(tag, value, "main")})
    for ifd_tag, kind in ((ExifTags.IFD.Exif, "exif"), (ExifTags.IFD.GPSInfo, "gps")):
        kept = {tag: value for tag, value in exif.get_ifd(ifd_tag).items() if _keep_exif_value(tag, value, kind)}
        if kept:
            cleaned.get_ifd(ifd_tag).update(kept)
            cleaned[ifd_tag] = cleaned.get_ifd(ifd_tag)
    return cleaned.tobytes() if len(cleaned) else None


def _keep_exif_value(tag: int, value: Any, ifd: str) -> bool:
    if tag not in _EXIF_KEPT[ifd] or isinstance(value, dict):
        return False
    return not (isinstance(value, bytes) and len(value) > _EXIF_MAX_VALUE_BYTES)


def _allow_pillow_up_to(max_pixels: int) -> None:
    """Make sure Pillow's process-wide bomb guard does not refuse what this call allows.

    ``load_image`` enforces ``max_pixels`` itself from the header; Pillow's ``MAX_IMAGE_PIXELS`` stays on
    as a backstop (it also checks GIF frames and TIFF tiles during decoding). It is only ever raised,
    never lowered, so concurrent callers with different limits cannot weaken each other's own check.
    """
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _open_source(path: str | os.PathLike[str]) -> IO[bytes]:
    """Open ``path`` for reading, ourselves rather than through Pillow, so that file-system errors
    (missing, directory, permission) are told apart from decoding errors."""
    try:
        return open(path, "rb")
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM):
            reason = "permission denied (cannot read the file)"
        elif err.errno == errno.ENOENT:
            reason = "no such file"
        elif err.errno == errno.EISDIR:
            reason = "is a directory, not an image file"
        else:
            reason = f"cannot open the file ({err.strerror or err})"
        raise ImageReadError(path, reason) from err


_HEADER_LOCK = threading.Lock()


def open_quietly(fh: IO[bytes] | str | os.PathLike[str],
                 formats: tuple[str, ...] | None = _PILLOW_FORMATS) -> Image.Image:
    """``Image.open`` without Pillow's ``DecompressionBombWarning``: ueguard checks the size itself (from
    the header, with its own message: see :func:`load_image`), so the warning would only repeat it as
    raw text on stderr. Pillow's error for twice its limit still raises. Warning filters are
    process-wide, so the filter is held under a lock (the header read is short)."""
    with _HEADER_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(fh, formats=formats)


def _header_reason(err: Exception) -> str:
    """Why Pillow could not read a header, in words a user can act on."""
    text = str(err)
    if "MAX_TEXT_CHUNK" in text:  # Pillow's limit on a compressed zTXt, iTXt or iCCP chunk
        return ("a compressed PNG metadata chunk (text or ICC profile) decompresses to over the 1 MB Pillow "
                "reads safely; ueguard copies neither PNG text nor an ICC profile that large, so re-save the "
                f"image without that metadata and run again ({text})")
    if "MAX_TEXT_MEMORY" in text:
        return ("its PNG text metadata (tEXt/zTXt/iTXt chunks) takes over the 64 MB Pillow reads safely; "
                "ueguard never copies PNG text, so re-save the image without its text metadata and run "
                f"again ({text})")
    return f"corrupt image header ({text})"


def _over_limit_reason(pixels: str, max_pixels: int) -> str:
    return (
        f"image has {pixels} pixels, over the limit of {max_pixels}; raise --max-pixels if you trust the file"
    )


def _decode(path: str | os.PathLike[str], fh: IO[bytes], max_pixels: int) -> tuple[Image.Image, str]:
    """Fully decode the first frame and apply EXIF orientation; every Pillow failure → ImageReadError.

    ``load()`` is forced here so that truncated data is detected now, not later in the pipeline
    (``ImageFile.LOAD_TRUNCATED_IMAGES`` is deliberately left off). Pillow raises many exception types
    for corrupt data (OSError, SyntaxError, ValueError, struct.error, ...), and only Pillow calls run
    inside the broad ``except``.
    """
    try:
        img = open_quietly(fh)
    except UnidentifiedImageError as err:
        raise ImageReadError(
            path, "not an image (Pillow cannot identify it as PNG, JPEG, WebP, BMP, TIFF or GIF)"
        ) from err
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, _over_limit_reason("too many", max_pixels)) from err
    except Exception as err:
        raise ImageReadError(path, _header_reason(err)) from err

    width, height = img.size
    if width * height > max_pixels:
        size = f"{width * height} ({width}x{height})"
        raise ImageReadError(path, _over_limit_reason(size, max_pixels))
    _check_plausible(path, img, os.fstat(fh.fileno()).st_size)
    source_format = "JPEG" if img.format == "MPO" else str(img.format)
    if _is_sixteen_bit_colour(img):
        raise ImageReadError(
            path,
            "16-bit colour is not supported: Pillow decodes it to its high byte only, so the protection "
            "could not be measured against the original; convert it to 8-bit colour (or 16-bit grayscale) "
            "first",
        )

    try:
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, _over_limit_reason("too many", max_pixels)) from err
    except MemoryError as err:
        raise ImageReadError(path, f"not enough memory to decode {width}x{height} pixels") from err
    except Exception as err:
        raise ImageReadError(path, f"truncated or corrupt image data ({err})") from err
    return img, source_format


def _check_plausible(path: str | os.PathLike[str], img: Image.Image, file_bytes: int) -> None:
    """Refuse, from the header alone, a file claiming more pixels than its bytes can hold (see
    :data:`MAX_PIXELS_PER_BYTE`) or more than the memory left can decode and protect (see
    :data:`PEAK_BYTES_PER_VALUE`)."""
    width, height = img.size
    pixels = width * height
    if pixels > PLAUSIBLE_PIXELS and pixels > MAX_PIXELS_PER_BYTE * file_bytes:
        raise ImageReadError(
            path,
            f"its header claims {width}x{height} pixels but the file has only {file_bytes} bytes, over "
            f"{MAX_PIXELS_PER_BYTE} pixels per byte, which no real image reaches: a decompression bomb or a "
            "truncated file",
        )
    need = pixels * min(len(img.getbands()), 3) * PEAK_BYTES_PER_VALUE
    free = available_memory()
    if free is not None and need > free:
        raise ImageReadError(
            path,
            f"{width}x{height} pixels need about {_gib(need)} of memory to decode and protect, but only "
            f"{_gib(free)} is available; protect it on a machine with more memory",
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def available_memory() -> int | None:
    """Bytes this process can still allocate: the least of the system's available memory, the room left
    under its address-space limit (``RLIMIT_AS``) and under its cgroup's memory limit; None when none
    of them can be read (the check is then skipped)."""
    limits = [_meminfo_available(), _rlimit_room(), _cgroup_room()]
    known = [n for n in limits if n is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _rlimit_room() -> int | None:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm") as fh:
            used = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        return max(0, soft - used)
    except (ImportError, OSError, ValueError, IndexError):
        return None


def _cgroup_room() -> int | None:
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as fh:
            return max(0, int(limit) - int(fh.read().strip()))
    except (OSError, ValueError):
        return None


def _is_sixteen_bit_colour(img: Image.Image) -> bool:
    """A 48- or 64-bit colour file (16 bits per channel), which Pillow opens as 8-bit RGB/RGBA: its raw
    mode, read from the tiles before decoding, says ``RGB;16B``, ``RGBA;16N`` and the like."""
    if img.mode not in ("RGB", "RGBA"):
        return False
    for tile in img.tile:
        args = tile[3]  # (codec, extents, offset, args); a named tuple in newer Pillow
        rawmode = args if isinstance(args, str) else (args[0] if args and isinstance(args[0], str) else "")
        if ";16" in rawmode:
            return True
    return False


def _to_decoded(path: str | os.PathLike[str], img: Image.Image, source_format: str) -> DecodedImage:
    """Convert a loaded Pillow image to the arrays of a :class:`DecodedImage` (see ``load_image``)."""
    mode = img.mode
    # Read before any conversion: the profile describes the source colour space.
    icc_profile = img.info.get("icc_profile") or None
    if mode == "F":
        raise ImageReadError(
            path,
            "32-bit floating-point image (mode F) is not supported: its value range is unknown; "
            "convert it to 8- or 16-bit integers first",
        )

    alpha: np.ndarray | None = None
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageReadError(
                path,
                f"32-bit integer image with values {values.min()}..{values.max()} outside 0..65535 "
                "is not supported; convert it to 16-bit first",
            )
        pixels = values.astype(np.uint16)[:, :, None]  # also makes big-endian I;16B native
        max_value = 65535
    else:
        has_key = "transparency" in img.info
        if mode in ("1", "L"):
            target = "LA" if has_key else "L"
        elif mode in ("LA", "La"):
            target = "LA"
        elif mode in ("P", "RGB"):
            target = "RGBA" if has_key else "RGB"
        elif mode in ("PA", "RGBA", "RGBa"):
            target = "RGBA"
        else:
            target = "RGB"
        if img.mode != target:
            img = img.convert(target)
        values = np.asarray(img)
        if target in ("LA", "RGBA"):
            pixels = np.ascontiguousarray(values[:, :, :-1])
            alpha = np.ascontiguousarray(values[:, :, -1])
        elif target == "L":
            pixels = values[:, :, None].copy()
        else:
            pixels = values.copy()
        max_value = 255

    notes: tuple[str, ...] = ()
    problem = None if icc_profile is None else _icc_problem(icc_profile)
    if problem is not None:
        notes, icc_profile = (f"ICC profile dropped: {problem}",), None
    if icc_profile is not None and not _profile_matches(icc_profile, pixels.shape[2]):
        icc_profile = None
    return DecodedImage(pixels, alpha, max_value, source_format, icc_profile, notes=notes)


def _icc_problem(profile: bytes) -> str | None:
    """Why an embedded ICC profile is not carried over, or None when it is a plausible profile: at most
    :data:`ICC_MAX_BYTES`, the ``acsp`` signature at byte 36, a header size equal to its length, and
    (where Pillow has LittleCMS) a profile LittleCMS can parse — so no arbitrary payload rides along."""
    if len(profile) > ICC_MAX_BYTES:
        return f"{len(profile)} bytes, over the {ICC_MAX_BYTES // 1024} KB that ueguard carries over"
    if len(profile) < 132 or profile[36:40] != b"acsp":
        return "not an ICC profile (no 'acsp' signature at byte 36)"
    declared = int.from_bytes(profile[:4], "big")
    if declared != len(profile):
        return f"its header declares {declared} bytes but it holds {len(profile)}"
    count = int.from_bytes(profile[128:132], "big")
    if 132 + 12 * count > len(profile):
        return f"its tag table ({count} tags) runs past its end"
    for i in range(count):
        offset, size = struct.unpack_from(">II", profile, 132 + 12 * i + 4)
        if offset < 132 or offset + size > len(profile):
            return f"tag {i} lies outside the profile (offset {offset}, {size} bytes)"
    try:
        from PIL import ImageCms
    except ImportError:  # a Pillow built without LittleCMS: the header checks above are all there is
        return None
    try:
        ImageCms.ImageCmsProfile(io.BytesIO(profile))
    except Exception as err:  # only LittleCMS's parser runs here
        return f"LittleCMS cannot parse it ({err})"
    return None


def _profile_matches(profile: bytes, channels: int) -> bool:
    """Whether an ICC profile's data colour space (header bytes 16..19) describes 1- or 3-channel data."""
    return profile[16:20] == (b"GRAY" if channels == 1 else b"RGB ")


# --------------------------------------------------------------------------------------------------
# Encoding


@dataclass(frozen=True)
class _Codec:
    """What one output format can store through Pillow's writer."""

    pillow_format: str
    lossless: bool
    alpha: bool
    sixteen_bit: bool
    icc: bool
    grayscale: bool


_CODECS = {
    "png": _Codec("PNG", lossless=True, alpha=True, sixteen_bit=True, icc=True, grayscale=True),
    "tiff": _Codec("TIFF", lossless=True, alpha=True, sixteen_bit=True, icc=True, grayscale=True),
    "bmp": _Codec("BMP", lossless=True, alpha=False, sixteen_bit=False, icc=False, grayscale=True),
    "jpeg": _Codec("JPEG", lossless=False, alpha=False, sixteen_bit=False, icc=True, grayscale=True),
    # WebP has no grayscale: Pillow stores gray as RGB with equal channels.
    "webp": _Codec("WEBP", lossless=False, alpha=True, sixteen_bit=False, icc=True, grayscale=False),
    # GIF: at most 256 palette colours (Pillow picks an adaptive palette), and its alpha is one transparent
    # palette entry: alpha 0 stays transparent, any other alpha becomes opaque.
    "gif": _Codec("GIF", lossless=False, alpha=True, sixteen_bit=False, icc=False, grayscale=True),
}


def save_image(
    path: str | os.PathLike[str],
    image: DecodedImage,
    pixels: np.ndarray,
    *,
    fmt: str,
    quality: int = 95,
    keep_metadata: bool = False,
    root: str | os.PathLike[str] | None = None,
) -> None:
    """Write ``pixels`` (same shape and dtype as ``image.pixels``) with ``image``'s alpha and ICC profile.

    ``fmt`` is a resolved format (see ``resolve_format``): png, tiff and bmp are lossless; jpeg uses
    ``quality`` with 4:4:4 chroma; webp is lossy at ``quality`` and lossless at ``quality == 100`` (with
    the colour under fully transparent pixels kept exactly); gif is palette-quantised. Grayscale stays
    grayscale, 16-bit stays 16-bit in png/tiff and is rounded to 8-bit (``round(v / 257)``) for the lossy
    formats. ``quality`` (1..100) matters only for jpeg and webp. No EXIF or other metadata is written,
    except ``image.exif`` (already cleaned, see :func:`clean_exif`) with ``keep_metadata`` for jpeg, png
    and webp.

    The file appears atomically: it is encoded to a hidden ``.ueguard-<random>.tmp`` beside the
    destination, fsynced and renamed into place, so an interrupted run never leaves a half-written image.
    With ``root`` (the output folder), no folder from ``root`` down to ``path``'s may be a symbolic link:
    the file is never written through one (see :mod:`ueguard.data.safe_fs`).
    Raises :class:`ImageWriteError` when the format cannot hold this image or the write fails.
    """
    codec = _CODECS.get(fmt)
    if codec is None:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {', '.join(_CODECS)}")
    if pixels.shape != image.pixels.shape or pixels.dtype != image.pixels.dtype:
        raise ValueError(
            f"pixels are {pixels.dtype} {pixels.shape}, expected {image.pixels.dtype} {image.pixels.shape}"
        )
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    unsupported = _unsupported_reason(fmt, image)
    if unsupported is not None:
        raise ImageWriteError(path, unsupported)

    encoded = _to_pillow(pixels, image.alpha, codec)
    params: dict[str, Any] = {}
    if codec.icc and image.icc_profile is not None:
        stored_channels = image.channels if codec.grayscale else 3
        if _profile_matches(image.icc_profile, stored_channels):
            params["icc_profile"] = image.icc_profile
    if fmt == "jpeg":
        params.update(quality=quality, subsampling=0)
    elif fmt == "webp":
        params.update(quality=quality, lossless=quality == 100, exact=quality == 100)
    elif fmt == "tiff":
        params.update(compression="tiff_lzw")
    if keep_metadata and image.exif and fmt in _EXIF_FORMATS:
        params["exif"] = image.exif
    _write_atomically(pathlib.Path(path), encoded, codec.pillow_format, params,
                      None if root is None else pathlib.Path(root))


_EXIF_FORMATS = frozenset({"jpeg", "png", "webp"})


def _unsupported_reason(fmt: str, image: DecodedImage) -> str | None:
    """Why ``fmt`` cannot hold ``image`` without a loss the user did not choose, or None if it can."""
    sixteen_bit = image.max_value == 65535

    def fits(name: str) -> bool:
        codec = _CODECS[name]
        loses_alpha = image.has_alpha and not codec.alpha
        # A lossless format must keep all 16 bits, and no Pillow writer has 16-bit gray + alpha.
        loses_depth = codec.lossless and sixteen_bit and (image.has_alpha or not codec.sixteen_bit)
        return not (loses_alpha or loses_depth)

    if fits(fmt):
        return None
    if image.has_alpha and sixteen_bit and fmt in ("png", "tiff"):
        problem = "Pillow has no 16-bit grayscale + alpha mode, so this image cannot be written losslessly"
    elif image.has_alpha and not _CODECS[fmt].alpha:
        problem = f"{fmt.upper()} cannot store an alpha channel"
    else:
        problem = f"{fmt.upper()} cannot store 16-bit pixels losslessly"
    working = [name for name in _CODECS if fits(name)]
    return f"{problem}; formats that can: {', '.join(working)}"


def _to_pillow(pixels: np.ndarray, alpha: np.ndarray | None, codec: _Codec) -> Image.Image:
    """Build the Pillow image to encode: L / I;16 / LA / RGB / RGBA, or RGBA for gray + alpha in GIF.

    Pillow's GIF writer drops the alpha of an LA image, so gray with alpha is widened to RGBA there.
    """
    if pixels.dtype == np.uint16 and not codec.sixteen_bit:
        pixels = ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if alpha is None:
        return Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    if pixels.shape[2] == 1 and codec.pillow_format == "GIF":
        pixels = np.repeat(pixels, 3, axis=2)
    return Image.fromarray(np.concatenate([pixels, alpha[:, :, None]], axis=2))


def _write_atomically(path: pathlib.Path, encoded: Image.Image, pillow_format: str, params: dict[str, Any],
                      root: pathlib.Path | None = None) -> None:
    """Encode into a temporary file beside ``path`` and rename it into place (:func:`write_atomically`:
    with ``root``, no folder between ``root`` and ``path`` may be a link); clean up on failure."""
    try:
        write_atomically(path, lambda fh: encoded.save(fh, format=pillow_format, **params), root=root,
                         before_rename=lambda: kill_point("tmp-written"))
    except LinkError as err:
        raise ImageWriteError(path, f"cannot write the output file: {err.strerror}", err.errno) from err
    except OSError as err:
        raise ImageWriteError(path, f"cannot write the output file ({err.strerror or err})", err.errno) from err
