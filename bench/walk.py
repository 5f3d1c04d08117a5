"""Memory of ``protect``'s data path against the number of files: does it grow with the folder?

Two measurements per folder size, each in a fresh child process so its peak RSS is its own
(``os.wait4`` returns the child's rusage):

* ``path`` — the per-file data path exactly as ``protect`` runs it, minus generation: walk
  (``scan_folder``), plan outputs, then for every file ``_save_one`` (decode the original, apply δ at native
  size, save atomically, decode the output, hash both) and one manifest line, keeping only counters.
  δ is a fixed class-wise tensor, so nothing per sample is held; tracemalloc's peak is recorded too
  (Python allocations only, run separately from the RSS/time run because tracing slows it down).
* ``e2e`` — the whole ``python -m ueguard protect`` at the smallest settings (8 px working size, one
  round of one PGD step, slim surrogate). This also holds what is inherently per-sample: the working set
  (N×3×8×8 uint8), sample-wise δ (N×3×8×8 float32) and the per-file records ``ProtectResult.items``
  returns.

In both children ``os.fsync`` is replaced by a no-op: this benchmark measures memory, which fsync does
not use, and on a shared disk its latency (10–150 ms per call here) would make 20,000 files take hours.
The crash tests (tests/test_crash_safety.py) cover durability. The children run with ``OMP_NUM_THREADS=1``
(``--threads``) so that a busy machine does not distort the timings with oversubscribed threads.

The baseline is the smallest size measured in the same run; the script prints each size's peak RSS,
its ratio to the baseline and the growth per file in bytes. Results are appended to
``bench/results/walk.jsonl``.

    python bench/walk.py --quick                      # 200 and 2,000 files
    python bench/walk.py --json walk.json             # 2,000 and 20,000 files
    python bench/walk.py --sizes 2000 20000 --no-e2e  # data path only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _children import CLASSES, REPO, environment, make_tree, run_child  # noqa: E402

RESULTS = REPO / "bench" / "results" / "walk.jsonl"
SIDE = 12  # px: small files, so the measurement is about the file count, not pixels


def child_e2e(argv: list[str]) -> None:
    """``ueguard protect ARGV`` in this process (so that ``os.fsync`` can be stubbed, see above)."""
    from ueguard.cli import main as cli_main

    cli_main(["protect", *argv], standalone_mode=True)


def child_path(tree: Path, out: Path, trace: bool) -> dict:
    """The per-file data path of ``protect`` over ``tree`` (run in a child; see the module docstring)."""
    import tracemalloc

    if trace:
        tracemalloc.start()
    import torch

    from ueguard.data.folder import scan_folder
    from ueguard.data.manifest import MANIFEST_NAME, ManifestWriter
    from ueguard.data.working_set import WorkingSet
    from ueguard.methods import Perturbation
    from ueguard.sdk.options import ProtectOptions
    from ueguard.sdk.protect import _plan_outputs, _save_one

    started = time.perf_counter()
    opts = ProtectOptions.resolve(format="png")
    listing = scan_folder(tree)
    planned, _ = _plan_outputs(listing, opts.format)
    eps = 8 / 255
    delta = (torch.rand(CLASSES, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1) * eps
    perturbation = Perturbation(delta, classwise=True, eps=eps)
    ok = 0
    out.mkdir(parents=True, exist_ok=True)
    with ManifestWriter(out / MANIFEST_NAME) as manifest:
        for entry in listing.images:
            # A one-sample working set per file: class-wise δ needs only this file's label.
            working = WorkingSet(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.tensor([entry.label]),
                                 torch.tensor([False]), listing.classes, [str(entry.relpath)])
            status, error, extra = _save_one(listing, out, entry, planned[entry.relpath], working,
                                             perturbation, 0, opts)
            manifest.write({"kind": "file", "source": str(entry.relpath), "status": status, "error": error, **extra})
            ok += status == "ok"
    result = {"files": len(listing.images), "ok": ok, "seconds": round(time.perf_counter() - started, 2)}
    if trace:
        result["tracemalloc_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 2)
    return result


def measure(n: int, work: Path, path: bool, e2e: bool, store: str, threads: int) -> dict:
    tree = work / f"tree_{n}"
    if not tree.is_dir():
        make_tree(tree, n, SIDE)
    row: dict = {"files": n}
    me = [sys.executable, str(Path(__file__).resolve())]
    for trace in (False, True) if path else ():
        out = work / f"path_out_{n}_{int(trace)}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        payload, rss, _ = run_child([*me, "--child-path", str(tree), str(out), *(["--trace"] if trace else [])], threads)
        assert payload["ok"] == n, payload
        if trace:
            row["path_tracemalloc_peak_mb"] = payload["tracemalloc_peak_mb"]
        else:
            row["path_peak_rss_mb"], row["path_seconds"] = round(rss, 1), payload["seconds"]
    if e2e:
        out = work / f"e2e_out_{n}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        _, rss, seconds = run_child([*me, "--child-e2e", str(tree), "--out", str(out),
                                     "--budget", "quick", "--size", "8", "--device", "cpu",
                                     "--surrogate", "resnet18_cifar_slim", "-o", "max_rounds=1",
                                     "-o", "pgd_steps=1", "-o", "train_steps=1", "--store", store, "-q"], threads)
        with open(out / "ueguard-manifest.jsonl", encoding="utf-8") as manifest:
            ok = sum(1 for line in manifest if '"status": "ok"' in line)
        assert ok == n, f"e2e protected {ok} of {n} files; see {out}"
        row["e2e_peak_rss_mb"], row["e2e_seconds"] = round(rss, 1), round(seconds, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 and 2,000 files")
    parser.add_argument("--sizes", type=int, nargs="+", help="folder sizes (default 2000 20000)")
    parser.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the end-to-end protect run")
    parser.add_argument("--no-path", dest="path", action="store_false", help="skip the data-path-only runs")
    parser.add_argument("--store", choices=("auto", "memory", "disk"), default="disk",
                        help="protect's --store in the e2e run (default disk: δ memory-mapped, not held)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS for the children (default 1: steady on a shared machine)")
    parser.add_argument("--workdir", type=Path, help="where the trees go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--child-path", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-e2e", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_path or args.child_e2e:
        os.fsync = lambda fd: None  # memory, not durability, is measured here (module docstring)
    if args.child_e2e:
        child_e2e(args.child_e2e)
        return
    if args.child_path:
        print(json.dumps(child_path(*args.child_path, trace=args.trace)))
        return

    sizes = args.sizes or ([200, 2000] if args.quick else [2000, 20000])
    with tempfile.TemporaryDirectory(prefix="ueguard-walk-") as tmp:
        work = args.workdir or Path(tmp)
        rows = [measure(n, work, args.path, args.e2e, args.store, args.threads) for n in sorted(sizes)]
    base = rows[0]
    head = [("files", 7)]
    if args.path:
        head += [("path RSS MiB", 13), ("ratio", 6), ("B/file", 7), ("tracemalloc MiB", 16), ("s", 6)]
    if args.e2e:
        head += [("e2e RSS MiB", 12), ("ratio", 6), ("B/file", 7), ("s", 6)]
    print(" ".join(f"{name:>{width}}" for name, width in head))
    for row in rows:
        extra_files = row["files"] - base["files"]
        per_file = lambda key: round((row[key] - base[key]) * 2**20 / extra_files) if extra_files else 0  # noqa: E731
        line = f"{row['files']:>7}"
        if args.path:
            row["path_rss_ratio"] = round(row["path_peak_rss_mb"] / base["path_peak_rss_mb"], 3)
            row["path_bytes_per_extra_file"] = per_file("path_peak_rss_mb")
            line += (f" {row['path_peak_rss_mb']:>13.1f} {row['path_rss_ratio']:>6.3f} "
                     f"{row['path_bytes_per_extra_file']:>7} {row['path_tracemalloc_peak_mb']:>16.2f} {row['path_seconds']:>6.1f}")
        if args.e2e:
            row["e2e_rss_ratio"] = round(row["e2e_peak_rss_mb"] / base["e2e_peak_rss_mb"], 3)
            row["e2e_bytes_per_extra_file"] = per_file("e2e_peak_rss_mb")
            line += (f" {row['e2e_peak_rss_mb']:>12.1f} {row['e2e_rss_ratio']:>6.3f} "
                     f"{row['e2e_bytes_per_extra_file']:>7} {row['e2e_seconds']:>6.1f}")
        print(line)
    record = {"bench": "walk", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
              "quick": args.quick, "threads": args.threads, "store": args.store, "environment": environment(), "baseline_files": base["files"], "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
