"""Privacy of outputs: a real JPEG carrying EXIF GPS, a maker note, an orientation and an embedded
thumbnail (the unprotected image in small) plus an ICC profile. By default nothing but the ICC profile
survives; ``--keep-metadata`` keeps the descriptive EXIF and GPS but never the thumbnail, the maker note
or the orientation. The manifest holds no pixel data either way."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import ExifTags, Image, ImageCms

from fault_corpus import icc_header
from trees import _picture, write_class_tree
from ueguard.cli import main
from ueguard.data.images import clean_exif, load_image, save_image
from ueguard.data.manifest import MANIFEST_NAME

FAST = ["--budget", "quick", "--size", "16", "--device", "cpu", "--surrogate", "resnet18_cifar_slim",
        "-o", "max_rounds=1", "-o", "pgd_steps=1", "-o", "train_steps=1", "--quiet"]
MAKER_NOTE = b"Nikon\x00\x02\x10\x00\x00" + bytes(range(200))
GPS = {ExifTags.GPS.GPSLatitudeRef: "N", ExifTags.GPS.GPSLatitude: (52.0, 31.0, 12.5),
       ExifTags.GPS.GPSLongitudeRef: "E", ExifTags.GPS.GPSLongitude: (13.0, 24.0, 3.25)}


def exif_with_thumbnail(thumbnail: bytes) -> bytes:
    """EXIF (APP1 payload) with IFD0 (make, orientation 6), the Exif IFD (date, maker note), GPS, and an
    IFD1 holding ``thumbnail`` as a JPEG — the layout cameras write. Pillow writes no IFD1, so it is
    appended by hand: IFD0's next-IFD pointer is patched to point at it."""
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "ExampleCam"
    exif[ExifTags.Base.Orientation] = 6
    exif.get_ifd(ExifTags.IFD.Exif).update({ExifTags.Base.DateTimeOriginal: "2024:05:01 10:00:00",
                                            ExifTags.Base.MakerNote: MAKER_NOTE})
    exif.get_ifd(ExifTags.IFD.GPSInfo).update(GPS)
    tiff = bytearray(exif.tobytes()[6:])  # drop "Exif\0\0": offsets are relative to the TIFF header
    e = {b"II": "<", b"MM": ">"}[bytes(tiff[:2])]  # byte order of the TIFF structure
    n_entries = struct.unpack_from(e + "H", tiff, 8)[0]
    next_ifd_at = 8 + 2 + 12 * n_entries
    assert struct.unpack_from(e + "I", tiff, next_ifd_at)[0] == 0
    ifd1_at = len(tiff) + (len(tiff) % 2)
    tiff += b"\x00" * (ifd1_at - len(tiff))
    thumb_at = ifd1_at + 2 + 12 * 3 + 4
    tiff += struct.pack(e + "H", 3)
    tiff += struct.pack(e + "HHIHH", 0x0103, 3, 1, 6, 0)              # Compression: JPEG (SHORT, left-aligned)
    tiff += struct.pack(e + "HHII", 0x0201, 4, 1, thumb_at)          # JPEGInterchangeFormat
    tiff += struct.pack(e + "HHII", 0x0202, 4, 1, len(thumbnail))    # JPEGInterchangeFormatLength
    tiff += struct.pack(e + "I", 0) + thumbnail
    struct.pack_into(e + "I", tiff, next_ifd_at, ifd1_at)
    return b"Exif\x00\x00" + bytes(tiff)


def write_camera_jpeg(path: Path) -> dict:
    rng = np.random.default_rng(0)
    picture = _picture(rng, 0, 40, 24)
    buf = io.BytesIO()
    picture.resize((16, 10)).save(buf, format="JPEG", quality=90)
    thumbnail = buf.getvalue()
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    picture.save(path, format="JPEG", quality=95, exif=exif_with_thumbnail(thumbnail), icc_profile=icc)
    # The fixture is what it claims: Pillow finds GPS, the maker note and a thumbnail at IFD1's offset.
    with Image.open(path) as im:
        exif = im.getexif()
        assert exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitude] == (52.0, 31.0, 12.5)
        assert exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.MakerNote] == MAKER_NOTE
        assert ExifTags.Base.JpegIFOffset in exif.get_ifd(ExifTags.IFD.IFD1)
        assert thumbnail in im.info["exif"] and im.info["icc_profile"] == icc
    return {"thumbnail": thumbnail, "icc": icc}


