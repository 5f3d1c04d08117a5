"""Memory scaling of ``protect`` (issue 6, benchmark 3) and the choice of the perturbation store's encoding.

Two parts, one command:

1. **Encoding** (in-process, seconds): real sample-wise δ — EMN (L∞ 8/255, a short quick-budget run on
   synthetic 32-px images) and AR (L2, model-free) — stored in each encoding of
   :mod:`ueguard.data.store`; per encoding: bytes per value, the largest storage error (in 1/255
   levels), and what reaches the saved 8-bit file: the fraction of output values that differ from the
   float32 result and by how many levels, at the working size (32 px) and after protect's bilinear
   resize to a 48-px original.
2. **Scaling**: the whole ``python -m ueguard protect`` on folders of 1k, 10k and 100k synthetic 32-px
   PNGs (10 class folders), each size in a fresh child process whose peak RSS (``ru_maxrss`` from
   ``os.wait4``) is its own, once with ``--store memory`` (δ as one float32 tensor, the baseline) and
   once with ``--store disk`` (the memory-mapped store). The method is **AR** (autoregressive
   perturbations: model-free and sample-wise, so the run costs data structures and I/O, not training;
   ``--size 32 -o batch_size=2048``); the ratio peak(100k) ÷ peak(10k) has the target ≤ 1.5. ``--quick`` uses 1k / 5k / 20k
   files and reports peak(20k) ÷ peak(5k) instead. As in ``bench/walk.py`` the children replace
   ``os.fsync`` by a no-op (durability is tested in tests/; on a shared disk fsync would dominate the
   time) and run with ``OMP_NUM_THREADS=1``.

``--loaders memory torch`` adds, per store, a child with ``--loader torch``: the working set is decoded by a
DataLoader into a memory-mapped ``.npy`` in the state folder (the spilled set a streaming loader gives)
instead of a tensor in RAM; its columns are named ``<store>+torch``. (``wait4``'s ``ru_maxrss`` is the largest
of the child and the DataLoader workers it reaped, not their sum.)

What still grows with N, by design: the working set (N×3×32×32 uint8, 3 KiB per image), the folder
listing and the sample ids (a few hundred bytes per file). δ (12 KiB per image as float32) lives on
disk with ``--store disk``; per-file manifest records are streamed to the manifest, not kept.

    python bench/memory.py --quick --json bench/results/memory-cpu-quick.json
    python bench/memory.py --json bench/results/memory-cpu.json          # 1k / 10k / 100k (about an hour here)
    python bench/memory.py --sizes 1000 10000 --stores disk             # a subset
    python bench/memory.py --sizes 10000 100000 --stores disk --loaders memory torch --no-encodings  # spilled set
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _children import CLASSES, REPO, environment, make_tree, run_child  # noqa: E402

sys.path.insert(0, str(REPO))  # this checkout's ueguard, also in-process (the children get PYTHONPATH)
SIDE = 32


def child_protect(argv: list[str]) -> None:
    """``ueguard protect ARGV`` in this process, with fsync stubbed (see the module docstring)."""
    os.fsync = lambda fd: None
    from ueguard.cli import main as cli_main

    cli_main(["protect", *argv], standalone_mode=True)


def configurations(stores: list[str], loaders: list[str]) -> list[tuple[str, str, str]]:
    """(column name, --store, --loader) for every store × loader; the ``memory`` loader's columns keep the
    store's bare name (``disk``), a streaming loader's add it (``disk+torch``)."""
    return [(store if loader == "memory" else f"{store}+{loader}", store, loader)
            for loader in loaders for store in stores]


def scaling(sizes: list[int], stores: list[str], work: Path, threads: int, partial: Path | None = None,
            loaders: tuple[str, ...] = ("memory",)) -> list[dict]:
    """Peak RSS per size and store × loader; with ``partial``, the rows so far are written there after each size."""
    rows = []
    for n in sizes:
        tree = work / f"tree_{n}"
        started = time.perf_counter()
        make_tree(tree, n, SIDE, compress_level=1)
        print(f"[memory] {n} files ready ({time.perf_counter() - started:.0f} s)", flush=True)
        row: dict = {"files": n, "working_set_mib": round(n * 3 * SIDE * SIDE / 2**20, 1),
                     "delta_float32_mib": round(n * 3 * SIDE * SIDE * 4 / 2**20, 1)}
        for name, store, loader in configurations(stores, list(loaders)):
            out = work / f"out_{n}_{store}_{loader}"
            shutil.rmtree(out, ignore_errors=True)
            _, rss, seconds = run_child([sys.executable, str(Path(__file__).resolve()), "--child", str(tree),
                                         "--out", str(out), "--method", "ar", "--size", str(SIDE), "-o", "batch_size=2048",
                                         "--store", store, "--loader", loader, "--device", "cpu", "-q"], threads)
            row[f"{name}_peak_rss_mib"], row[f"{name}_seconds"] = round(rss, 1), round(seconds, 1)
            print(f"[memory] {n:>7} files --store {store:<6} --loader {loader:<6}: peak RSS {rss:8.1f} MiB, "
                  f"{seconds:6.1f} s", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        rows.append(row)
        if partial is not None:
            partial.write_text(json.dumps({"partial": True, "rows": rows}, indent=2) + "\n")
    return rows


def encodings(n: int = 256) -> dict:
    """Storage error and its effect on saved 8-bit values, per encoding (see the module docstring)."""
    import numpy as np
    import torch

    from ueguard.data.store import ENCODINGS, dequantize, quantize
    from ueguard.data.working_set import WorkingSet, resize_float
    from ueguard.engine.runtime import Runtime
    from ueguard.methods import create_method
    from ueguard.models import create_model

    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, (n, 3, SIDE, SIDE), dtype=np.uint8))
    labels = torch.arange(n) % CLASSES
    working = WorkingSet(images, labels, torch.zeros(n, dtype=torch.bool), tuple(map(str, range(CLASSES))),
                         [str(i) for i in range(n)])
    runtime = Runtime.create("cpu", "fp32")
    torch.manual_seed(0)
    emn = create_method("emn", budget="quick", runtime=runtime, max_rounds=1, train_steps=2,
                        surrogate=create_model("resnet18_cifar_slim", CLASSES))
    sources = {"emn_linf_8": emn(working).delta, "ar_l2": create_method("ar", runtime=runtime)(working).delta}
    big = torch.from_numpy(rng.integers(0, 256, (n, 3, 48, 48), dtype=np.uint8))
    out: dict = {}
    for name, delta in sources.items():
        delta = delta.float().cpu()
        reference = {"32px": _saved(images, delta), "48px": _saved(big, resize_float(delta, (48, 48)))}
        for encoding, (dtype, _, _) in ENCODINGS.items():
            stored = dequantize(quantize(delta, encoding), encoding)
            entry = {"bytes_per_value": np.dtype(dtype).itemsize,
                     "max_error_levels": round(float((stored - delta).abs().max()) * 255, 6)}
            for size, ref in reference.items():
                got = _saved(images, stored) if size == "32px" else _saved(big, resize_float(stored, (48, 48)))
                diff = (got - ref).abs()
                entry[f"differing_values_{size}"] = round(float((diff > 0).float().mean()), 6)
                entry[f"max_level_diff_{size}"] = int(diff.max())
            out.setdefault(name, {})[encoding] = entry
    return out


def _saved(images, delta):
    """The 8-bit values protect writes: round(255·clip(x + δ, 0, 1))."""
    import torch

    return torch.round((images.float() / 255 + delta).clamp(0, 1) * 255).to(torch.int16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k / 5k / 20k files instead of 1k / 10k / 100k")
    parser.add_argument("--sizes", type=int, nargs="+", help="folder sizes (overrides --quick)")
    parser.add_argument("--stores", nargs="+", default=["memory", "disk"], choices=["memory", "disk", "auto"])
    parser.add_argument("--loaders", nargs="+", default=["memory"], choices=["memory", "torch", "ffcv"],
                        help="--loader of the children (default memory; torch/ffcv spill the working set to disk)")
    parser.add_argument("--no-encodings", dest="encodings", action="store_false", help="skip part 1")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the children (default 1)")
    parser.add_argument("--workdir", type=Path, help="where the trees go (default: a temporary folder; reused if given)")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_protect(args.child)
        return

    sizes = sorted(args.sizes or ([1000, 5000, 20000] if args.quick else [1000, 10000, 100000]))
    record: dict = {"bench": "memory", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
                    "quick": args.quick, "method": "ar (model-free, sample-wise), --size 32", "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="ueguard-memory-") as tmp:
        work = args.workdir or Path(tmp)
        rows = scaling(sizes, args.stores, work, args.threads, args.json, tuple(args.loaders))
    columns = [name for name, _, _ in configurations(args.stores, args.loaders)]
    base, top = (rows[-2], rows[-1]) if len(rows) > 1 else (rows[0], rows[0])
    print(f"{'files':>7}" + "".join(f" {s + ' RSS MiB':>18} {'s':>7}" for s in columns))
    for row in rows:
        print(f"{row['files']:>7}" + "".join(f" {row[f'{s}_peak_rss_mib']:>18.1f} {row[f'{s}_seconds']:>7.1f}"
                                              for s in columns))
    for row in rows[1:]:  # growth per extra file against the smallest size, per store × loader column
        for s in columns:
            row[f"{s}_bytes_per_extra_file"] = round((row[f"{s}_peak_rss_mib"] - rows[0][f"{s}_peak_rss_mib"]) * 2**20
                                                     / (row["files"] - rows[0]["files"]))
            print(f"{row['files']:>7} files, {s}: {row[f'{s}_bytes_per_extra_file']} B of peak RSS per extra file "
                  f"(working set alone: {3 * SIDE * SIDE} B, float32 δ: {12 * SIDE * SIDE} B)")
    ratios = {s: round(top[f"{s}_peak_rss_mib"] / base[f"{s}_peak_rss_mib"], 3) for s in columns}
    for s, ratio in ratios.items():
        print(f"peak({top['files']}) / peak({base['files']}) with {s}: {ratio:.3f} (target ≤ 1.5)")
    record.update(rows=rows, loaders=args.loaders, ratio_files=[base["files"], top["files"]], peak_ratio=ratios,
                  environment=environment())
    # Part 1 after part 2: a child's ru_maxrss includes its parent's resident size at fork (Linux copies the
    # pre-exec high-water mark), so the parent must not hold torch and a model while the children run.
    if args.encodings:
        record["encodings"] = encodings()
        sys.stdout.flush()
        print(f"{'δ':<12} {'encoding':<8} {'B/value':>7} {'max err (levels)':>17} {'differ@32px':>12} "
              f"{'max':>4} {'differ@48px':>12} {'max':>4}")
        for name, per in record["encodings"].items():
            for encoding, e in per.items():
                print(f"{name:<12} {encoding:<8} {e['bytes_per_value']:>7} {e['max_error_levels']:>17.5f} "
                      f"{e['differing_values_32px']:>12.5f} {e['max_level_diff_32px']:>4} "
                      f"{e['differing_values_48px']:>12.5f} {e['max_level_diff_48px']:>4}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
