"""Loading throughput: FFCV against a torch DataLoader with Pillow decoding, on a folder of JPEGs.

Both loaders yield the same thing — uint8 ``N×3×S×S`` batches at the working resolution S, labels —
through ueguard's own loaders (:mod:`ueguard.data.loaders`):

* ``torch``: ``DataLoader`` over :class:`ueguard.data.loaders.FolderImages` — Pillow decodes each JPEG
  and resizes it to S (antialiased bilinear), in ``--workers`` worker processes, every epoch.
* ``ffcv``: the folder converted once into ueguard's FFCV cache (raw pixels at S), then read by FFCV's
  compiled loader with ``--workers`` threads. The one-time conversion is timed separately.

Images/s is one full pass (an epoch) in random order; one untimed warm-up pass first (FFCV compiles
its pipeline then, the DataLoader starts its workers), then the median of ``--repeat`` passes. The
ratio ``speedup`` = FFCV images/s ÷ torch images/s, measured in the same run.

Data: ``synthetic`` — generated 256×256 JPEGs (quality 90, class-dependent shapes on noise), read at
224 px (the ImageNet-like case, decoding-bound); ``cifar10`` — the first N CIFAR-10 training images from
/work/shared/data/cifar10 (shared data; skipped when absent) saved as 32×32 JPEGs, read at 32 px.

    PYTHONPATH=. python bench/loading.py --quick --json bench/results/loading-cpu.json
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import command_line, write_json  # noqa: E402

from ueguard.data import loaders  # noqa: E402
from ueguard.data.folder import scan_folder  # noqa: E402

CIFAR = Path("/work/shared/data/cifar10/cifar-10-batches-py")


def write_synthetic(root: Path, n: int, side: int = 256, classes: int = 10, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = i % classes
        img = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        box = sorted(rng.integers(0, side, 2)), sorted(rng.integers(0, side, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if label % 2 else draw.rectangle)((box[0][0], box[1][0], box[0][1] + 1, box[1][1] + 1), fill=colour)
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
        img.save(root / f"c{label}" / f"{i:06d}.jpg", quality=90)


def write_cifar(root: Path, n: int) -> bool:
    if not (CIFAR / "data_batch_1").exists():
        return False
    with open(CIFAR / "data_batch_1", "rb") as fh:
        batch = pickle.load(fh, encoding="bytes")
    pixels = batch[b"data"][:n].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    for i, (image, label) in enumerate(zip(pixels, batch[b"labels"][:n])):
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / f"c{label}" / f"{i:06d}.jpg", quality=90)
    return True


def torch_epoch(dataset, batch_size: int, workers: int, seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    count = 0
    for x, y, _, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen,
                                                  num_workers=workers, collate_fn=loaders._stack,
                                                  persistent_workers=False):
        count += len(y)
    return count


def ffcv_epoch(loader) -> int:
    count = 0
    for x, y, _, _ in loaders._ffcv_pass(loader):
        count += len(y)
    return count


def timed_passes(run, repeat: int) -> list[float]:
    run()  # warm-up
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        out.append(time.perf_counter() - start)
    return out


def bench_case(name: str, root: Path, size: int, n: int, args) -> dict:
    listing = scan_folder(root)
    entries = listing.images
    dataset = loaders.FolderImages(listing, entries, size)
    torch_times = timed_passes(lambda: torch_epoch(dataset, args.batch_size, args.workers, 0), args.repeat)
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        cache = loaders.ffcv_cache(listing, entries, size, cache_dir=cache_dir, workers=args.workers)
        convert_s = time.perf_counter() - start
        loader = loaders.ffcv_loader(cache, args.batch_size, shuffle_seed=0, workers=args.workers)
        ffcv_times = timed_passes(lambda: ffcv_epoch(loader), args.repeat)
        cache_mb = cache.path.stat().st_size / 2**20
    torch_ips, ffcv_ips = n / statistics.median(torch_times), n / statistics.median(ffcv_times)
    return {"case": name, "images": n, "working_size": size, "batch_size": args.batch_size, "workers": args.workers,
            "torch_images_per_s": round(torch_ips, 1), "ffcv_images_per_s": round(ffcv_ips, 1),
            "speedup": round(ffcv_ips / torch_ips, 2),
            "torch_epoch_s": [round(t, 3) for t in torch_times], "ffcv_epoch_s": [round(t, 3) for t in ffcv_times],
            "ffcv_convert_s": round(convert_s, 2), "ffcv_convert_images_per_s": round(n / convert_s, 1),
            "ffcv_cache_mib": round(cache_mb, 1), "repeat": args.repeat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and passes")
    parser.add_argument("--json", help="write the records to this file")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes / FFCV threads")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--cases", default="synthetic224,cifar32")
    args = parser.parse_args()
    if not loaders.ffcv_available():
        sys.exit(f"bench/loading.py: {loaders.FFCV_INSTALL_HINT}")
    args.repeat = args.repeat or (3 if args.quick else 5)
    n_synth, n_cifar = (512, 2048) if args.quick else (4096, 10000)
    torch.set_num_threads(max(1, args.workers))
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            root = Path(tmp) / case
            if case == "synthetic224":
                write_synthetic(root, n_synth)
                records.append(bench_case(case, root, 224, n_synth, args))
            elif case == "cifar32":
                if not write_cifar(root, n_cifar):
                    print(f"skipped {case}: {CIFAR} not found", file=sys.stderr)
                    continue
                rec = bench_case(case, root, 32, n_cifar, args)
                rec["data"] = "CIFAR-10 training images (shared data, /work/shared/data/cifar10) as quality-90 JPEGs"
                records.append(rec)
            else:
                sys.exit(f"unknown case {case!r}; choose from synthetic224, cifar32")
            r = records[-1]
            print(f"{r['case']:<13} n={r['images']:<6} S={r['working_size']:<4} torch {r['torch_images_per_s']:>9.1f} img/s  "
                  f"ffcv {r['ffcv_images_per_s']:>9.1f} img/s  speedup {r['speedup']:.2f}x  "
                  f"(one-time conversion {r['ffcv_convert_s']:.1f} s, {r['ffcv_cache_mib']:.1f} MiB)", flush=True)
    if args.json:
        write_json(args.json, records, command_line(__file__, prefix="PYTHONPATH=. "))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