@pytest.fixture(scope="module")
def camera_tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("privacy")
    write_class_tree(base / "src", n_per_class=3, classes=2, size=16)
    made = write_camera_jpeg(base / "src" / "class_0" / "camera.jpg")
    return base, made


def run(base: Path, out: str, *extra: str) -> Path:
    result = CliRunner().invoke(main, ["protect", str(base / "src"), "--out", str(base / out), *FAST, *extra],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return base / out


def test_default_output_keeps_only_the_icc_profile(camera_tree):
    base, made = camera_tree
    out = run(base, "plain", "--format", "keep")
    path = out / "class_0" / "camera.jpg"
    data = path.read_bytes()
    assert b"Exif\x00\x00" not in data and made["thumbnail"] not in data and MAKER_NOTE not in data
    assert b"ExampleCam" not in data and b"2024:05:01" not in data
    with Image.open(path) as im:
        assert not im.getexif() and "exif" not in im.info and "xmp" not in im.info
        assert im.info["icc_profile"] == made["icc"]
        assert im.size == (24, 40)  # orientation 6 applied to the pixels: stored 40×24, shown 24×40
    manifest = (out / MANIFEST_NAME).read_text()
    assert "ExampleCam" not in manifest and "52.0" not in manifest
    assert max(map(len, manifest.splitlines())) < 2000  # no pixel data could fit


@pytest.mark.parametrize("fmt", ["png", "webp", "tiff", "bmp"])
def test_default_save_writes_no_exif_in_any_format(camera_tree, tmp_path, fmt):
    base, made = camera_tree
    source = load_image(base / "src" / "class_0" / "camera.jpg")
    assert source.exif is None
    path = tmp_path / f"camera.{fmt}"
    save_image(path, source, source.pixels, fmt=fmt)
    data = path.read_bytes()
    assert made["thumbnail"] not in data and b"ExampleCam" not in data and MAKER_NOTE not in data
    with Image.open(path) as im:
        exif = im.getexif()  # for TIFF this holds the file's own structure tags, so check the EXIF ones
        assert ExifTags.Base.Make not in exif and ExifTags.Base.Orientation not in exif
        assert not exif.get_ifd(ExifTags.IFD.GPSInfo) and not exif.get_ifd(ExifTags.IFD.Exif)
        assert im.size == (24, 40)
        assert im.info.get("icc_profile") == (made["icc"] if fmt != "bmp" else None)


@pytest.mark.parametrize("fmt, suffix", [("keep", ".jpg"), ("png", ".png"), ("webp", ".webp")])
def test_keep_metadata_keeps_gps_and_camera_fields_but_never_the_thumbnail(camera_tree, tmp_path, fmt, suffix):
    base, made = camera_tree
    source = load_image(base / "src" / "class_0" / "camera.jpg", keep_metadata=True)
    path = tmp_path / f"camera{suffix}"
    save_image(path, source, source.pixels, fmt="jpeg" if fmt == "keep" else fmt, quality=95, keep_metadata=True)
    data = path.read_bytes()
    assert made["thumbnail"] not in data and MAKER_NOTE not in data
    with Image.open(path) as im:
        exif = im.getexif()
        assert exif[ExifTags.Base.Make] == "ExampleCam"
        assert ExifTags.Base.Orientation not in exif and im.size == (24, 40)
        assert exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitude] == (52.0, 31.0, 12.5)
        assert exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] == "2024:05:01 10:00:00"
        assert ExifTags.Base.MakerNote not in exif.get_ifd(ExifTags.IFD.Exif)
        assert not exif.get_ifd(ExifTags.IFD.IFD1)


