"""``protect``: a folder (or an in-memory batch) in, protected images out.

Folder flow: plan (scan SRC, build the method: everything that can refuse runs before DST is made) →
destination and resume checks → under the manifest's lock: decode every image at the working
resolution (failures recorded, not fatal) → generate δ with the method (kept in the run's private state
folder, :mod:`ueguard.data.run_state`, so ``--resume`` skips it; never in DST, since δ undoes the
protection) → for each image: decode the original again, resize its δ row to the native size, add,
clip, round, save atomically, decode the saved file and measure the change on it (L∞, PSNR, L2/RMS,
changed pixels, and whether it is within the method's own budget), append the manifest line → the
``complete`` line, then the private state is deleted. SRC is only ever read, and nothing is written
through a link (:mod:`ueguard.data.safe_fs`).

Memory: sample-wise δ is one float32 tensor, or with ``--store disk`` (``auto``: when that tensor would
take over an eighth of the machine's memory) the memory-mapped :class:`~ueguard.data.store.PerturbationStore`
in the private state, which also checkpoints generation row by row (methods that finish
rows one batch at a time resume from the rows stored). Bi-level methods (EMN, SSC, REM) checkpoint
every round instead (:class:`~ueguard.data.store.RoundCheckpoint`, ``rounds.pt`` in the private state, with either
store): ``--resume`` continues with the round after the last one checkpointed, and the result equals an
uninterrupted run's. Under torchrun a method that splits its rounds over the processes does not
checkpoint them (generation starts again). The file records are streamed to the manifest and read back
from it (:class:`ManifestItems`), so what grows with the file count is the working set (3 bytes per
working pixel), the listing and the sample ids.

Labels: class subfolders; or, with ``--labels auto`` on a flat folder, pseudo-labels from k-means of a
pretrained surrogate's features (:mod:`ueguard.engine.clusters`), recorded per file in the manifest.

Crash safety: an output appears under its final name only by an atomic rename of a complete, fsynced
temporary file, and its manifest line is appended only after that rename, so a manifest ``ok`` line
always means a complete file. ``--resume`` trusts a finished file only when its ``ok`` line is there and
its bytes still hash to the recorded ``output_sha256``; everything else is redone from the same cached
(or deterministically regenerated) perturbation, so the result equals an uninterrupted run. Leftover
temporary files of a killed run are removed on resume. A full or read-only output disk stops the run
(:class:`FatalError`) instead of failing every remaining file one by one.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

import numpy as np
import torch

import ueguard
from ueguard.data.folder import FolderEntry, FolderListing, scan_folder
from ueguard._crash import kill_point
from ueguard.data.images import (DEFAULT_MAX_PIXELS, DecodedImage, ImageFileError, ImageWriteError,
                                 load_image, output_path, quantize, resolve_format, save_image)
from ueguard.data.manifest import (MANIFEST_NAME, ManifestItems, ManifestWriteError, ManifestWriter, busy_message,
                                   is_busy, read_manifest_offsets, sha256_file)
from ueguard.data.run_state import remove_state, state_folder
from ueguard.data.safe_fs import LinkError, find_link
from ueguard.data.loaders import load_working_set, resolve_loader
from ueguard.data.store import PerturbationStore, RoundCheckpoint, StoreError
from ueguard.data.working_set import WorkingSet, image_sides, resize_float, suggest_size
from ueguard.engine import distributed
from ueguard.engine.progress import SILENT, Progress
from ueguard.engine.runtime import Runtime, seed_everything
from ueguard.errors import FatalError, UsageError
from ueguard.methods import METHODS, Perturbation
from ueguard.methods.base import RankFollower
from ueguard.budgets import SIZE_CAP, default_arch
from ueguard.sdk.options import ProtectOptions
from ueguard.sdk.params import call_options, takes_options

#: Where ueguard versions before 0.x kept the resume state, inside DST; removed wherever it is found.
LEGACY_STATE_DIR = ".ueguard"
WORKING_FILE = "working-set.npy"  # a spilled working set (streaming loaders), in the private state folder
#: Options that must match for ``--resume`` to continue a run (the rest — device, precision, compile — may change).
RESUME_KEYS = ("method", "eps", "seed", "budget", "size", "surrogate", "weights", "pretrained", "format",
               "quality", "perturbation", "method_options", "keep_metadata", "follow_symlinks",
               "label_source", "clusters")
#: OS errors on an output that no other file would escape: the run stops instead of failing each file.
FATAL_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
#: Names of ueguard's temporary files under DST (see ``save_image``).
TEMP_PREFIXES = (".ueguard-",)
#: A bi-level method's round checkpoint, in the private state folder (see ``RoundCheckpoint``).
ROUND_CHECKPOINT = "rounds.pt"
#: ``--store auto`` keeps float32 sample-wise δ in memory up to this fraction of physical memory.
STORE_MEMORY_FRACTION = 1 / 8


@dataclass
class ProtectResult:
    """What ``protect`` returns.

    Folder input: ``out`` and ``manifest_path`` are set and ``items`` holds the manifest's file records
    (read from the manifest when used, so a run over a million files does not keep a million records).
    In-memory input: ``data`` holds the protected array in the input's type, layout and dtype and
    ``items`` one ``{"index", "label", "linf", "psnr", "l2", "rms", "l0", "within_budget"}`` record per
    image. ``linf`` and ``rms`` are in 1/255 levels, ``l2`` in [0, 1] units, ``l0`` in pixel positions.
    ``labels`` holds the labels used (the pseudo-labels with ``labels="auto"``).
    """

    items: "list[dict[str, Any]] | ManifestItems"
    perturbation: Perturbation | None
    options: ProtectOptions
    out: Path | None = None
    manifest_path: Path | None = None
    data: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    labels: Any = None

    def _count(self, status: str) -> int:
        return sum(1 for item in self.items if item.get("status", "ok") == status)

    @property
    def ok(self) -> int:
        return self._count("ok")

    @property
    def failed(self) -> int:
        return self._count("failed")

    @property
    def skipped(self) -> int:
        return self._count("skipped")

    @property
    def paths(self) -> list[Path]:
        """Output files written (folder input)."""
        return [self.out / item["output"] for item in self.items if item.get("status") == "ok"] if self.out else []


@takes_options(ProtectOptions, own=("src", "out"))
def protect(src: str | os.PathLike | np.ndarray | torch.Tensor, out: str | os.PathLike | None = None, method: str = "emn", *,
            eps: float | str = "8/255", seed: int = 0, budget: str = "standard", device: str = "auto",
            precision: str = "auto", compile: str = "auto", size: int | None = None, surrogate: str | None = None,
            weights: str | os.PathLike | None = None, pretrained: bool = False, format: str = "png",
            quality: int = 95, perturbation: str | None = None,
            method_options: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
            max_pixels: int = DEFAULT_MAX_PIXELS, resume: bool = False, keep_metadata: bool = False,
            follow_symlinks: bool = False, labels: str | Sequence[int] | np.ndarray | torch.Tensor = "folders", clusters: int | None = None,
            loader: str = "auto", cache_dir: str | os.PathLike | None = None, store: str = "auto",
            layout: str = "auto", progress: Progress | bool | None = False) -> ProtectResult:
    """Protect a folder of images (``src`` a path; ``out`` the output folder, default ``SRC_protected``
    beside it) or an in-memory batch (``src`` an array or tensor; the result's ``.data``).

    In-memory input: uint8 or float (values in [0, 1]) ``N×C×H×W`` or ``N×H×W×C`` (``layout``: ``"auto"``,
    ``"nchw"`` or ``"nhwc"``, for when C is ambiguous) with C = 1 or 3, NumPy or torch, and ``labels`` (N
    ints). ``labels="auto"`` (either input): pseudo-labels by k-means of a pretrained surrogate's features
    (``weights``/``pretrained`` required; ``clusters`` = k, or chosen by silhouette over 2–10). For a folder,
    ``auto`` uses the class subfolders when there are any. Label-free methods (``uc``) need neither.
    ``progress``: ``True`` shows the stage, step and ETA on stderr, ``None`` only on a terminal.

    Every option below is checked before anything is written: a wrong type raises
    :class:`~ueguard.errors.OptionTypeError` (a ``TypeError``), a bad value
    :class:`~ueguard.errors.UsageError` (a ``ValueError``), each naming the keyword.
    """
    label_source, labels = (labels, None) if isinstance(labels, str) else ("folders", labels)
    if isinstance(method_options, Mapping):
        method_options = tuple(sorted(method_options.items()))
    opts = ProtectOptions.resolve(**call_options(ProtectOptions, locals() | {"labels": label_source}))
    reporter = progress if isinstance(progress, Progress) else Progress(progress, name="protect")
    if isinstance(src, (str, os.PathLike)):
        if labels is not None:
            raise UsageError("labels= is for in-memory data; a folder's labels come from its class subfolders "
                             "(or labels='auto' for pseudo-labels)")
    elif out is not None:
        raise UsageError("out= is for folder input; in-memory input returns the protected array in .data")
    try:  # under torchrun: join the process group (see ueguard.engine.distributed)
        ranks, created = distributed.setup(opts.device)
    except (ValueError, RuntimeError) as error:
        raise UsageError(f"torchrun: {error}") from None
    try:
        if not ranks.is_main:
            reporter = SILENT
        if not isinstance(src, (str, os.PathLike)):
            return _protect_array(src, labels, layout, opts, reporter)  # every rank computes, none writes
        if ranks.enabled:
            return _protect_folder_distributed(Path(src), None if out is None else Path(out), opts, reporter, ranks)
        return _protect_folder(Path(src), None if out is None else Path(out), opts, reporter)
    finally:
        distributed.teardown(created, clean=sys.exc_info()[0] is None)


# --------------------------------------------------------------------------------------------------
# shared pieces


def _surrogate(opts: ProtectOptions, size: int, num_classes: int):
    """The surrogate named by the options (default architecture for the size and budget) with its weights."""
    from ueguard import models

    name = opts.surrogate or default_arch(size, opts.budget)
    try:
        return name, models.create_model(name, num_classes, weights=opts.weights, pretrained=opts.pretrained)
    except (ValueError, FileNotFoundError, RuntimeError) as error:  # RuntimeError: hub weights not downloaded
        raise UsageError(str(error)) from None


def _hub_surrogate(opts: ProtectOptions, progress: Progress) -> ProtectOptions:
    """For a method that needs a pretrained surrogate and was given none: the named timm surrogate with its
    hub weights, or :data:`~ueguard.models.DEFAULT_PRETRAINED` (a ueguard architecture has no hub weights:
    refused, naming the timm model that has them)."""
    from ueguard import models

    name = opts.surrogate or models.DEFAULT_PRETRAINED
    if models.is_model(name):
        try:
            models.create_model(name, 1, pretrained=True)
        except ValueError as error:
            raise UsageError(f"method {opts.method!r} needs a pretrained surrogate: {error}") from None
    progress.log(f"method {opts.method!r} needs a pretrained surrogate and none was given: using timm's {name} "
                 "with its hub weights (--weights FILE or --surrogate NAME --pretrained choose another)")
    return dataclasses.replace(opts, surrogate=name, pretrained=True)


def _build_method(opts: ProtectOptions, size: int, num_classes: int, runtime: Runtime, progress: Progress):
    """Seed, build the surrogate (when the method needs one) and the method. Returns (method, record)."""
    from ueguard import models

    cls = METHODS.get(opts.method)
    try:  # the method's options first: a misspelt -o is named before a missing surrogate
        config = cls.make_config(opts.budget, **opts.method_overrides())
    except ValueError as error:
        raise UsageError(str(error)) from None
    seed_everything(opts.seed)
    record: dict[str, Any] = {}
    surrogate = None
    if cls.needs_surrogate:
        given = opts
        if cls.needs_pretrained and not (opts.weights or opts.pretrained):
            opts = _hub_surrogate(opts, progress)
        try:
            name, surrogate = _surrogate(opts, size, num_classes)
        except UsageError as error:
            if opts is given:
                raise
            raise UsageError(f"method {opts.method!r} needs a pretrained surrogate; it tried timm's {opts.surrogate} "
                             f"from the hub and could not get it ({error}). Pass --weights FILE (a local "
                             "checkpoint, e.g. a CIFAR ResNet-20's) or --surrogate NAME --pretrained") from None
        record = {"surrogate": name, "surrogate_sha256": models.state_dict_sha256(surrogate),
                  "weights_sha256": models.weights_sha256(opts.weights) if opts.weights else None,
                  **({"surrogate_from_hub": True} if opts is not given else {})}
    try:
        method = cls(config, runtime=runtime, surrogate=surrogate, progress=progress)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return method, record


def _check_pseudo_labels(opts: ProtectOptions) -> None:
    if not (opts.weights or opts.pretrained):
        raise UsageError("--labels auto clusters the features of a pretrained surrogate: pass --weights FILE or "
                         "--pretrained (a random network would group the images by colour, not content)")


def _pseudo_labels(opts: ProtectOptions, size: int, working: WorkingSet, runtime: Runtime, progress: Progress):
    """k-means pseudo-labels of the working images on the pretrained surrogate's features."""
    from ueguard.engine.clusters import pseudo_labels

    seed_everything(opts.seed)
    name, model = _surrogate(opts, size, max(2, opts.clusters or 2))
    progress.log(f"clustering {len(working)} images on {name} features for pseudo-labels")
    try:
        clustering = pseudo_labels(model, working.images, runtime, opts.clusters, seed=opts.seed)
    except ValueError as error:
        raise UsageError(str(error)) from None
    classes = tuple(f"cluster_{k}" for k in range(clustering.k))
    return clustering, WorkingSet(working.images, clustering.labels, working.grayscale, classes, working.ids), name


def make_runtime(device: str, precision: str, compile: str = "auto") -> Runtime:
    """The run's :class:`Runtime`; asking for a device this machine lacks is a usage error."""
    try:
        return Runtime.create(device, precision, compile)
    except (ValueError, RuntimeError) as error:
        raise UsageError(str(error)) from None


def _environment(runtime: Runtime) -> dict[str, Any]:
    ranks = distributed.current()
    return {"ueguard_version": ueguard.__version__, "torch_version": torch.__version__,
            "device": str(runtime.device), "precision": runtime.precision, "compile": runtime.compile,
            "threads": torch.get_num_threads(), **({"distributed": ranks.record()} if ranks.enabled else {})}


#: Values per block of rows when :func:`_quality` compares a source with its output: the float64
#: difference of one block (8 MB) is all it holds beside the two images, whatever their size.
QUALITY_BLOCK_VALUES = 1 << 20


def _quality(original: DecodedImage, saved: DecodedImage) -> dict[str, Any]:
    """The change from a source to its decoded output (see :func:`change_stats`), a block of rows at a
    time so that no full-size float copy of a large photo is made.

    Compared as floats in [0, 1], broadcasting channels, because a lossy output may change bit depth
    (16-bit → 8-bit JPEG) or channel count (gray → RGB WebP/GIF)."""
    rows = max(1, QUALITY_BLOCK_VALUES // max(1, original.width * max(original.channels, saved.channels)))
    sums = [_change_sums(np.abs(_float_rows(original, r, rows) - _float_rows(saved, r, rows)))
            for r in range(0, original.height, rows)]
    return _stats_from(max(s[0] for s in sums), sum(s[1] for s in sums), sum(s[2] for s in sums),
                       sum(s[3] for s in sums))


def _float_rows(image: DecodedImage, start: int, count: int) -> np.ndarray:
    """Rows ``start … start + count`` of ``image.to_float()`` as float64 (the same values, computed per block)."""
    values = image.pixels[start:start + count].astype(np.float32)
    values /= np.float32(image.max_value)
    return values.astype(np.float64)


def change_stats(diff: np.ndarray) -> dict[str, Any]:
    """``|output − original|`` as ``H×W×C`` floats in [0, 1] → the sizes of the change in every norm:
    ``linf`` (1/255 levels), ``psnr`` (dB, None when identical), ``l2`` (Euclidean, [0, 1] units),
    ``rms`` (1/255 levels: L2 / √(H·W·C), comparable across sizes) and ``l0`` (pixel positions with
    any channel changed)."""
    return _stats_from(*_change_sums(diff))


def _change_sums(diff: np.ndarray) -> tuple[float, float, int, int]:
    """What :func:`change_stats` needs of (a block of rows of) a difference: its maximum, its sum of
    squares, the changed pixel positions and the number of values — sums that add up over blocks."""
    return float(diff.max()), float(np.sum(diff**2)), int(np.count_nonzero(diff.max(axis=2) > 0)), diff.size


def _stats_from(largest: float, squares: float, changed: int, values: int) -> dict[str, Any]:
    mse = squares / values
    return {"linf": round(largest * 255, 4),
            "psnr": None if mse == 0 else round(10 * math.log10(1.0 / mse), 3),
            "l2": round(math.sqrt(squares), 6),
            "rms": round(math.sqrt(mse) * 255, 4),
            "l0": changed}


#: Relative slack on the RMS check of L2 methods: bilinear resizing to the native size keeps the RMS
#: of δ up to border effects of about this size (it is a convex interpolation; see ``resize_float``).
RMS_SLACK = 0.02


def within_budget(stats: dict[str, Any], perturbation: Perturbation, working_size: tuple[int, int],
                  native_size: tuple[int, int]) -> bool:
    """Whether a saved file's change is within the method's own budget, allowing 8-bit rounding.

    ``linf``: L∞ ≤ ε + 0.5/255. ``l2``: the budget is an L2 norm at the working resolution, so the
    check is on the size-independent RMS: RMS ≤ ε/√(3·h·w)·(1 + RMS_SLACK) + 0.5/255 (rounding adds at
    most 0.5/255 to every value). ``l0``: changed positions ≤ ε × the native pixels one working pixel
    covers (nearest-neighbour resize). A lossy format can exceed any of these — then this says so.
    """
    h, w = working_size
    height, width = native_size
    if perturbation.norm == "linf":
        return stats["linf"] <= perturbation.eps * 255 + 0.5 + 1e-6
    if perturbation.norm == "l2":
        budget_rms = perturbation.eps / math.sqrt(3 * h * w) * 255
        return stats["rms"] <= budget_rms * (1 + RMS_SLACK) + 0.5 + 1e-6
    footprint = math.ceil(height / h) * math.ceil(width / w)
    return stats["l0"] <= perturbation.eps * footprint


def perturb_native(planes: np.ndarray, max_value: int, delta: torch.Tensor, resample: str = "bilinear") -> np.ndarray:
    """Apply a working-resolution δ (``3×h×w``, already gray-projected) to an integer ``H×W×C`` image at
    its native size: resize δ (bilinear: a convex interpolation, so it stays within ±ε; or nearest, so
    a one-pixel δ becomes the block of native pixels it covers), add, clip to the valid range, round to
    the image's levels. 8-bit images go through the fused ``apply_quantize`` op."""
    from ueguard.kernels import apply_quantize

    height, width, channels = planes.shape
    if resample == "nearest":
        native = torch.nn.functional.interpolate(delta[None, :channels].float().cpu(), size=(height, width),
                                                 mode="nearest")[0]
    else:
        native = resize_float(delta[:channels].float().cpu(), (height, width))
    if max_value == 255:
        chw = planes.transpose(2, 0, 1)  # a gray H×W×1 image is already contiguous, so no copy is made
        if not (chw.flags.c_contiguous and chw.flags.writeable):  # and a decoded image may be read-only,
            chw = chw.copy()                                          # which torch.from_numpy warns about
        image = torch.from_numpy(chw)
        out, _, _ = apply_quantize(image[None], native[None].contiguous())
        return out[0].permute(1, 2, 0).numpy()
    x = torch.from_numpy(planes.astype(np.float32) / max_value).permute(2, 0, 1)
    return quantize((x + native).clamp_(0, 1).permute(1, 2, 0).numpy(), max_value)


# --------------------------------------------------------------------------------------------------
# folder input


def default_destination(src: Path) -> Path:
    """``SRC_protected`` beside SRC, named after the folder itself (so ``.`` or ``photos/..`` name the
    folder they resolve to, not an empty or ``..`` name that would land inside SRC)."""
    resolved = src.resolve()
    if resolved.parent == resolved:
        raise UsageError(f"{src} is the filesystem root; give --out for the protected copy")
    return resolved.parent / f"{resolved.name}_protected"


def _refuse_overlap(src: Path, dst: Path) -> None:
    """Refuse a DST inside SRC or containing it, by path or by identity, and a DST that is a link."""
    if dst.is_symlink():
        raise UsageError(f"the output folder {dst} is a symbolic link (to {os.path.realpath(dst)}); ueguard never "
                         "writes through a link — give the folder itself as --out")
    if _inside(dst, src):
        raise UsageError(f"the output folder {dst} is inside the source folder {src}: SRC is never written to; "
                         "choose --out outside it")
    if _inside(src, dst):
        raise UsageError(f"the output folder {dst} contains the source folder {src}; choose --out beside it")


def _check_destination(src: Path, dst: Path, resume: bool) -> None:
    """Refuse a DST that would write into SRC (see :func:`_refuse_overlap`) or holds a link, a busy one,
    and a non-empty one without ``--resume``; then make it."""
    _refuse_overlap(src, dst)
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"the output path {dst} exists and is not a folder")
    _drop_empty_manifest(dst)
    if dst.is_dir() and any(dst.iterdir()):
        if is_busy(dst / MANIFEST_NAME):
            raise UsageError(busy_message(dst))
        if not resume:
            raise UsageError(f"the output folder {dst} is not empty: pass --resume to continue a run there, "
                             "or choose a new --out")
        if not (dst / MANIFEST_NAME).exists() and not (dst / MANIFEST_NAME).is_symlink():
            raise UsageError(f"--resume: {dst} has files but no {MANIFEST_NAME}; it was not made by ueguard — "
                             "choose a new --out")
        link = find_link(dst)
        if link is not None:
            raise UsageError(f"--resume: {link} is a symbolic link (to {os.path.realpath(link)}); ueguard never "
                             "writes through a link, and nothing it made is one — remove it (its target is "
                             "left alone), or choose a new --out")
        if not (dst / MANIFEST_NAME).is_file():
            raise UsageError(f"--resume: {dst / MANIFEST_NAME} is not a regular file (ueguard writes its manifest "
                             "as one); choose a new --out")
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create the output folder {dst}: {error.strerror or error}") from None
    if not os.access(dst, os.W_OK):
        raise UsageError(f"the output folder {dst} is not writable")


def _drop_empty_manifest(dst: Path) -> None:
    """A DST holding nothing but an empty manifest (a run refused or stopped before its first record) is
    an empty DST: the file is ueguard's own and records nothing, so it never makes a corrected command
    refuse the folder."""
    manifest = dst / MANIFEST_NAME
    if (dst.is_dir() and not manifest.is_symlink() and manifest.is_file() and manifest.stat().st_size == 0
            and [p.name for p in dst.iterdir()] == [MANIFEST_NAME] and not is_busy(manifest)):
        manifest.unlink()


def _inside(inner: Path, outer: Path) -> bool:
    """Whether folder ``inner`` is ``outer`` or under it, by resolved path or by identity (the same folder
    reached under another name, e.g. a bind mount); ``inner`` need not exist yet."""
    real_inner, real_outer = inner.resolve(), outer.resolve()
    if real_inner == real_outer or real_outer in real_inner.parents:
        return True
    try:
        identity = _identity(real_outer)
    except OSError:
        return False
    for folder in (real_inner, *real_inner.parents):
        try:
            if _identity(folder) == identity:
                return True
        except OSError:
            continue
    return False


def _identity(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def source_digest(listing: FolderListing) -> str:
    """A digest of the images SRC holds now — names, sizes, modification times — so that ``--resume`` can
    tell whether SRC changed since the run began (its perturbation was made for the images then)."""
    digest = hashlib.sha256()
    for entry in listing.images:
        try:
            info = os.stat(listing.root / entry.relpath)
            mark = f"{info.st_size} {info.st_mtime_ns}"
        except OSError:
            mark = "unreadable"
        digest.update(f"{entry.relpath}\0{mark}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _previous_run(dst: Path, opts: ProtectOptions, method, digest: str,
                  progress: Progress = SILENT) -> tuple[dict[str, int], dict[str, Any] | None]:
    """For ``--resume``: the byte offset in the manifest of each finished file's record (by source path), and
    the ``method_options`` the run began with (None when DST has no manifest yet), after checking that the
    earlier run used the same settings. Method options are compared by the constants they resolve to, not
    as given: ``-o eval_limit=10000`` finishes a folder begun without it when 10000 is the default, and a
    folder begun under other defaults (:func:`changed_constants`) is finished by passing the constants it
    began with. A SRC that changed since the run began (:func:`source_digest`) is refused once files are
    finished: their perturbation was made for the old images, and finishing would mix two generations in
    one folder. Streams the manifest."""
    path = dst / MANIFEST_NAME
    if not path.exists():
        return {}, None
    header, finished = None, {}
    for offset, r in read_manifest_offsets(path):
        if header is None and r.get("kind") == "run":
            header = r
            before, now, defaults = header["options"], opts.record(), ProtectOptions().record()
            changed = [k for k in RESUME_KEYS if k != "method_options" and before.get(k, defaults[k]) != now[k]]
            if changed:
                raise UsageError(f"--resume: {dst} was made with different settings ({', '.join(changed)}); "
                                 "resume with the same options or choose a new --out")
            try:
                recorded = recorded_constants(header, type(method))
            except ValueError as error:
                raise UsageError(f"--resume: {dst}: {error}; finish it with the ueguard version that began it, "
                                 "or choose a new --out") from error
            constants = changed_constants(recorded, method.config)
            if constants:
                again = " ".join(f"-o {k}={_option_text(old)}" for k, old, _ in _differences(recorded, method.config))
                why = ("with other method constants" if before.get("method_options") != now["method_options"] else
                       f"by a ueguard whose {opts.method} defaults differ from this one's")
                raise UsageError(f"--resume: {dst} was made {why} ({constants}); pass {again} to finish it with "
                                 "the constants it began with, or choose a new --out")
        elif r.get("kind") == "file" and r.get("status") == "ok":
            finished[r["source"]] = (offset, r["output"], r["output_sha256"])
    if header is not None and header.get("source_digest") not in (None, digest):
        if finished:
            raise UsageError(f"--resume: the source folder changed since the run in {dst} began ({len(finished)} "
                             "file(s) were finished from the images it held then; their names, sizes or "
                             "modification times differ now). Finishing would mix perturbations of two "
                             "generations: restore SRC as it was, or protect it anew into a new --out")
        progress.log("the source folder changed since the interrupted run began; nothing was finished, so "
                     "generation starts again for the images it holds now")
    done = {source: offset for source, (offset, output, sha256) in finished.items() if _intact(dst / output, sha256)}
    return done, (header["options"].get("method_options") or {}) if header is not None else None


def recorded_constants(header: dict[str, Any], method_cls) -> dict[str, Any]:
    """The method constants (JSON form) the run of a manifest's ``run`` line resolved to: its
    ``method_config``, or for a line made before protect recorded that, its options resolved anew under its
    ``defaults_revision`` (1 when absent; ValueError for a revision newer than this code's)."""
    if header.get("method_config") is not None:
        return header["method_config"]
    recorded = ProtectOptions.resolve(**{k: v for k, v in header["options"].items() if k != "eps_255"})
    return json.loads(json.dumps(dataclasses.asdict(recorded.method_config(header.get("defaults_revision", 1)))))


def changed_constants(recorded: dict[str, Any], config) -> str:
    """The constants of ``recorded`` (see :func:`recorded_constants`) that differ from ``config``'s, as
    ``name old → new`` text; '' when none. A constant the record lacks was added since it was made: the run
    behaved as that constant's declared default does (a new option is off by default), so that is what is
    compared — a folder made before ``shift`` existed is not one made with ``shift=8``."""
    return ", ".join(f"{k} {old!r} → {new!r}" for k, old, new in _differences(recorded, config))


def _option_text(value: Any) -> str:
    """A constant as ``-o KEY=VALUE`` spells it (see ``parse_method_options``)."""
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _differences(recorded: dict[str, Any], config) -> list[tuple[str, Any, Any]]:
    """``(name, recorded value, config's value)`` for each constant that differs (JSON forms); one the record
    lacks stands at its declared default (see :func:`changed_constants`)."""
    now = json.loads(json.dumps(dataclasses.asdict(config)))
    declared = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(config)
                                      if f.default is not dataclasses.MISSING}, default=str))
    before = {k: recorded[k] if k in recorded else declared.get(k, now[k]) for k in now}
    return [(k, before[k], now[k]) for k in sorted(now) if before[k] != now[k]]


