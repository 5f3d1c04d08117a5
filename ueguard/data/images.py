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
* Only the ICC profile is carried over by default. EXIF is not written: orientation has already been
  applied, EXIF can hold a thumbnail of the unprotected original, and GPS and maker notes are private.
  ``load_image(..., keep_metadata=True)`` keeps a cleaned EXIF (see :func:`clean_exif`) for formats
  that can store it (JPEG, PNG, WebP); it never keeps the thumbnail, maker notes or orientation.
  XMP, IPTC and PNG text chunks are never carried over.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pathlib
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
    metadata and the file had any.
    """

    pixels: np.ndarray
    alpha: np.ndarray | None
    max_value: int
    source_format: str
    icc_profile: bytes | None = None
    exif: bytes | None = None

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

    ``max_pixels`` bounds width x height, read from the header before any pixel is decoded.
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
    decoded = _to_decoded(path, img, source_format)
    exif = _read_exif(img) if keep_metadata else None
    return dataclasses.replace(decoded, exif=exif) if exif else decoded


def _read_exif(img: Image.Image) -> bytes | None:
    """The cleaned EXIF of a decoded image; an EXIF block Pillow cannot parse is dropped, not fatal."""
    try:
        return clean_exif(img.getexif())
    except Exception:  # only Pillow's EXIF parser runs here
        return None


# EXIF tags never kept, even with keep_metadata: orientation (already applied to the pixels), the
# offsets/lengths of embedded image data (thumbnails, strips, tiles), and blobs that can hold a preview
# of the unprotected image or other opaque data: MakerNote, XMP (ApplicationNotes), IPTC, ICC (kept
# separately, checked against the pixels), PrintIM.
_EXIF_DROPPED = frozenset({
    0x0112,  # Orientation
    0x0111, 0x0117, 0x0144, 0x0145, 0x0201, 0x0202,  # strip/tile/JPEG-thumbnail offsets and lengths
    0x927C,  # MakerNote
    0x02BC,  # XMP
    0x83BB,  # IPTC
    0x8773,  # ICC profile
    0xC4A5,  # PrintIM
})
_EXIF_MAX_VALUE_BYTES = 512  # longer byte strings are opaque blobs (previews hide there), never text


def clean_exif(exif: Image.Exif) -> bytes | None:
    """The EXIF worth keeping with ``--keep-metadata``, as bytes for Pillow's ``exif=``, or None.

    Kept: the main image's descriptive tags (camera make and model, dates, exposure, copyright, artist)
    and the GPS block — the user asked for their metadata. Never kept: the thumbnail (IFD1 is not
    written at all: it is a small copy of the *unprotected* image), orientation (already applied), maker
    notes, XMP/IPTC blobs and any byte string over 512 bytes (see ``_EXIF_DROPPED``).
    """
    if not exif:
        return None
    from PIL import ExifTags

    sub = {tag: dict(exif.get_ifd(tag)) for tag in (ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo) if exif.get_ifd(tag)}
    cleaned = Image.Exif()
    for tag, value in exif.items():
        if tag not in sub and _keep_exif_value(tag, value) and tag not in (ExifTags.IFD.Exif, ExifTags.IFD.GPSInfo):
            cleaned[tag] = value
    for ifd_tag, values in sub.items():
        kept = {tag: value for tag, value in values.items()
                if _keep_exif_value(tag, value) and tag != ExifTags.IFD.Interop}
        if kept:
            cleaned.get_ifd(ifd_tag).update(kept)
            cleaned[ifd_tag] = cleaned.get_ifd(ifd_tag)
    return cleaned.tobytes() if len(cleaned) else None


def _keep_exif_value(tag: int, value: Any) -> bool:
    if tag in _EXIF_DROPPED or isinstance(value, dict):
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
    with warnings.catch_warnings():
        # Pillow only warns between its limit and twice that; here any excess is an error. (Before Python
        # 3.14 this filter is process-wide; a thread race can at worst leave it installed, which is benign.)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(fh, formats=_PILLOW_FORMATS)
        except UnidentifiedImageError as err:
            raise ImageReadError(
                path, "not an image (Pillow cannot identify it as PNG, JPEG, WebP, BMP, TIFF or GIF)"
            ) from err
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageReadError(path, _over_limit_reason("too many", max_pixels)) from err
        except Exception as err:
            raise ImageReadError(path, f"corrupt image header ({err})") from err

        width, height = img.size
        if width * height > max_pixels:
            size = f"{width * height} ({width}x{height})"
            raise ImageReadError(path, _over_limit_reason(size, max_pixels))
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
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageReadError(path, _over_limit_reason("too many", max_pixels)) from err
        except MemoryError as err:
            raise ImageReadError(path, f"not enough memory to decode {width}x{height} pixels") from err
        except Exception as err:
            raise ImageReadError(path, f"truncated or corrupt image data ({err})") from err
    return img, source_format


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

    if icc_profile is not None and not _profile_matches(icc_profile, pixels.shape[2]):
        icc_profile = None
    return DecodedImage(pixels, alpha, max_value, source_format, icc_profile)


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
