"""A corpus of bad input files, one generator function per fault, for end-to-end runs of ``protect``.

Each generator writes its file(s) into a class folder and returns what protect must make of them:
``{file name: Expect}``. :data:`CORPUS` lists them all; :func:`build_source` lays them out as a SRC
folder mixed with good images (two classes, so class-wise methods run). To cover a new fault, write a
generator and append it to :data:`CORPUS` (one that needs a whole tree — links, name twins, hidden
files — may write siblings of its file too: every path it returns is relative to its class folder).

The files are tiny (a few KB): bombs claim their size in the header only, so the corpus is cheap to
build and to protect.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageCms


@dataclass(frozen=True)
class Expect:
    """What a file's manifest record must say: its ``status``, a phrase of its ``error`` (failed and
    skipped files) or of its ``notes`` (protected files with metadata dropped), and an optional ``check``
    of the protected output (called with its path)."""

    status: str
    reason: str = ""
    note: str = ""
    check: Callable[[Path], None] | None = None


def _picture(seed: int, size: tuple[int, int] = (16, 16)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(30, 220, (size[1], size[0], 3), dtype=np.uint8))


def _jpeg_bytes(img: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **options)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _with_chunk_before_idat(png: bytes, chunk: bytes) -> bytes:
    at = png.index(b"IDAT") - 4
    return png[:at] + chunk + png[at:]


def _png_bytes(img: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **options)
    return buf.getvalue()


def icc_header(size: int, colour_space: bytes = b"RGB ") -> bytearray:
    """A well-formed ICC profile of ``size`` bytes with no tags (header: size, ``acsp``, colour space)."""
    profile = bytearray(size)
    profile[0:4] = size.to_bytes(4, "big")
    profile[16:20] = colour_space
    profile[36:40] = b"acsp"
    return profile


def _no_icc(path: Path) -> None:
    with Image.open(path) as im:
        assert "icc_profile" not in im.info, f"{path}: the dropped ICC profile was written"


# --------------------------------------------------------------------------------------------------
# generators: each writes into ``folder`` and returns {file name: Expect}


def good_images(folder: Path) -> dict[str, Expect]:
    """Plain images every run must protect, whatever else is in the folder."""
    for i in range(3):
        _picture(hash((folder.name, i)) % 1000).save(folder / f"good_{i}.png")
    return {f"good_{i}.png": Expect("ok") for i in range(3)}


def bomb_header_jpeg(folder: Path) -> dict[str, Expect]:
    """A real 16×16 JPEG whose frame header claims 13000×13000 (under the default --max-pixels): decoding
    it would take gigabytes. Refused from its header for claiming far more pixels than its bytes hold."""
    data = bytearray(_jpeg_bytes(_picture(1)))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 13000, 13000)
    (folder / "bomb_header.jpg").write_bytes(bytes(data))
    return {"bomb_header.jpg": Expect("failed", "claims 13000x13000 pixels but the file has only")}


def bomb_header_png(folder: Path) -> dict[str, Expect]:
    """A PNG whose header claims 10000×10000 gray pixels with a few bytes of data: above Pillow's own
    warning limit (89 M pixels), so a raw DecompressionBombWarning used to reach stderr."""
    header = struct.pack(">IIBBBBB", 10_000, 10_000, 8, 0, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))
    (folder / "bomb_header.png").write_bytes(data)
    return {"bomb_header.png": Expect("failed", "a decompression bomb or a truncated file")}


def huge_text_png(folder: Path) -> dict[str, Expect]:
    """A valid PNG with a zTXt chunk that decompresses to 2 MB, over Pillow's MAX_TEXT_CHUNK: not a
    corrupt header, and the message says so (ueguard never copies PNG text)."""
    text = _png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"x" * (2 << 20)))
    (folder / "huge_text.png").write_bytes(_with_chunk_before_idat(_png_bytes(_picture(2)), text))
    return {"huge_text.png": Expect("failed", "a compressed PNG metadata chunk (text or ICC profile) decompresses "
                                              "to over the 1 MB Pillow reads safely")}


def huge_compressed_icc_png(folder: Path) -> dict[str, Expect]:
    """A PNG whose iCCP chunk decompresses to 2 MB: Pillow refuses it like a large text chunk, and the
    message names both (the profile would be over ueguard's cap anyway)."""
    iccp = _png_chunk(b"iCCP", b"big\x00\x00" + zlib.compress(bytes(icc_header(2 << 20))))
    (folder / "huge_iccp.png").write_bytes(_with_chunk_before_idat(_png_bytes(_picture(7)), iccp))
    return {"huge_iccp.png": Expect("failed", "(text or ICC profile) decompresses to over the 1 MB")}


def oversized_icc_png(folder: Path) -> dict[str, Expect]:
    """A well-formed 600 KB ICC profile (over ueguard's 512 KB cap): protected, the profile dropped with a note."""
    _picture(3).save(folder / "oversized_icc.png", icc_profile=bytes(icc_header(600 * 1024)))
    return {"oversized_icc.png": Expect("ok", note="ICC profile dropped: 614400 bytes, over the 512 KB",
                                        check=_no_icc)}


def malformed_icc_jpeg(folder: Path) -> dict[str, Expect]:
    """An 'ICC profile' of arbitrary bytes (no acsp signature): protected, the payload not copied."""
    payload = b"not a profile, just a payload " * 40
    (folder / "malformed_icc.jpg").write_bytes(_jpeg_bytes(_picture(4), icc_profile=payload))
    return {"malformed_icc.jpg": Expect("ok", note="no 'acsp' signature at byte 36", check=_no_icc)}


def icc_size_mismatch_png(folder: Path) -> dict[str, Expect]:
    """A real sRGB profile with extra bytes appended (its header's size no longer matches its length)."""
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes() + b"\x00hidden payload"
    _picture(5).save(folder / "icc_mismatch.png", icc_profile=profile)
    return {"icc_mismatch.png": Expect("ok", note=f"its header declares {len(profile) - 15} bytes", check=_no_icc)}


#: EXIF tags a camera or editor writes that identify a person or a device beyond the camera model;
#: ``--keep-metadata`` must drop every one (tag → a value to plant).
PRIVATE_EXIF = {0xA430: "Jane Owner", 0xA431: "BODY-SN-12345", 0xA435: "LENS-SN-67890",
                0xA420: "0123456789abcdef0123456789abcdef", 0x9286: b"ASCII\x00\x00\x00secret comment"}
PRIVATE_IFD0 = {0x013C: "jane-laptop", 0x013B: "Jane Artist", 0x0131: "EditorPro 9 (jane's licence)"}


def private_exif_jpeg(folder: Path) -> dict[str, Expect]:
    """A JPEG with descriptive EXIF and GPS (kept with --keep-metadata) and private tags (never kept)."""
    exif = Image.Exif()
    exif[ExifTags.Base.Make], exif[ExifTags.Base.Model] = "ExampleCam", "X100"
    exif[ExifTags.Base.Copyright] = "(c) Example"
    exif.update(PRIVATE_IFD0)
    exif.get_ifd(ExifTags.IFD.Exif).update({ExifTags.Base.DateTimeOriginal: "2024:05:01 10:00:00",
                                            ExifTags.Base.FNumber: 2.8, **PRIVATE_EXIF})
    exif.get_ifd(ExifTags.IFD.GPSInfo).update({ExifTags.GPS.GPSLatitudeRef: "N",
                                               ExifTags.GPS.GPSLatitude: (52.0, 31.0, 12.5)})
    (folder / "private_exif.jpg").write_bytes(_jpeg_bytes(_picture(6), exif=exif.tobytes()))

    def check(path: Path) -> None:
        data = path.read_bytes()
        for value in (*PRIVATE_EXIF.values(), *PRIVATE_IFD0.values()):
            needle = value if isinstance(value, bytes) else value.encode()
            assert needle[-10:] not in data, f"{path}: private EXIF {value!r} was written"
        with Image.open(path) as im:
            kept = im.getexif()
            assert kept[ExifTags.Base.Make] == "ExampleCam" and kept[ExifTags.Base.Copyright] == "(c) Example"
            assert kept.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] == "2024:05:01 10:00:00"
            assert kept.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitude] == (52.0, 31.0, 12.5)

    return {"private_exif.jpg": Expect("ok", check=check)}