def _intact(path: Path, sha256: str) -> bool:
    """Whether a finished output is still there with the bytes the manifest recorded."""
    try:
        return path.is_file() and sha256_file(path) == sha256
    except OSError:
        return False


def _remove_temporaries(dst: Path) -> int:
    """Delete the temporary files a killed run left under DST (hidden ``.ueguard-*.tmp`` beside outputs);
    their names are ueguard's own, never a final output's (a link of that name is removed, not followed)."""
    removed = 0
    for folder, _, names in os.walk(dst):
        for name in names:
            if name.startswith(TEMP_PREFIXES) and name.endswith(".tmp"):
                os.unlink(os.path.join(folder, name))
                removed += 1
    return removed


def _plan_outputs(listing: FolderListing, fmt: str, problem: Callable[[FolderEntry], str | None] = lambda entry: None
                  ) -> tuple[dict[PurePosixPath, PurePosixPath], dict[PurePosixPath, str]]:
    """Output path per image, and the images refused because their output would overwrite another's:
    two sources that differ only in suffix (``a.jpg`` and ``a.png`` both become ``a.png``) or only in
    letter case (``a.PNG`` and ``a.png``: one file on case-insensitive file systems — macOS, Windows, and
    any disk the outputs are later copied to). The first in walk order that can be read (``problem``
    returns None) keeps the name; nothing is overwritten. ``problem`` is asked only of images that
    collide, so a broken twin fails with its own reason and never costs a valid image its output."""
    by_key: dict[str, list[FolderEntry]] = {}
    for entry in listing.images:
        by_key.setdefault(str(output_path(entry.relpath, fmt)).casefold(), []).append(entry)
    planned: dict[PurePosixPath, PurePosixPath] = {}
    refused: dict[PurePosixPath, str] = {}
    for key, group in by_key.items():
        if key == MANIFEST_NAME.casefold():
            for entry in group:
                refused[entry.relpath] = f"its output would overwrite the manifest {MANIFEST_NAME}; rename it"
            continue
        problems = {} if len(group) == 1 else {e.relpath: problem(e) for e in group}
        keeper = next((e for e in group if problems.get(e.relpath) is None), None)
        for entry in group:
            target = PurePosixPath(output_path(entry.relpath, fmt))
            if entry is keeper:
                planned[entry.relpath] = target
            elif problems.get(entry.relpath) is not None:
                refused[entry.relpath] = problems[entry.relpath]
            else:
                refused[entry.relpath] = _collision(target, keeper, fmt)
    return planned, refused


