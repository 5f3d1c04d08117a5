"""Small, real image trees for end-to-end tests: every input format and mode protect must handle.

Images carry real structure (class-dependent shapes and colours drawn with Pillow on noise) so a
surrogate has something to learn, and odd sizes so resizing paths are exercised.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

EPS_LEVELS = 8  # ε = 8/255 in the tests


def _picture(rng: np.random.Generator, label: int, width: int, height: int) -> Image.Image:
    """An RGB picture whose content depends on the class: a coloured ellipse or rectangle on noise."""
    base = rng.integers(40, 200, size=(height, width, 3), dtype=np.uint8)
    img = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(img)
    colour = [(230, 40, 40), (40, 40, 230), (40, 200, 40), (220, 220, 30)][label % 4]
    box = (width // 5, height // 5, 4 * width // 5, 4 * height // 5)
    (draw.ellipse if label % 2 == 0 else draw.rectangle)(box, fill=colour)
    return img


def write_mixed_tree(root: Path, seed: int = 0) -> dict[str, str]:
    """Write ``root/cat`` and ``root/dog/nested/deeper`` with every supported format and mode, one corrupt
    image, one non-image file and a file outside the class folders. Returns {relative path: what it is}."""
    rng = np.random.default_rng(seed)
    made: dict[str, str] = {}

    def save(rel: str, img: Image.Image, kind: str, **kw) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, **kw)
        made[rel] = kind

    for label, cls in enumerate(("cat", "dog")):
        sub = cls if cls == "cat" else "dog/nested/deeper"
        pic = lambda w=33, h=31: _picture(rng, label, w, h)  # noqa: E731
        save(f"{sub}/rgb.png", pic(), "RGB png")
        save(f"{sub}/photo.jpg", pic(40, 30), "RGB jpeg", quality=95)
        save(f"{sub}/lossless.webp", pic(), "RGB webp", lossless=True)
        save(f"{sub}/plain.bmp", pic(), "RGB bmp")
        save(f"{sub}/gray.png", pic().convert("L"), "L png")
        save(f"{sub}/alpha.png", _with_alpha(pic(), "RGBA"), "RGBA png")
        save(f"{sub}/gray_alpha.png", _with_alpha(pic().convert("L"), "LA"), "LA png")
        save(f"{sub}/palette.png", pic().convert("P", palette=Image.ADAPTIVE, colors=64), "P png")
        wide = np.asarray(pic(24, 20).convert("L"), dtype=np.uint16) * 257 + rng.integers(0, 200, (20, 24)).astype(np.uint16)
        save(f"{sub}/sixteen.tiff", Image.fromarray(wide), "16-bit gray tiff")
        frames = [pic(20, 18).convert("P"), pic(20, 18).convert("P")]
        path = root / f"{sub}/anim.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:])
        made[f"{sub}/anim.gif"] = "animated gif"
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90° clockwise on display
        save(f"{sub}/rotated.jpg", pic(36, 24), "EXIF-rotated jpeg", exif=exif.tobytes(), quality=95)
        for i in range(6):  # a few more plain images so each class has enough samples
            save(f"{sub}/extra_{i}.png", pic(32, 32), "RGB png")

    (root / "cat" / "broken.png").write_bytes(_png_bytes(_picture(rng, 0, 32, 32))[:200])
    made["cat/broken.png"] = "corrupt"
    (root / "dog" / "notes.txt").write_text("not an image\n")
    made["dog/notes.txt"] = "non-image"
    return made


def _with_alpha(img: Image.Image, mode: str) -> Image.Image:
    out = img.convert(mode)
    alpha = Image.linear_gradient("L").resize(img.size)
    out.putalpha(alpha)
    return out


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_class_tree(root: Path, n_per_class: int = 12, classes: int = 3, size: int = 24, seed: int = 0) -> None:
    """A plain labelled tree of RGB PNGs (for verify and resume tests)."""
    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            _picture(rng, label, size, size).save(folder / f"img_{i:03d}.png")