def broken_name_twin(folder: Path) -> dict[str, Expect]:
    """``photo.jpg`` (broken) and ``photo.png`` (valid) would both become ``photo.png``: the valid one keeps
    the name, the broken one fails with its own reason, not as a collision."""
    (folder / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    _picture(7).save(folder / "photo.png")
    return {"photo.jpg": Expect("failed", "corrupt image header"), "photo.png": Expect("ok")}


def hidden_entries(folder: Path) -> dict[str, Expect]:
    """A hidden image and a hidden folder of thumbnails: listed as skipped with the reason, never silent."""
    _picture(8).save(folder / ".secret.png")
    (folder / ".thumbs").mkdir()
    _picture(9).save(folder / ".thumbs" / "t.png")
    return {".secret.png": Expect("skipped", "hidden file"), ".thumbs": Expect("skipped", "hidden folder")}


def links(folder: Path) -> dict[str, Expect]:
    """A link to an image outside SRC (skipped: not followed), a broken link and a link loop (failed), a
    FIFO named like an image (skipped: never opened, a reader would block on it)."""
    outside = folder.parent.parent / "outside.png"
    _picture(10).save(outside)
    (folder / "outside_link.png").symlink_to(outside)
    (folder / "broken_link.png").symlink_to(folder / "missing.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    os.mkfifo(folder / "fifo.png")
    return {"outside_link.png": Expect("skipped", "outside the source folder"),
            "broken_link.png": Expect("failed", "broken symbolic link"),
            "loop.png": Expect("failed", "symbolic link loop"),
            "fifo.png": Expect("skipped", "not a regular file")}


#: Every generator; :func:`build_source` spreads them over the class folders.
CORPUS: list[Callable[[Path], dict[str, Expect]]] = [
    bomb_header_jpeg, bomb_header_png, huge_text_png, huge_compressed_icc_png, oversized_icc_png,
    malformed_icc_jpeg, icc_size_mismatch_png, private_exif_jpeg, broken_name_twin, hidden_entries, links,
]


def build_source(root: Path, generators: list[Callable[[Path], dict[str, Expect]]] | None = None,
                 classes: tuple[str, ...] = ("class_0", "class_1")) -> dict[str, Expect]:
    """SRC with good images in every class folder and the generators' faults spread over them (in turn).
    Returns {path relative to SRC: Expect}."""
    expect: dict[str, Expect] = {}
    folders = [root / name for name in classes]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        expect.update({f"{folder.name}/{name}": e for name, e in good_images(folder).items()})
    for i, generate in enumerate(CORPUS if generators is None else generators):
        folder = folders[i % len(folders)]
        expect.update({f"{folder.name}/{name}": e for name, e in generate(folder).items()})
    return expect