def _collision(target: PurePosixPath, keeper: FolderEntry, fmt: str) -> str:
    """Why an image whose output ``target`` collides with ``keeper``'s is refused."""
    if str(target) == str(output_path(keeper.relpath, fmt)):
        hint = "; rename one of them" + (" or use --format keep" if fmt != "keep" else "")
        return f"its output {target} would overwrite the output of {keeper.relpath}{hint}"
    return (f"its output {target} differs from the output of {keeper.relpath} only in letter case, so one "
            "would overwrite the other on a case-insensitive file system; rename one of them")


def _store_fingerprint(opts: ProtectOptions, began_with: dict[str, Any] | None = None,
                       digest: str | None = None) -> dict[str, Any]:
    """What must match for a perturbation store or round checkpoint to be reused: the settings ``--resume``
    compares and the source folder's :func:`source_digest`. ``began_with``: on resume, the method options
    the run began with, which ``_previous_run`` found to resolve to this run's constants — the state that
    run left was fingerprinted with them."""
    record = opts.record()
    if began_with is not None:
        record["method_options"] = began_with
    return {**{key: record[key] for key in RESUME_KEYS}, "source_digest": digest}


def _use_disk_store(opts: ProtectOptions, n: int, size: int) -> bool:
    if opts.store != "auto":
        return opts.store == "disk"
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    return n * 3 * size * size * 4 > physical * STORE_MEMORY_FRACTION


