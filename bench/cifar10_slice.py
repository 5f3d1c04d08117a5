"""A small, class-balanced slice of real CIFAR-10 kept inside the checkout (``bench/data/cifar10-slice.npz``),
for benchmarks that run where the shared data set is not (a GPU machine that receives only the checkout).

    python bench/cifar10_slice.py [--data /work/shared/data/cifar10] [--train-per-class 500] [--test-per-class 100]
                                  [--out bench/data/cifar10-slice.npz]

The slice is the first ``train_per_class`` training images of each class in the official order (data_batch_1
… data_batch_5, concatenated) and the first ``test_per_class`` images of each class of test_batch — no random
choice, so the same batches always give the same arrays. Written as a zip of ``.npy`` members with deflate and a
fixed time stamp, so the file is byte-for-byte reproducible too (``numpy.savez_compressed`` stamps the current time).

Keys: ``train_x`` (N×32×32×3 uint8, HWC), ``train_y`` (N int64), ``test_x``, ``test_y`` (the same for the test
images), ``train_index`` / ``test_index`` (int64 row of each image in the official 50,000 / 10,000 order) and
``classes`` (the ten class names). Rows are in official order (so classes are interleaved). Load with
``numpy.load(path)``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "data" / "cifar10-slice.npz"
DEFAULT_DATA = Path(os.environ.get("UEGUARD_SHARED_DATA", "/work/shared/data")) / "cifar10"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
KEYS = ("train_x", "train_y", "test_x", "test_y", "train_index", "test_index", "classes")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(batch[b"labels"], dtype=np.int64)


def _read_split(folder: Path, names) -> tuple[np.ndarray, np.ndarray]:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise SystemExit(f"{folder}: missing CIFAR-10 batch file(s) {', '.join(missing)}")
    parts = [_read_batch(folder / n) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def first_per_class(labels: np.ndarray, per_class: int, classes: int = 10) -> np.ndarray:
    """Indices of the first ``per_class`` images of each class, in their original order."""
    picked = []
    for c in range(classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise SystemExit(f"class {c} has {len(members)} images, fewer than the {per_class} asked for")
        picked.append(members[:per_class])
    return np.sort(np.concatenate(picked))


def build(data: Path = DEFAULT_DATA, train_per_class: int = 500, test_per_class: int = 100) -> dict[str, np.ndarray]:
    """The slice's arrays from the CIFAR-10 python batches under ``data`` (``data/cifar-10-batches-py`` or
    ``data`` itself)."""
    folder = data / "cifar-10-batches-py" if (data / "cifar-10-batches-py").is_dir() else data
    train_x, train_y = _read_split(folder, TRAIN_BATCHES)
    test_x, test_y = _read_split(folder, (TEST_BATCH,))
    tr, te = first_per_class(train_y, train_per_class), first_per_class(test_y, test_per_class)
    return {"train_x": train_x[tr], "train_y": train_y[tr], "test_x": test_x[te], "test_y": test_y[te],
            "train_index": tr.astype(np.int64), "test_index": te.astype(np.int64), "classes": np.array(CLASSES)}


def save(arrays: dict[str, np.ndarray], path: Path) -> None:
    """``arrays`` as an ``.npz`` that ``numpy.load`` reads, byte-for-byte the same for the same arrays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key, value in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asanyarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buffer.getvalue(), compresslevel=9)
    os.replace(tmp, path)


def load(path: Path = DEFAULT_OUT) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def tiny(arrays: dict[str, np.ndarray], train: int, test: int) -> dict[str, np.ndarray]:
    """The first ``train`` / ``test`` rows of a slice (a dry run's few dozen images)."""
    return {"train_x": arrays["train_x"][:train], "train_y": arrays["train_y"][:train],
            "test_x": arrays["test_x"][:test], "test_y": arrays["test_y"][:test],
            "train_index": arrays["train_index"][:train], "test_index": arrays["test_index"][:test],
            "classes": arrays["classes"]}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder with cifar-10-batches-py/ (default: $UEGUARD_SHARED_DATA/cifar10 or /work/shared/data/cifar10)")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    arrays = build(args.data, args.train_per_class, args.test_per_class)
    save(arrays, args.out)
    print(f"wrote {args.out}: {len(arrays['train_y'])} train + {len(arrays['test_y'])} test images, "
          f"{args.out.stat().st_size:,} bytes, sha256 {sha256(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
