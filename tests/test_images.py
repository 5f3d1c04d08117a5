"""Tests for ueguard.data.images: decoding every mode, encoding every format, and every failure path.

All files are generated in tmp_path; nothing here needs the network or a GPU.
"""

from __future__ import annotations

import errno
import io
import os
import pathlib
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image, ImageCms, ImageFile

from ueguard.data import images
from ueguard.data.images import (
    DEFAULT_MAX_PIXELS,
    LOSSY_FORMATS,
    SUPPORTED_SUFFIXES,
    DecodedImage,
    ImageReadError,
    ImageWriteError,
    load_image,
    output_path,
    quantize,
    resolve_format,
    save_image,
)

H, W = 24, 32  # non-square, so a rotation or a transposition shows in the shape


def _gradient_rgb() -> np.ndarray:
    """A smooth HxWx3 image: lossy encoders reproduce it closely, so errors stay easy to bound."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([x * 255 // (W - 1), y * 255 // (H - 1), (x + y) * 255 // (W + H - 2)], axis=2).astype(
        np.uint8
    )


def _checker_alpha() -> np.ndarray:
    """Binary alpha in 8x8 blocks: fully transparent or opaque, which every alpha-capable format keeps."""
    y, x = np.mgrid[0:H, 0:W]
    return np.where((y // 8 + x // 8) % 2, 255, 0).astype(np.uint8)


def _noise(shape: tuple[int, ...], dtype: type = np.uint8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)


def _write(path: pathlib.Path, img: Image.Image, fmt: str | None = None, **params) -> pathlib.Path:
    img.save(path, format=fmt, **params)
    return path


def _srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _fake_profile(colour_space: bytes) -> bytes:
    """A well-formed ICC header (size, ``acsp`` signature) with the given data colour space and no tags;
    enough for metadata tests."""
    header = bytearray(132)
    header[0:4] = len(header).to_bytes(4, "big")
    header[16:20] = colour_space
    header[36:40] = b"acsp"
    return bytes(header)


# --------------------------------------------------------------------------------------------------
# Decoding: every Pillow mode maps to the documented arrays


def _palette_image() -> Image.Image:
    return Image.fromarray(_noise((H, W, 3), seed=1)).quantize(colors=16)


DECODE_CASES = {
    # name: (Pillow image, format, expected pixels, expected alpha or None)
    "rgb_png": lambda: (Image.fromarray(_noise((H, W, 3))), "PNG", _noise((H, W, 3)), None),
    "l_png": lambda: (Image.fromarray(_noise((H, W))), "PNG", _noise((H, W))[:, :, None], None),
    "la_png": lambda: (
        Image.fromarray(np.dstack([_noise((H, W)), _checker_alpha()])),
        "PNG",
        _noise((H, W))[:, :, None],
        _checker_alpha(),
    ),
    "rgba_png": lambda: (
        Image.fromarray(np.dstack([_noise((H, W, 3)), _noise((H, W), seed=2)])),
        "PNG",
        _noise((H, W, 3)),
        _noise((H, W), seed=2),
    ),
    "p_png": lambda: (_palette_image(), "PNG", np.asarray(_palette_image().convert("RGB")), None),
    "p_transparent_png": lambda: (
        _with_transparency(_palette_image(), 3),
        "PNG",
        np.asarray(_palette_image().convert("RGB")),
        np.where(np.asarray(_palette_image()) == 3, 0, 255).astype(np.uint8),
    ),
    "1bit_png": lambda: (
        Image.fromarray(_noise((H, W)) > 127),
        "PNG",
        np.where(_noise((H, W)) > 127, 255, 0).astype(np.uint8)[:, :, None],
        None,
    ),
    "i16_png": lambda: (
        Image.fromarray(_noise((H, W), np.uint16)),
        "PNG",
        _noise((H, W), np.uint16)[:, :, None],
        None,
    ),
    "i16_tiff": lambda: (
        Image.fromarray(_noise((H, W), np.uint16)),
        "TIFF",
        _noise((H, W), np.uint16)[:, :, None],
        None,
    ),
    "i32_tiff_in_range": lambda: (
        Image.fromarray(_noise((H, W), np.uint16).astype(np.int32)),
        "TIFF",
        _noise((H, W), np.uint16)[:, :, None],
        None,
    ),
    "rgba_tiff": lambda: (
        Image.fromarray(np.dstack([_noise((H, W, 3)), _checker_alpha()])),
        "TIFF",
        _noise((H, W, 3)),
        _checker_alpha(),
    ),
    "rgb_bmp": lambda: (Image.fromarray(_noise((H, W, 3))), "BMP", _noise((H, W, 3)), None),
    "l_bmp": lambda: (Image.fromarray(_noise((H, W))), "BMP", _noise((H, W))[:, :, None], None),
    "rgba_webp_lossless": lambda: (
        Image.fromarray(np.dstack([_noise((H, W, 3)), _noise((H, W), seed=2)])),
        "WEBP",
        _noise((H, W, 3)),
        _noise((H, W), seed=2),
    ),
    "p_gif": lambda: (_palette_image(), "GIF", np.asarray(_palette_image().convert("RGB")), None),
}


def _with_transparency(img: Image.Image, index: int) -> Image.Image:
    img.info["transparency"] = index
    return img


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_modes(tmp_path, case):
    img, fmt, want_pixels, want_alpha = DECODE_CASES[case]()
    params = {"lossless": True, "exact": True} if fmt == "WEBP" else {}
    path = _write(tmp_path / f"src.{fmt.lower()}", img, fmt, **params)

    decoded = load_image(path)

    assert decoded.source_format == fmt
    assert decoded.pixels.dtype == want_pixels.dtype
    assert decoded.max_value == np.iinfo(want_pixels.dtype).max
    np.testing.assert_array_equal(decoded.pixels, want_pixels)
    if want_alpha is None:
        assert decoded.alpha is None and not decoded.has_alpha
    else:
        np.testing.assert_array_equal(decoded.alpha, want_alpha)
    assert (decoded.height, decoded.width) == (H, W)
    assert decoded.grayscale == (want_pixels.shape[2] == 1)
    assert decoded.pixels.flags.writeable


def test_colour_key_transparency_becomes_alpha(tmp_path):
    gray = _noise((H, W))
    rgb = _noise((H, W, 3))
    rgb[0, 0] = (1, 2, 3)
    gray_path = _write(tmp_path / "l.png", Image.fromarray(gray), transparency=int(gray[0, 0]))
    rgb_path = _write(tmp_path / "rgb.png", Image.fromarray(rgb), transparency=(1, 2, 3))

    gray_decoded = load_image(gray_path)
    rgb_decoded = load_image(rgb_path)

    np.testing.assert_array_equal(gray_decoded.alpha, np.where(gray == gray[0, 0], 0, 255))
    np.testing.assert_array_equal(gray_decoded.pixels[:, :, 0], gray)
    np.testing.assert_array_equal(rgb_decoded.alpha, np.where((rgb == (1, 2, 3)).all(axis=2), 0, 255))
    np.testing.assert_array_equal(rgb_decoded.pixels, rgb)


def test_cmyk_becomes_rgb_and_drops_the_cmyk_profile(tmp_path):
    cmyk = Image.fromarray(_noise((H, W, 3))).convert("CMYK")
    path = _write(tmp_path / "cmyk.jpg", cmyk, "JPEG", icc_profile=_fake_profile(b"CMYK"))

    decoded = load_image(path)

    assert decoded.channels == 3 and decoded.pixels.dtype == np.uint8
    assert decoded.icc_profile is None


def test_mpo_is_reported_as_jpeg(tmp_path):
    frame = Image.fromarray(_gradient_rgb())
    path = _write(tmp_path / "phone.jpg", frame, "MPO", save_all=True, append_images=[frame])

    assert load_image(path).source_format == "JPEG"


def test_exif_orientation_is_applied_to_jpeg(tmp_path):
    # Quadrants of solid colour survive JPEG well enough to check where each one ends up.
    quadrants = np.zeros((H, W, 3), np.uint8)
    quadrants[: H // 2, : W // 2] = (255, 0, 0)
    quadrants[: H // 2, W // 2 :] = (0, 255, 0)
    quadrants[H // 2 :, : W // 2] = (0, 0, 255)
    quadrants[H // 2 :, W // 2 :] = (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = _write(tmp_path / "rotated.jpg", Image.fromarray(quadrants), quality=95, exif=exif.tobytes())

    decoded = load_image(path)

    assert decoded.pixels.shape == (W, H, 3)

    def error(reference: np.ndarray) -> float:
        return float(np.abs(decoded.pixels.astype(int) - reference).mean())

    # JPEG rings at the quadrant edges; a wrong rotation would be off by ~100 on average.
    assert error(np.rot90(quadrants, k=-1)) < 10
    assert error(np.rot90(quadrants, k=1)) > 50


def test_exif_orientation_is_applied_to_png_exactly(tmp_path):
    pixels = _noise((H, W, 3))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _write(tmp_path / "rotated.png", Image.fromarray(pixels), exif=exif.tobytes())

    np.testing.assert_array_equal(load_image(path).pixels, np.rot90(pixels, k=-1))


def test_animated_gif_decodes_its_first_frame(tmp_path):
    red = Image.new("RGB", (W, H), (255, 0, 0))
    blue = Image.new("RGB", (W, H), (0, 0, 255))
    path = _write(tmp_path / "anim.gif", red, save_all=True, append_images=[blue], duration=100)
    with Image.open(path) as animation:
        assert animation.n_frames == 2

    decoded = load_image(path)

    assert decoded.pixels.shape == (H, W, 3)
    assert (decoded.pixels == (255, 0, 0)).all()


# --------------------------------------------------------------------------------------------------
# Decoding failures: always ImageReadError naming the file


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    return buffer.getvalue()


def _corrupt_png() -> bytes:
    data = bytearray(_encoded(Image.fromarray(_noise((64, 64, 3))), "PNG"))
    data[len(data) // 2 : len(data) // 2 + 16] = bytes(16)  # break the IDAT stream and its CRC
    return bytes(data)


BAD_FILES = {
    # name: (file name, bytes, words expected in the reason)
    "zero_byte": ("empty.png", lambda: b"", "zero-byte"),
    "truncated_png": (
        "cut.png",
        lambda: (data := _encoded(Image.fromarray(_noise((64, 64, 3))), "PNG"))[: len(data) // 2],
        "truncated or corrupt",
    ),
    "truncated_jpeg": (
        "cut.jpg",
        lambda: (data := _encoded(Image.fromarray(_noise((64, 64, 3))), "JPEG"))[: len(data) // 2],
        "truncated or corrupt",
    ),
    "corrupt_png": ("corrupt.png", _corrupt_png, "truncated or corrupt"),
    "random_bytes": ("noise.png", lambda: _noise((4096,)).tobytes(), "not an image"),
    "text_as_jpeg": ("notes.jpg", lambda: b"just some text, not a photo\n" * 10, "not an image"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_raise_image_read_error(tmp_path, case):
    name, make, reason = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(make())

    with pytest.raises(ImageReadError) as caught:
        load_image(path)

    assert caught.value.path == str(path)
    assert str(caught.value) == f"{path}: {caught.value.reason}"
    assert reason in caught.value.reason


def test_directory_raises_image_read_error(tmp_path):
    directory = tmp_path / "looks_like.png"
    directory.mkdir()

    with pytest.raises(ImageReadError, match="is a directory") as caught:
        load_image(directory)
    assert str(directory) in str(caught.value)


def test_missing_file_raises_image_read_error(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        load_image(tmp_path / "gone.png")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root (or non-POSIX) reads any file")
def test_unreadable_file_raises_image_read_error(tmp_path):
    path = _write(tmp_path / "locked.png", Image.fromarray(_noise((H, W, 3))))
    path.chmod(0)
    try:
        with pytest.raises(ImageReadError, match="permission denied") as caught:
            load_image(path)
        assert str(path) in str(caught.value)
    finally:
        path.chmod(0o644)


def test_permission_error_is_reported_as_such(tmp_path, monkeypatch):
    """The same mapping as above, checked even as root by making ``open`` refuse."""
    path = _write(tmp_path / "locked.png", Image.fromarray(_noise((H, W, 3))))

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(images, "open", refuse, raising=False)
    with pytest.raises(ImageReadError, match="permission denied"):
        load_image(path)


def test_image_over_max_pixels_is_refused_before_decoding(tmp_path, monkeypatch):
    path = _write(tmp_path / "big.png", Image.fromarray(_noise((H, W, 3))))
    assert load_image(path, max_pixels=H * W).pixels.shape == (H, W, 3)

    def must_not_decode(self):
        raise AssertionError("pixels were decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", must_not_decode)
    with pytest.raises(ImageReadError) as caught:
        load_image(path, max_pixels=H * W - 1)

    assert caught.value.reason == (
        f"image has {H * W} ({W}x{H}) pixels, over the limit of {H * W - 1}; "
        "raise --max-pixels if you trust the file"
    )


@pytest.mark.parametrize("side", [40, 50], ids=["pillow_warning", "pillow_error"])
def test_pillow_bomb_guard_becomes_image_read_error(tmp_path, monkeypatch, side):
    # With Pillow's limit at 1000 pixels, 40x40 is in its warning band (1000..2000), 50x50 over its error.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = _write(tmp_path / "bomb.png", Image.fromarray(_noise((side, side))))

    with pytest.raises(ImageReadError, match="over the limit of 1000"):
        load_image(path, max_pixels=1000)


def test_max_pixels_above_pillow_limit_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = _write(tmp_path / "trusted.png", Image.fromarray(_noise((50, 50))))

    assert load_image(path, max_pixels=10_000).pixels.shape == (50, 50, 1)


def test_float_tiff_is_rejected(tmp_path):
    path = _write(tmp_path / "float.tif", Image.fromarray(np.ones((H, W), np.float32)))

    with pytest.raises(ImageReadError, match="floating-point"):
        load_image(path)


def test_32bit_tiff_outside_16bit_range_is_rejected(tmp_path):
    path = _write(tmp_path / "wide.tif", Image.fromarray(np.full((H, W), 70_000, np.int32)))

    with pytest.raises(ImageReadError, match=r"outside 0\.\.65535"):
        load_image(path)


# --------------------------------------------------------------------------------------------------
# Encoding: every kind of image x every format


SAVE_KINDS = {
    "rgb": lambda: DecodedImage(_gradient_rgb(), None, 255, "PNG"),
    "gray": lambda: DecodedImage(_gradient_rgb()[:, :, :1].copy(), None, 255, "PNG"),
    "gray_alpha": lambda: DecodedImage(_gradient_rgb()[:, :, :1].copy(), _checker_alpha(), 255, "PNG"),
    "rgba": lambda: DecodedImage(_gradient_rgb(), _checker_alpha(), 255, "PNG"),
    "gray16": lambda: DecodedImage(
        _gradient_rgb()[:, :, :1].astype(np.uint16) * 257 + 100, None, 65535, "PNG"
    ),
    "gray16_alpha": lambda: DecodedImage(
        _gradient_rgb()[:, :, :1].astype(np.uint16) * 257 + 100, _checker_alpha(), 65535, "PNG"
    ),
}
SAVE_FORMATS = {
    # id: (fmt, quality, exact?)
    "png": ("png", 95, True),
    "tiff": ("tiff", 95, True),
    "bmp": ("bmp", 95, True),
    "jpeg": ("jpeg", 95, False),
    "webp": ("webp", 90, False),
    "webp_lossless": ("webp", 100, True),
    "gif": ("gif", 95, False),
}
UNSUPPORTED = {
    ("gray_alpha", "bmp"),
    ("gray_alpha", "jpeg"),
    ("rgba", "bmp"),
    ("rgba", "jpeg"),
    ("gray16", "bmp"),
    ("gray16_alpha", "png"),
    ("gray16_alpha", "tiff"),
    ("gray16_alpha", "bmp"),
    ("gray16_alpha", "jpeg"),
}


@pytest.mark.parametrize("format_id", SAVE_FORMATS)
@pytest.mark.parametrize("kind", SAVE_KINDS)
def test_save_every_kind_in_every_format(tmp_path, kind, format_id):
    image = SAVE_KINDS[kind]()
    fmt, quality, exact = SAVE_FORMATS[format_id]
    out_dir = tmp_path / "out"
    target = out_dir / f"image.{fmt}"

    if (kind, fmt) in UNSUPPORTED:
        with pytest.raises(ImageWriteError, match="formats that can") as caught:
            save_image(target, image, image.pixels, fmt=fmt, quality=quality)
        assert caught.value.path == str(target)
        assert not out_dir.exists() or not any(out_dir.iterdir())
        return

    save_image(target, image, image.pixels, fmt=fmt, quality=quality)
    assert [p.name for p in out_dir.iterdir()] == [target.name]
    reloaded = load_image(target)

    # What the file can hold: 16-bit only in PNG/TIFF; WebP and GIF store grayscale as colour.
    want = image.pixels
    if image.max_value == 65535 and fmt not in ("png", "tiff"):
        want = ((want.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if fmt in ("webp", "gif") and image.grayscale:
        want = np.repeat(want, 3, axis=2)
    assert reloaded.pixels.dtype == want.dtype and reloaded.pixels.shape == want.shape

    if image.alpha is None:
        assert reloaded.alpha is None
        visible = np.ones((H, W), bool)
    else:
        np.testing.assert_array_equal(reloaded.alpha, image.alpha)
        visible = image.alpha > 0  # lossy encoders may change the colour under transparent pixels
    if exact:
        np.testing.assert_array_equal(reloaded.pixels, want)
    else:
        error = np.abs(reloaded.pixels.astype(int) - want.astype(int))[visible]
        assert error.mean() < 8, f"mean error {error.mean():.2f} after {fmt}"


@pytest.mark.parametrize("kind", ["rgb", "gray", "gray_alpha", "rgba", "gray16"])
@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_lossless_round_trip_of_perturbed_pixels_is_bit_exact(tmp_path, kind, fmt):
    image = SAVE_KINDS[kind]()
    noise = np.random.default_rng(3).uniform(-8 / 255, 8 / 255, image.pixels.shape).astype(np.float32)
    protected = quantize(np.clip(image.to_float() + noise, 0, 1), image.max_value)
    assert not np.array_equal(protected, image.pixels)
    target = tmp_path / f"protected.{fmt}"

    save_image(target, image, protected, fmt=fmt)
    reloaded = load_image(target)

    assert reloaded.pixels.dtype == protected.dtype
    np.testing.assert_array_equal(reloaded.pixels, protected)
    if image.alpha is not None:
        np.testing.assert_array_equal(reloaded.alpha, image.alpha)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "tiff", "webp"])
def test_icc_profile_survives(tmp_path, fmt):
    profile = _srgb_profile()
    source = _write(tmp_path / "src.png", Image.fromarray(_gradient_rgb()), icc_profile=profile)
    image = load_image(source)
    assert image.icc_profile == profile

    save_image(tmp_path / f"out.{fmt}", image, image.pixels, fmt=fmt)

    assert load_image(tmp_path / f"out.{fmt}").icc_profile == profile


def test_gray_profile_is_not_attached_to_webp_colour_data(tmp_path):
    profile = _fake_profile(b"GRAY")
    source = _write(tmp_path / "src.png", Image.fromarray(_gradient_rgb()[:, :, 0]), icc_profile=profile)
    image = load_image(source)
    assert image.icc_profile == profile

    save_image(tmp_path / "out.png", image, image.pixels, fmt="png")
    save_image(tmp_path / "out.webp", image, image.pixels, fmt="webp")

    assert load_image(tmp_path / "out.png").icc_profile == profile
    assert load_image(tmp_path / "out.webp").icc_profile is None


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp", "tiff"])
def test_no_exif_is_written(tmp_path, fmt):
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    exif[0x0112] = 1
    source = _write(tmp_path / "src.jpg", Image.fromarray(_gradient_rgb()), exif=exif.tobytes())
    image = load_image(source)
    target = tmp_path / f"out.{fmt}"

    save_image(target, image, image.pixels, fmt=fmt)

    with Image.open(target) as written:
        assert "exif" not in written.info
        tags = written.getexif()
        assert 0x010F not in tags and 0x0112 not in tags and 0x8769 not in tags  # Make, Orientation, Exif IFD
    assert b"CameraMaker" not in target.read_bytes()


# --------------------------------------------------------------------------------------------------
# Atomic writes


def test_save_creates_parents_and_leaves_no_temp_file(tmp_path):
    image = SAVE_KINDS["rgb"]()
    target = tmp_path / "a" / "b" / "c.png"

    save_image(target, image, image.pixels, fmt="png")

    assert sorted(p.name for p in target.parent.iterdir()) == ["c.png"]


def test_new_files_get_ordinary_permissions(tmp_path):
    image = SAVE_KINDS["rgb"]()
    umask = os.umask(0o022)
    os.umask(umask)

    save_image(tmp_path / "out.png", image, image.pixels, fmt="png")

    assert (tmp_path / "out.png").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failed_encode_removes_temp_file_and_keeps_old_output(tmp_path, monkeypatch, failure):
    image = SAVE_KINDS["rgb"]()
    target = tmp_path / "out.png"
    target.write_bytes(b"previous result")

    def fail(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise failure

    monkeypatch.setattr(Image.Image, "save", fail)
    expected = ImageWriteError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        save_image(target, image, image.pixels, fmt="png")

    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    assert target.read_bytes() == b"previous result"


def test_save_rejects_pixels_that_do_not_match_the_image(tmp_path):
    image = SAVE_KINDS["rgb"]()
    with pytest.raises(ValueError, match="expected uint8"):
        save_image(tmp_path / "x.png", image, image.pixels.astype(np.uint16), fmt="png")
    with pytest.raises(ValueError, match="expected uint8"):
        save_image(tmp_path / "x.png", image, image.pixels[1:], fmt="png")
    with pytest.raises(ValueError, match="unknown image format"):
        save_image(tmp_path / "x.png", image, image.pixels, fmt="keep")
    with pytest.raises(ValueError, match="quality"):
        save_image(tmp_path / "x.jpg", image, image.pixels, fmt="jpeg", quality=0)
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------
# quantize, DecodedImage, paths and formats


def test_quantize_rounds_half_to_even_and_clips():
    values = np.array([0.5, 1.5, 2.5, 254.5, -3.0, 300.0]) / 255
    np.testing.assert_array_equal(quantize(values, 255), [0, 2, 2, 254, 0, 255])
    values16 = np.array([0.5, 1.5, 65534.5, 70_000.0]) / 65535
    np.testing.assert_array_equal(quantize(values16, 65535), [0, 2, 65534, 65535])


def test_quantize_dtypes_and_inverse_of_to_float():
    assert quantize(np.zeros(3, np.float32), 255).dtype == np.uint8
    assert quantize(np.zeros(3, np.float32), 65535).dtype == np.uint16
    assert quantize(np.ones(3, np.float16), 65535).tolist() == [65535] * 3
    every8 = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    every16 = np.arange(65536, dtype=np.uint16).reshape(256, 256, 1)
    for pixels, max_value in [(every8, 255), (every16, 65535)]:
        floats = DecodedImage(pixels, None, max_value, "PNG").to_float()
        assert floats.dtype == np.float32 and floats.min() == 0 and floats.max() == 1
        np.testing.assert_array_equal(quantize(floats, max_value), pixels)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="max_value"):
        quantize(np.zeros(3), 1023)
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([0.1, np.nan]), 255)
    with pytest.raises(TypeError, match="floating-point"):
        quantize(np.zeros(3, np.uint8), 255)


def test_decoded_image_validates_its_arrays():
    with pytest.raises(ValueError, match="HxWx1 or HxWx3"):
        DecodedImage(np.zeros((4, 4, 2), np.uint8), None, 255, "PNG")
    with pytest.raises(ValueError, match="does not match max_value"):
        DecodedImage(np.zeros((4, 4, 3), np.uint16), None, 255, "PNG")
    with pytest.raises(ValueError, match="grayscale"):
        DecodedImage(np.zeros((4, 4, 3), np.uint16), None, 65535, "PNG")
    with pytest.raises(ValueError, match="alpha"):
        DecodedImage(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8), 255, "PNG")


@pytest.mark.parametrize(
    ("source", "fmt", "expected"),
    [
        ("cats/tabby.JPG", "png", "cats/tabby.png"),
        ("cats/tabby.png", "jpeg", "cats/tabby.jpg"),
        ("a/b/scan.tiff", "webp", "a/b/scan.webp"),
        ("archive.v2.gif", "png", "archive.v2.png"),
        ("cats/tabby.JPG", "keep", "cats/tabby.JPG"),
        ("x.tif", "keep", "x.tif"),
    ],
)
def test_output_path(source, fmt, expected):
    assert output_path(pathlib.PurePosixPath(source), fmt) == pathlib.PurePosixPath(expected)


@pytest.mark.parametrize(
    ("suffix", "expected"),
    [
        (".png", "png"),
        (".jpg", "jpeg"),
        (".JPEG", "jpeg"),
        (".webp", "webp"),
        (".bmp", "bmp"),
        (".tif", "tiff"),
        (".TIFF", "tiff"),
        (".gif", "gif"),
    ],
)
def test_resolve_format_keep(suffix, expected):
    assert resolve_format("keep", suffix) == expected
    assert suffix.lower() in SUPPORTED_SUFFIXES


def test_resolve_format_explicit_and_invalid():
    assert [resolve_format(f, ".gif") for f in ("png", "jpeg", "webp")] == ["png", "jpeg", "webp"]
    with pytest.raises(ValueError, match="png, jpeg, webp, keep"):
        resolve_format("jpg", ".png")
    with pytest.raises(ValueError, match="supported suffixes"):
        resolve_format("keep", ".psd")
    with pytest.raises(ValueError, match="unknown output format"):
        output_path(pathlib.PurePosixPath("a.png"), "tiff")


def test_constants():
    assert DEFAULT_MAX_PIXELS == 178_956_970
    assert LOSSY_FORMATS == {"jpeg", "webp", "gif"}
    assert SUPPORTED_SUFFIXES == {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


# --------------------------------------------------------------------------------------------------
# Property: anything savable round-trips bit-exactly through the lossless formats


@st.composite
def _decoded_images(draw) -> DecodedImage:
    height = draw(st.integers(1, 12))
    width = draw(st.integers(1, 12))
    sixteen_bit = draw(st.booleans())
    channels = 1 if sixteen_bit else draw(st.sampled_from([1, 3]))
    dtype = np.uint16 if sixteen_bit else np.uint8
    pixels = draw(arrays(dtype, (height, width, channels)))
    alpha = None if sixteen_bit or not draw(st.booleans()) else draw(arrays(np.uint8, (height, width)))
    return DecodedImage(pixels, alpha, 65535 if sixteen_bit else 255, "PNG")


@settings(max_examples=60, deadline=None)
@given(image=_decoded_images(), fmt=st.sampled_from(["png", "tiff"]))
def test_lossless_save_then_load_is_identity(image, fmt):
    with tempfile.TemporaryDirectory() as directory:
        target = pathlib.Path(directory) / f"image.{fmt}"
        save_image(target, image, image.pixels, fmt=fmt)
        reloaded = load_image(target)

    assert reloaded.pixels.dtype == image.pixels.dtype
    np.testing.assert_array_equal(reloaded.pixels, image.pixels)
    if image.alpha is None:
        assert reloaded.alpha is None
    else:
        np.testing.assert_array_equal(reloaded.alpha, image.alpha)


def _write_png_16bit_colour(path, rgb: np.ndarray) -> None:
    """A 48-bit RGB PNG (Pillow cannot write one): signature, IHDR, one zlib IDAT of unfiltered rows, IEND."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16 bits per channel, colour type 2 (RGB)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_sixteen_bit_colour_is_refused_not_truncated(tmp_path):
    """Pillow would read only the high byte (1001/65535 as 3/255, off by up to 1/255), so the budget could
    not be guaranteed against the original: the file is refused with a reason, not silently truncated."""
    rgb = (np.arange(6 * 5 * 3).reshape(6, 5, 3) * 1000 + 1).astype(np.uint16)
    path = tmp_path / "deep.png"
    _write_png_16bit_colour(path, rgb)
    with Image.open(path) as img:  # the fixture really is a 16-bit colour PNG that Pillow truncates
        assert img.mode == "RGB" and np.asarray(img)[0, 0, 1] == 1001 >> 8
    with pytest.raises(ImageReadError, match="16-bit colour is not supported.*convert it to 8-bit colour"):
        load_image(path)