def _load_state(path: Path, ids: list[str], store_dir: Path | None = None, fingerprint: dict[str, Any] | None = None,
                device: torch.device | str = "cpu", progress: Progress = SILENT) -> Perturbation | None:
    """The finished perturbation of an interrupted run: a complete on-disk store, or the torch file."""
    if store_dir is not None and (store_dir / "store.json").exists():
        try:
            store = PerturbationStore.open(store_dir, ids, fingerprint=fingerprint, device=device)
        except StoreError as error:  # damaged, or left by other settings: generated again (same seed, same δ)
            progress.log(f"not reusing the perturbation store: {error}; generating again")
            store = None
        if store is not None and store.complete:
            record = store.meta["perturbation"]
            return Perturbation(store, False, float(record["eps"]), dict(record["info"]), norm=record["norm"],
                                resample=record["resample"], parts=dict(record.get("parts", {})))
        if store is not None:
            store.close()
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file: regenerate (deterministic for the same seed)
        return None
    if state.get("ids") != ids:
        return None
    return Perturbation(state["delta"], bool(state["classwise"]), float(state["eps"]), dict(state["info"]),
                        norm=state.get("norm", "linf"), assignment=state.get("assignment"),
                        resample=state.get("resample", "bilinear"), parts=dict(state.get("parts", {})),
                        shift=int(state.get("shift", 0)), shift_seed=int(state.get("shift_seed", 0)))