def test_keep_metadata_end_to_end(camera_tree):
    base, made = camera_tree
    out = run(base, "kept", "--keep-metadata", "--format", "keep")
    data = (out / "class_0" / "camera.jpg").read_bytes()
    assert b"ExampleCam" in data and made["thumbnail"] not in data and MAKER_NOTE not in data
    with Image.open(out / "class_0" / "camera.jpg") as im:
        assert im.getexif().get_ifd(ExifTags.IFD.GPSInfo) and im.info["icc_profile"] == made["icc"]


def test_clean_exif_drops_large_blobs_and_empty_exif():
    assert clean_exif(Image.Exif()) is None
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 3
    assert clean_exif(exif) is None  # nothing left once orientation (already applied) is gone
    exif[ExifTags.Base.ImageDescription] = "holiday"
    exif[0xC000] = b"\xff\xd8" + bytes(4000)  # an unknown vendor blob: could be a preview
    with Image.open(io.BytesIO(_jpeg_with(clean_exif(exif)))) as im:
        kept = im.getexif()
    assert kept[ExifTags.Base.ImageDescription] == "holiday" and 0xC000 not in kept


def _jpeg_with(exif: bytes) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


def test_keep_metadata_keeps_only_the_allow_listed_tags(tmp_path):
    """Owner name, body and lens serials, host computer, user comment, artist, software and the image's
    unique ID identify a person or a device: never written, even with --keep-metadata."""
    from fault_corpus import PRIVATE_EXIF, PRIVATE_IFD0, private_exif_jpeg

    expect = private_exif_jpeg(tmp_path)
    source = load_image(tmp_path / "private_exif.jpg", keep_metadata=True)
    with Image.open(io.BytesIO(_jpeg_with(source.exif))) as im:
        kept = im.getexif()
        assert not set(PRIVATE_IFD0) & set(kept) and not set(PRIVATE_EXIF) & set(kept.get_ifd(ExifTags.IFD.Exif))
    for fmt in ("png", "jpeg", "webp"):
        path = tmp_path / f"out.{fmt}"
        save_image(path, source, source.pixels, fmt=fmt, keep_metadata=True)
        expect["private_exif.jpg"].check(path)


@pytest.mark.parametrize("profile, note", [
    (lambda: bytes(icc_header(600 * 1024)), "614400 bytes, over the 512 KB that ueguard carries over"),
    (lambda: b"\x00" * 4 + b"payload " * 40, "no 'acsp' signature at byte 36"),
    (lambda: bytes(icc_header(200))[:132] + b"\x00" * 68 + b"appended", "its header declares 200 bytes but it holds 208"),
    (lambda: bytes(icc_header(132)[:128]) + (5).to_bytes(4, "big"), "its tag table (5 tags) runs past its end"),
    (lambda: bytes(icc_header(144)[:128]) + (1).to_bytes(4, "big") + b"desc" + struct.pack(">II", 100, 4000),
     "tag 0 lies outside the profile"),
])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_an_oversized_or_malformed_icc_profile_is_dropped_with_a_note(tmp_path, profile, note, fmt):
    path = tmp_path / f"source.{fmt.lower()}"
    _picture(np.random.default_rng(0), 0, 16, 16).save(path, format=fmt, icc_profile=profile())
    image = load_image(path)
    assert image.icc_profile is None and len(image.notes) == 1
    assert image.notes[0].startswith("ICC profile dropped: ") and note in image.notes[0]
    save_image(tmp_path / "out.png", image, image.pixels, fmt="png")
    with Image.open(tmp_path / "out.png") as im:
        assert "icc_profile" not in im.info


def test_a_real_profile_is_kept_without_a_note(tmp_path):
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    _picture(np.random.default_rng(0), 0, 16, 16).save(tmp_path / "srgb.png", icc_profile=profile)
    image = load_image(tmp_path / "srgb.png")
    assert image.icc_profile == profile and image.notes == ()