@pytest.mark.parametrize("channels, saved_channels, sixteen", [(3, 3, False), (1, 3, False), (3, 1, False), (1, 1, True)])
def test_change_statistics_by_blocks_of_rows_equal_the_full_float64_ones(monkeypatch, channels, saved_channels, sixteen):
    """protect's per-file statistics no longer hold float64 copies of the whole photo (24 bytes a value):
    computed a block of rows at a time they give the same recorded numbers."""
    import math
    import sys

    import ueguard.sdk.protect  # noqa: F401  (the package exports the function under the module's name)
    from ueguard.data.images import DecodedImage

    protect = sys.modules["ueguard.sdk.protect"]
    rng = np.random.default_rng(channels + 3 * saved_channels)
    h, w = 97, 61
    if sixteen:
        original = DecodedImage(rng.integers(0, 65536, (h, w, 1), dtype=np.uint16), None, 65535, "PNG")
        levels = original.pixels.astype(np.int64) // 257
    else:
        original = DecodedImage(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), None, 255, "PNG")
        levels = original.pixels.astype(np.int64)
    base = np.broadcast_to(levels[:, :, :1], (h, w, saved_channels)) if saved_channels != levels.shape[2] else levels
    change = rng.integers(-4, 5, (h, w, saved_channels)) * (rng.random((h, w, 1)) < 0.3)
    saved = DecodedImage(np.clip(base + change, 0, 255).astype(np.uint8), None, 255, "PNG")
    diff = np.abs(original.to_float().astype(np.float64) - saved.to_float().astype(np.float64))
    mse = float(np.mean(diff**2))
    expected = {"linf": round(float(diff.max()) * 255, 4), "psnr": round(10 * math.log10(1.0 / mse), 3),
                "l2": round(float(np.sqrt(np.sum(diff**2))), 6), "rms": round(math.sqrt(mse) * 255, 4),
                "l0": int(np.count_nonzero(diff.max(axis=2) > 0))}
    for block in (1 << 20, 500, 7):
        monkeypatch.setattr(protect, "QUALITY_BLOCK_VALUES", block)
        assert protect._quality(original, saved) == expected


def test_png_text_over_pillows_memory_limit_is_not_called_a_corrupt_header(tmp_path, monkeypatch):
    """Pillow refuses PNG text over 64 MB in all (MAX_TEXT_MEMORY); lowered here so the file stays small."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "x" * 5000)
    Image.fromarray(_gradient_rgb()).save(tmp_path / "text.png", pnginfo=info)
    monkeypatch.setattr(PngImagePlugin, "MAX_TEXT_MEMORY", 1000)
    with pytest.raises(ImageReadError, match="text metadata .* takes over the 64 MB Pillow reads safely") as error:
        load_image(tmp_path / "text.png")
    assert "corrupt" not in str(error.value) and "text.png" in str(error.value)