def _save_state(path: Path, perturbation: Perturbation, ids: list[str]) -> None:
    if isinstance(perturbation.delta, PerturbationStore):  # rows are on disk already: mark it complete
        perturbation.delta.finish({"eps": perturbation.eps, "norm": perturbation.norm, "info": perturbation.info,
                                   "resample": perturbation.resample, "parts": perturbation.parts})
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    assignment = None if perturbation.assignment is None else perturbation.assignment.cpu()
    with open(tmp, "wb") as fh:  # fsynced: it supersedes the round checkpoint, which is removed next
        torch.save({"delta": perturbation.delta.cpu(), "classwise": perturbation.classwise, "eps": perturbation.eps,
                    "info": perturbation.info, "ids": ids, "norm": perturbation.norm, "assignment": assignment,
                    "resample": perturbation.resample, "parts": perturbation.parts, "shift": perturbation.shift,
                    "shift_seed": perturbation.shift_seed}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _protect_folder_distributed(src: Path, dst: Path | None, opts: ProtectOptions, progress: Progress,
                                ranks: distributed.Distributed) -> ProtectResult:
    """Under torchrun: rank 0 runs the folder flow — it alone decodes, writes the files and the one
    manifest — and hands the working set to the other ranks, which only take part in generating δ.
    However rank 0 leaves before that point (finished, cached δ, or an error), it tells them, so no rank
    waits for a peer that is gone."""
    if not ranks.is_main:
        return _generate_for_rank0(opts, ranks)
    handoff = distributed.Handoff(ranks)
    try:
        return _protect_folder(src, dst, opts, progress, handoff)
    except UsageError as error:
        handoff.stop("usage", str(error))
        raise
    except KeyboardInterrupt:
        handoff.stop("interrupted", "interrupted")
        raise
    except BaseException as error:
        handoff.stop("fatal", f"{type(error).__name__}: {error}")
        raise
    finally:
        handoff.stop()


def _hand_over(handoff: distributed.Handoff | None, method: str, working: WorkingSet, size: int, num_classes: int,
               progress: Progress, checkpoint: bool = False) -> None:
    """Send the working set to the other ranks when the method splits its work over them (and whether
    rank 0 checkpoints its rounds, which every rank then takes part in); otherwise release them (rank 0
    generates alone)."""
    if handoff is None or handoff.sent:
        return
    if not getattr(METHODS.get(method), "supports_distributed", False):
        progress.log(f"method {method!r} does not split over processes; rank 0 generates alone")
        handoff.stop()
        return
    handoff.work({"size": size, "num_classes": num_classes, "classes": list(working.classes), "ids": working.ids,
                  "checkpoint": checkpoint},
                 {"images": working.images, "labels": working.labels, "grayscale": working.grayscale})


def _generate_for_rank0(opts: ProtectOptions, ranks: distributed.Distributed) -> ProtectResult:
    """A non-zero rank's part of a folder run: receive rank 0's working set, build the same method (same
    seed, so the same surrogate) and take part in generating δ. It writes nothing; its result has no items."""
    received = distributed.Handoff.receive(ranks)
    if received is None:
        return ProtectResult([], None, opts)
    header, tensors = received
    working = WorkingSet(tensors["images"], tensors["labels"], tensors["grayscale"], tuple(header["classes"]),
                         list(header["ids"]))
    runtime = make_runtime(opts.device, opts.precision)
    method, _ = _build_method(opts, header["size"], header["num_classes"], runtime, SILENT)
    if header.get("checkpoint"):
        method.round_checkpoint = RankFollower()
    perturbation = method(working)
    return ProtectResult([], perturbation, opts, info=dict(perturbation.info))


@dataclass
class _FolderRun:
    """What a folder run decided before it writes anything (the plan stage), read by the later stages."""

    src: Path
    dst: Path
    listing: FolderListing
    runtime: Runtime
    size: int
    method: Any
    surrogate_record: dict[str, Any]
    pseudo: bool
    num_classes: int
    digest: str
    state: Path | None = None  # the private resume-state folder (see ueguard.data.run_state)
    done: dict[str, int] = field(default_factory=dict)
    began_with: dict[str, Any] | None = None


def _protect_folder(src: Path, dst: Path | None, opts: ProtectOptions, progress: Progress,
                    handoff: distributed.Handoff | None = None) -> ProtectResult:
    """plan → destination and resume → (under the manifest's lock) decode → generate → save → finish."""
    run = _plan_folder(src, dst, opts, progress)
    _check_destination(src, run.dst, opts.resume)
    if opts.resume:
        run.done, run.began_with = _previous_run(run.dst, opts, run.method, run.digest, progress)
    run.state = state_folder(run.dst, opts.cache_dir, src=src)
    try:
        with ManifestWriter(run.dst / MANIFEST_NAME) as manifest:  # locked: one run per output folder
            result = _write_folder(run, opts, manifest, progress, handoff)
    except ManifestWriteError as error:
        raise FatalError(f"{error}. The finished files are kept; free space (or make the output writable), then "
                         "run the same command with --resume") from error
    remove_state(run.state)  # after the manifest says "complete": a kill before this leaves it private
    return result


def _plan_folder(src: Path, dst: Path | None, opts: ProtectOptions, progress: Progress) -> _FolderRun:
    """Scan SRC and build the method: everything that can refuse the request runs before the destination
    is made (with pseudo-labels the method is built again once the number of clusters is known)."""
    dst = dst if dst is not None else default_destination(src)
    _refuse_overlap(src, dst)
    try:
        listing = scan_folder(src, follow_symlinks=opts.follow_symlinks, exclude=dst)
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        raise UsageError(str(error)) from None
    cls = METHODS.get(opts.method)
    pseudo = opts.label_source == "auto" and not listing.classes and cls.needs_labels
    if cls.needs_labels and not listing.classes and not pseudo:
        raise UsageError(f"{src}: no class subfolders, so the images have no labels; method {opts.method!r} "
                         "needs them — put each class's images in SRC/<class>/, or pass --labels auto for "
                         "pseudo-labels from a pretrained surrogate's features")
    if pseudo:
        _check_pseudo_labels(opts)
    runtime = make_runtime(opts.device, opts.precision, opts.compile)
    size = opts.size or suggest_size(image_sides(listing, listing.images), cap=SIZE_CAP[opts.budget])
    num_classes = max(1, len(listing.classes)) if not pseudo else max(2, opts.clusters or 2)  # a head is needed even label-free
    method, surrogate_record = _build_method(opts, size, num_classes, runtime, progress)
    return _FolderRun(src, dst, listing, runtime, size, method, surrogate_record, pseudo, num_classes,
                      source_digest(listing))


class _FileRecords:
    """Writes the manifest's ``file`` lines of one run (``pseudo_names``: pseudo-label per source, once known)."""

    def __init__(self, manifest: ManifestWriter, listing: FolderListing, opts: ProtectOptions) -> None:
        self.manifest, self.listing = manifest, listing
        self.common = {"method": opts.method, "eps": opts.eps, "eps_255": round(opts.eps * 255, 4), "seed": opts.seed}
        self.pseudo_names: dict[str, str] = {}

    def __call__(self, entry: FolderEntry, status: str, error: str | None, **extra: Any) -> None:
        source = str(entry.relpath)
        label = self.listing.classes[entry.label] if entry.label is not None else self.pseudo_names.get(source)
        self.manifest.write({"kind": "file", "source": source, "output": extra.pop("output", None),
                             "source_sha256": extra.pop("source_sha256", None),
                             "output_sha256": extra.pop("output_sha256", None), "label": label,
                             "pseudo_label": source in self.pseudo_names, **self.common,
                             "linf": extra.pop("linf", None), "psnr": extra.pop("psnr", None),
                             "status": status, "error": error, **extra})


def _write_folder(run: _FolderRun, opts: ProtectOptions, manifest: ManifestWriter, progress: Progress,
                  handoff: distributed.Handoff | None) -> ProtectResult:
    """The run under the manifest's lock: record what is skipped or refused, decode, generate, save, finish."""
    _clean_leftovers(run.dst, opts.resume, progress)
    record = _FileRecords(manifest, run.listing, opts)
    manifest.write({"kind": "run", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": str(run.src.resolve()),
                    "output": str(run.dst.resolve()), "options": opts.record(),
                    "method_config": dataclasses.asdict(run.method.config),  # every constant, defaults included
                    "defaults_revision": type(run.method).defaults_revision, "size": run.size,
                    "classes": list(run.listing.classes), "source_digest": run.digest, "linf_units": "1/255",
                    "resumed": bool(run.done), **run.surrogate_record, **_environment(run.runtime)})
    items = ManifestItems(run.dst / MANIFEST_NAME, manifest.start, run.done.values())  # streamed, not kept
    for entry in run.listing.skipped:
        record(entry, "skipped", entry.skip_reason)
    for entry in run.listing.failed:
        record(entry, "failed", f"{run.src / entry.relpath}: {entry.error}")
    planned, refused = _plan_outputs(run.listing, opts.format, lambda e: _unreadable(run.listing, e, opts.max_pixels))
    for entry in run.listing.images:
        if entry.relpath in refused:
            record(entry, "failed", f"{run.src / entry.relpath}: {refused[entry.relpath]}")
    todo = [e for e in run.listing.images if e.relpath in planned]
    if all(str(e.relpath) in run.done for e in todo):
        return _finish(run, opts, manifest, items, None)
    with progress.step(1, 3, "decoding"):
        working, kept = _decode(run, opts, todo, record, progress)
    if not kept:
        return _finish(run, opts, manifest, items, None)
    with progress.step(2, 3, "generating perturbations"):
        if run.pseudo:
            working = _label_by_clusters(run, opts, working, manifest, record, progress)
        perturbation = _generate(run, opts, working, manifest, progress, handoff)
    pending = [(i, e) for i, e in enumerate(kept) if str(e.relpath) not in run.done]
    with progress.step(3, 3, "saving"), progress.bar(len(pending), "", unit="image") as bar:
        for i, entry in pending:
            status, error, extra = _save_one(run.listing, run.dst, entry, planned[entry.relpath], working,
                                             perturbation, i, opts)
            kill_point("renamed")
            extra.update(perturbation.budget())
            record(entry, status, error, **extra)
            bar.update(1)
    return _finish(run, opts, manifest, items, perturbation)


def _clean_leftovers(dst: Path, resume: bool, progress: Progress) -> None:
    """On resume: the temporary files of a killed run, and the state folder an older ueguard kept inside
    DST (it held the perturbation; today's state is private, so that one is never used again)."""
    if not resume:
        return
    removed = _remove_temporaries(dst)
    if removed:
        progress.log(f"removed {removed} temporary file(s) left by the interrupted run")
    legacy = dst / LEGACY_STATE_DIR
    if legacy.is_dir() and not legacy.is_symlink():
        shutil.rmtree(legacy)
        progress.log(f"removed {legacy}: an older ueguard kept its resume state (the perturbation) there")


def _unreadable(listing: FolderListing, entry: FolderEntry, max_pixels: int) -> str | None:
    """Why an image cannot be decoded, or None (asked only of name twins, see :func:`_plan_outputs`)."""
    try:
        load_image(listing.root / entry.relpath, max_pixels=max_pixels)
    except ImageFileError as error:
        return error.reason
    except (OSError, ValueError) as error:
        return str(error)
    return None


def _decode(run: _FolderRun, opts: ProtectOptions, todo: list[FolderEntry], record: _FileRecords,
            progress: Progress) -> tuple[WorkingSet, list[FolderEntry]]:
    """The working set of the images to protect; each that cannot be decoded is recorded as failed. A
    streaming loader spills it into the private state folder (it is the originals at the working size)."""
    with progress.bar(len(todo), "", unit="image") as bar:
        loader = resolve_loader(opts.loader, len(todo), run.size, run.runtime.device)
        # the methods index the whole set round after round: in memory when it fits, else (a streaming
        # loader) spilled into a memory-mapped file, paged in batch by batch
        spill = run.state / WORKING_FILE if loader != "memory" else None
        return load_working_set(run.listing, todo, run.size, loader, max_pixels=opts.max_pixels,
                                cache_dir=opts.cache_dir, on_error=lambda entry, error: record(entry, "failed", str(error)),
                                on_progress=bar.update, spill=spill)


def _label_by_clusters(run: _FolderRun, opts: ProtectOptions, working: WorkingSet, manifest: ManifestWriter,
                       record: _FileRecords, progress: Progress) -> WorkingSet:
    """Pseudo-labels for a flat folder (recorded in the manifest), and the method rebuilt for their count."""
    clustering, working, clustered_on = _pseudo_labels(opts, run.size, working, run.runtime, progress)
    record.pseudo_names.update(zip(working.ids, (working.classes[k] for k in working.labels.tolist())))
    manifest.write({"kind": "pseudo_labels", "surrogate": clustered_on, "features": "penultimate, L2-normalised",
                    "classes": list(working.classes), **clustering.record()})
    run.num_classes = working.num_classes
    run.method, _ = _build_method(opts, run.size, run.num_classes, run.runtime, progress)
    return working


def _generate(run: _FolderRun, opts: ProtectOptions, working: WorkingSet, manifest: ManifestWriter,
              progress: Progress, handoff: distributed.Handoff | None) -> Perturbation:
    """δ for the working set: the finished perturbation an interrupted run left in the private state
    folder, or generated (with a round checkpoint and, for ``--store disk``, the on-disk store there)."""
    state_path, store_dir = run.state / "perturbation.pt", run.state / "perturbation"
    fingerprint = _store_fingerprint(opts, run.began_with, run.digest)
    perturbation = _load_state(state_path, working.ids, store_dir, fingerprint, run.runtime.device, progress)
    store_record: dict[str, Any] = {}
    method = run.method
    if perturbation is None:
        if _use_disk_store(opts, len(working), run.size):
            method.delta_store = _store_factory(store_dir, working.ids, fingerprint, run.runtime, store_record, progress)
        if method.checkpoints_rounds:  # (under torchrun too: see ueguard.engine.distributed)
            method.round_checkpoint = RoundCheckpoint(run.state / ROUND_CHECKPOINT, fingerprint, working.ids,
                                                      log=progress.log)
        progress.log(f"generating {opts.method} perturbations for {len(working)} images at {run.size}px on "
                     f"{run.runtime.device}")
        kill_point("generating")
        _hand_over(handoff, opts.method, working, run.size, run.num_classes, progress,
                   checkpoint=method.round_checkpoint is not None)
        perturbation = method(working)
        _save_state(state_path, perturbation, working.ids)
        if method.round_checkpoint is not None:  # superseded by the complete perturbation
            method.round_checkpoint.remove()
    if isinstance(perturbation.delta, PerturbationStore):
        store_record.update(store="private resume state", store_encoding=perturbation.delta.encoding)
    manifest.write({"kind": "generation", "method": opts.method, **perturbation.budget(), **perturbation.info,
                    **store_record})
    return perturbation


def _finish(run: _FolderRun, opts: ProtectOptions, manifest: ManifestWriter, items: ManifestItems,
            perturbation: Perturbation | None) -> ProtectResult:
    """The ``complete`` line that says the folder is finished (the caller then deletes the private state)."""
    counts = {"ok": 0, "failed": 0, "skipped": 0}
    for item in items:
        counts[item.get("status", "ok")] = counts.get(item.get("status", "ok"), 0) + 1
    kill_point("before-complete")
    manifest.write({"kind": "complete", "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **counts})
    released = perturbation
    if perturbation is not None and isinstance(perturbation.delta, PerturbationStore):
        perturbation.delta.close()  # the store goes with the state folder; its rows are in the saved files
        released = None
    info = dict(perturbation.info) if perturbation is not None else {}
    return ProtectResult(items, released, opts, run.dst, run.dst / MANIFEST_NAME, info=info)


def _store_factory(store_dir: Path, ids: list[str], fingerprint: dict[str, Any], runtime: Runtime,
                   record: dict[str, Any], progress: Progress):
    """``method.delta_store`` for ``--store disk``: a resumable method continues the store an interrupted
    run left (its final rows are skipped); any other method starts a fresh one."""
    def make(shape: tuple[int, ...], resumable: bool) -> PerturbationStore:
        if resumable:
            store = PerturbationStore.open_or_create(store_dir, shape, ids, fingerprint=fingerprint, device=runtime.device)
        else:
            store = PerturbationStore.create(store_dir, shape, ids, fingerprint=fingerprint, device=runtime.device)
        if store.done_rows:
            progress.log(f"resuming generation: {store.done_rows} of {len(store)} rows are already in {store_dir}")
        record["store_resumed_rows"] = store.done_rows
        return store
    return make


def _save_one(listing: FolderListing, dst: Path, entry: FolderEntry, target: PurePosixPath, working: WorkingSet,
              perturbation: Perturbation, row: int, opts: ProtectOptions) -> tuple[str, str | None, dict[str, Any]]:
    """Protect one file at its native size; every failure becomes a ``failed`` record, except a full or
    read-only output disk, which stops the run (:class:`FatalError`)."""
    source = listing.root / entry.relpath
    out_file = dst / target
    try:
        image = load_image(source, max_pixels=opts.max_pixels, keep_metadata=opts.keep_metadata)
        index = torch.tensor([row])
        delta = perturbation.for_samples(index, working.labels.cpu(), working.grayscale.cpu())[0]
        pixels = perturb_native(image.pixels, image.max_value, delta, perturbation.resample)
        fmt = resolve_format(opts.format, entry.relpath.suffix)
        save_image(out_file, image, pixels, fmt=fmt, quality=opts.quality, keep_metadata=opts.keep_metadata, root=dst)
        saved = load_image(out_file, max_pixels=opts.max_pixels)
    except ImageWriteError as error:
        if isinstance(error.__cause__, LinkError):
            raise FatalError(f"{error}. A link appeared in the output folder while the run was going; nothing was "
                             "written through it. Remove the link, then run the same command with --resume") from error
        if error.errno in FATAL_WRITE_ERRNOS:
            raise FatalError(f"{error}. Nothing partial was left under {target}; the finished files are kept. "
                             "Free space (or make the output writable), then run the same command with "
                             "--resume") from error
        return "failed", str(error), {}
    except (ImageFileError, OSError, ValueError) as error:
        return "failed", str(error), {}
    except MemoryError:  # this file alone is too large for the memory left: the others go on
        return "failed", f"{source}: not enough memory to protect this image at its native size", {}
    stats = _quality(image, saved)
    stats["within_budget"] = within_budget(stats, perturbation, tuple(working.images.shape[-2:]), (image.height, image.width))
    return "ok", None, {"output": str(target), "source_sha256": sha256_file(source),
                        "output_sha256": sha256_file(out_file), **stats, "size": [image.width, image.height],
                        **({"notes": list(image.notes)} if image.notes else {})}


# --------------------------------------------------------------------------------------------------
# in-memory input


def _to_nchw(array, layout: str) -> tuple[torch.Tensor, str]:
    tensor = torch.as_tensor(array)
    if tensor.dim() != 4:
        raise UsageError(f"in-memory images must be 4-D (N×C×H×W or N×H×W×C), got shape {tuple(tensor.shape)}")
    if layout == "auto":
        nchw, nhwc = tensor.shape[1] in (1, 3), tensor.shape[-1] in (1, 3)
        if nchw == nhwc:
            raise UsageError(f"cannot tell the channel axis of shape {tuple(tensor.shape)}; pass layout='NCHW' or 'NHWC'")
        layout = "NCHW" if nchw else "NHWC"
    if layout not in ("NCHW", "NHWC"):
        raise UsageError(f"layout must be 'auto', 'NCHW' or 'NHWC', got {layout!r}")
    tensor = tensor if layout == "NCHW" else tensor.permute(0, 3, 1, 2)
    if tensor.shape[1] not in (1, 3):
        raise UsageError(f"images must have 1 or 3 channels, got {tensor.shape[1]}")
    return tensor, layout


def _protect_array(array, labels, layout: str, opts: ProtectOptions, progress: Progress) -> ProtectResult:
    cls = METHODS.get(opts.method)
    pseudo = opts.label_source == "auto" and labels is None
    if labels is None and cls.needs_labels and not pseudo:
        raise UsageError("in-memory input needs labels= (one int per image), or labels='auto' for pseudo-labels")
    if pseudo and cls.needs_labels:
        _check_pseudo_labels(opts)
    if opts.store == "disk":
        raise UsageError("store='disk' is for folder input; in-memory input returns δ applied to the array in memory")
    images, layout = _to_nchw(array, layout)
    is_uint8 = images.dtype == torch.uint8
    if not is_uint8 and not images.is_floating_point():
        raise UsageError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    x = images.float().div(255) if is_uint8 else images.float()
    if not is_uint8 and (x.min() < 0 or x.max() > 1):
        raise UsageError("float images must hold values in [0, 1]")
    if labels is not None:
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long).flatten()
        if y.numel() != x.shape[0] or bool((y < 0).any()):
            raise UsageError(f"labels must be {x.shape[0]} non-negative ints, got {y.numel()}")
    else:
        y = torch.full((x.shape[0],), -1, dtype=torch.long)
    gray = torch.full((x.shape[0],), x.shape[1] == 1)
    x3 = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    num_classes = int(y.max()) + 1 if labels is not None else 0
    size = opts.size
    working_x = resize_float(x3, (size, size)) if size else x3
    working = WorkingSet(torch.round(working_x.clamp(0, 1) * 255).to(torch.uint8), y, gray,
                         tuple(str(k) for k in range(num_classes)), [str(i) for i in range(x.shape[0])])
    runtime = make_runtime(opts.device, opts.precision, opts.compile)
    work_size = size or max(x.shape[-2:])
    info: dict[str, Any] = {}
    if pseudo and cls.needs_labels:
        clustering, working, _ = _pseudo_labels(opts, work_size, working, runtime, progress)
        y, num_classes = working.labels, working.num_classes
        info["pseudo_labels"] = clustering.record()
    method, _ = _build_method(opts, work_size, max(num_classes, 1), runtime, progress)
    perturbation = method(working)
    delta = perturbation.for_samples(torch.arange(len(working)), y, gray).cpu()
    if perturbation.resample == "nearest":
        delta = torch.nn.functional.interpolate(delta, size=tuple(x.shape[-2:]), mode="nearest")[:, : x.shape[1]]
    else:
        delta = resize_float(delta, tuple(x.shape[-2:]))[:, : x.shape[1]]
    protected = (x + delta).clamp_(0, 1)
    if is_uint8:
        protected = torch.round(protected * 255).to(torch.uint8)
        change = (protected.float() - images.float()).abs().div(255)
    else:
        protected = protected.to(images.dtype)
        change = (protected.float() - x).abs()
    items = []
    for i in range(x.shape[0]):
        stats = change_stats(change[i].permute(1, 2, 0).double().numpy())
        stats["within_budget"] = within_budget(stats, perturbation, tuple(working.images.shape[-2:]), tuple(x.shape[-2:]))
        items.append({"index": i, "label": int(y[i]) if y[i] >= 0 else None, **stats})
    out = protected if layout == "NCHW" else protected.permute(0, 2, 3, 1)
    if isinstance(array, np.ndarray):
        out = out.contiguous().numpy()
    else:
        out = out.contiguous().to(array.device)
    return ProtectResult(items, perturbation, opts, data=out, info={**info, **perturbation.info},
                         labels=y if labels is None else None)
