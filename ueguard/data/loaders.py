"""How an image folder reaches the training loops: ``--loader auto|memory|ffcv|torch``.

Every loader decodes the same way — :func:`ueguard.data.working_set.decode_working`
(:func:`ueguard.data.images.load_image`, then uint8 ``3×S×S``) — so the pixels, labels and grayscale
flags they yield are identical; they differ in where the decoding happens and whether the whole set is
held at once:

* ``memory`` — a thread pool decodes every image into one uint8 ``N×3×S×S`` tensor that lives on the
  device (airbench-style: the fastest loop when it fits).
* ``torch`` — a ``torch.utils.data.DataLoader`` (worker processes, Pillow decoding) streams batches;
  nothing but the batch in flight is held. Batch order follows the caller's generator exactly as the
  memory loop does.
* ``ffcv`` — the folder is converted once, at the working resolution, into an FFCV ``.beton`` file
  and read back with FFCV's compiled loader. Images are stored *raw* (uint8, exactly the working
  pixels): a JPEG-compressed cache would itself be a JPEG-compression defense against the
  perturbations ``verify`` is testing. The cache is keyed by a hash of the folder listing (relative
  paths, sizes, modification times, labels) and of the options that change its content (working size,
  pixel limit), so a changed folder gets a new cache and an unchanged one is reused. Shuffled order
  comes from FFCV's own seeded permutation (a seed drawn from the caller's generator), so streamed
  batches differ in order, not in content, from the memory loop's.
* ``auto`` — ``memory`` when the working set (N·3·S² bytes) fits :func:`memory_limit`, else ``ffcv``
  when it is installed, else ``torch``.

FFCV is an optional extra (``pip install 'ueguard[ffcv]'``; it needs ``libopencv-dev
libturbojpeg0-dev pkg-config`` to build); asking for it without it installed is a usage error that
says what to install.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ueguard.data.folder import FolderEntry, FolderListing
from ueguard.data.images import DEFAULT_MAX_PIXELS, ImageReadError
from ueguard.data.working_set import WorkingSet, decode_working, load_folder_working_set
from ueguard.errors import UsageError

LOADERS = ("auto", "memory", "ffcv", "torch")
#: Bump when the cache layout changes, so old caches are not read with new code.
CACHE_VERSION = 1
FFCV_INSTALL_HINT = ("FFCV is not installed. It is an optional extra: install the system libraries "
                     "(Debian/Ubuntu: `apt-get install -y libopencv-dev libturbojpeg0-dev pkg-config`), then "
                     "`pip install 'ueguard[ffcv]'` (or `pip install ffcv`); or choose --loader torch or memory")


@contextlib.contextmanager
def _torch_threads_kept() -> Iterator[None]:
    """Undo FFCV's ``torch.set_num_threads``: importing ffcv, building a ``Loader`` and starting a pass
    each set torch's intra-op threads to FFCV's worker count (1 at import), which would silently
    slow — and, through reduction order, change — every later training or PGD step of the run."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        _restore_threads(threads)


def _restore_threads(threads: int) -> None:
    """Set torch's intra-op thread count back to ``threads``, in this thread and from a fresh one.

    FFCV sets it (torch's and numba's, which share OpenMP) at import, in ``Loader()``, in ``iter()`` and
    again from its epoch thread when that starts, after ``iter()`` has returned. Restoring once in
    this thread did not always hold: a later protect in the process ran at 1 thread in 2 of 3 runs
    (different pixels from the same protect at 2). Restoring at the first batch of a pass, here and
    from a fresh thread, held in 5 of 5 (``test_after_an_ffcv_pass_protect_keeps_its_threads_and_pixels``)."""
    torch.set_num_threads(threads)
    helper = threading.Thread(target=torch.set_num_threads, args=(threads,), name="ueguard-threads")
    helper.start()
    helper.join()


def ffcv_available() -> bool:
    """Whether FFCV imports (it needs numba and OpenCV; a broken install counts as missing)."""
    try:
        with _torch_threads_kept():
            import ffcv.loader  # noqa: F401
            import ffcv.writer  # noqa: F401
    except Exception:
        return False
    return True


def require_ffcv() -> None:
    if not ffcv_available():
        raise UsageError(f"--loader ffcv: {FFCV_INSTALL_HINT}")


def default_cache_dir() -> Path:
    """``$UEGUARD_CACHE``, else ``$XDG_CACHE_HOME/ueguard``, else ``~/.cache/ueguard``: never under the
    source folder (read-only to ueguard) nor the output folder (removed state would drop the cache)."""
    if os.environ.get("UEGUARD_CACHE"):
        return Path(os.environ["UEGUARD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ueguard"


def memory_limit(device: torch.device | str = "cpu") -> int:
    """Bytes the working set may take and still count as fitting: half the free memory of a CUDA
    device, half the physical memory otherwise (the rest is for models, activations, δ)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def working_bytes(n: int, size: int) -> int:
    return n * 3 * size * size


def resolve_loader(name: str, n: int, size: int, device: torch.device | str = "cpu",
                   limit: int | None = None) -> str:
    """The concrete loader for ``name`` (see the module docstring for ``auto``). ``ffcv`` without
    FFCV installed is a :class:`UsageError` naming what to install."""
    if name not in LOADERS:
        raise UsageError(f"invalid loader {name!r}; choose one of {', '.join(LOADERS)}")
    if name == "ffcv":
        require_ffcv()
    if name != "auto":
        return name
    if working_bytes(n, size) <= (memory_limit(device) if limit is None else limit):
        return "memory"
    return "ffcv" if ffcv_available() else "torch"


# --------------------------------------------------------------------------------------------------
# the decoded folder as a dataset


class FolderImages(torch.utils.data.Dataset):
    """``entries`` of ``listing`` decoded at ``size``: item ``i`` is ``(uint8 3×S×S, label, gray, ok)``.

    An unreadable file gives a zero image with ``ok = 0`` instead of raising, so one bad file cannot
    stop a worker process; :meth:`error` re-reads it in the caller's process for the message."""

    def __init__(self, listing: FolderListing, entries: Sequence[FolderEntry], size: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.root, self.entries, self.size, self.max_pixels = listing.root, list(entries), size, max_pixels

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool, bool]:
        entry = self.entries[i]
        label = -1 if entry.label is None else entry.label
        try:
            working, gray = decode_working(self.root / entry.relpath, self.size, self.max_pixels)
        except ImageReadError:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), label, False, False
        return working, label, gray, True

    def error(self, i: int) -> ImageReadError:
        try:
            decode_working(self.root / self.entries[i].relpath, self.size, self.max_pixels)
        except ImageReadError as error:
            return error
        return ImageReadError(self.root / self.entries[i].relpath, "could not be read earlier (transient?)")


def _stack(batch):
    images, labels, gray, ok = zip(*batch)
    return (torch.stack(images), torch.tensor(labels, dtype=torch.long), torch.tensor(gray, dtype=torch.bool),
            torch.tensor(ok, dtype=torch.bool))


def default_workers() -> int:
    """Decoding workers: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


# --------------------------------------------------------------------------------------------------
# the FFCV cache


def cache_key(listing: FolderListing, entries: Sequence[FolderEntry], size: int,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """SHA-256 of everything the cache's content depends on: the folder (resolved root, classes, and per
    file its relative path, label, byte size and modification time in ns) and the decoding options."""
    digest = hashlib.sha256()
    head = {"version": CACHE_VERSION, "root": str(listing.root.resolve()), "classes": list(listing.classes),
            "size": size, "max_pixels": max_pixels}
    digest.update(json.dumps(head, sort_keys=True).encode())
    for entry in entries:
        stat = (listing.root / entry.relpath).stat()
        digest.update(f"\n{entry.relpath}\t{entry.label}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


class _RowsForFFCV:
    """What FFCV's writer reads: ``(H×W×3 uint8, label, gray, ok)`` per row."""

    def __init__(self, images: FolderImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image, label, gray, ok = self.images[i]
        return image.permute(1, 2, 0).numpy().copy(), label, int(gray), int(ok)


@dataclass(frozen=True)
class FFCVCache:
    """A ``.beton`` file of one folder at one working size, and its sidecar (ids, unreadable rows)."""

    path: Path
    key: str
    ids: tuple[str, ...]
    failed: tuple[tuple[int, str], ...]  # (row, reason) of files that could not be read
    reused: bool

    @property
    def rows(self) -> int:
        return len(self.ids)


def ffcv_cache(listing: FolderListing, entries: Sequence[FolderEntry], size: int, *,
               max_pixels: int = DEFAULT_MAX_PIXELS, cache_dir: str | os.PathLike | None = None,
               workers: int | None = None) -> FFCVCache:
    """The FFCV dataset of ``entries`` at ``size``: reused when a cache with the same key exists, else
    written (to a temporary name, renamed when complete, so a killed conversion leaves no cache that
    looks valid)."""
    require_ffcv()
    with _torch_threads_kept():
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter

    key = cache_key(listing, entries, size, max_pixels)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / "ffcv"
    path, meta_path = folder / f"{key[:40]}.beton", folder / f"{key[:40]}.json"
    ids = tuple(str(e.relpath) for e in entries)
    if path.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("key") == key and tuple(meta.get("ids", ())) == ids:
            return FFCVCache(path, key, ids, tuple((int(r), str(m)) for r, m in meta["failed"]), reused=True)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--cache-dir {folder.parent}: cannot create the FFCV cache folder ({error})") from None
    images = FolderImages(listing, entries, size, max_pixels)
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField(), "gray": IntField(), "ok": IntField()}
    writer = DatasetWriter(str(tmp), fields, num_workers=workers or default_workers(), page_size=1 << 22)
    if len(images):
        writer.from_indexed_dataset(_RowsForFFCV(images), chunksize=64)
    else:
        raise UsageError(f"{listing.root}: no images to convert into an FFCV cache")
    ok = _read_field(tmp, "ok", len(images))
    failed = tuple((int(i), images.error(int(i)).reason) for i in np.flatnonzero(ok == 0))
    os.replace(tmp, path)
    meta_tmp = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
    meta_tmp.write_text(json.dumps({"key": key, "root": str(listing.root.resolve()), "size": size,
                                    "ids": list(ids), "failed": [list(f) for f in failed]}) + "\n")
    os.replace(meta_tmp, meta_path)
    return FFCVCache(path, key, ids, failed, reused=False)


def _read_field(path: Path, name: str, n: int) -> np.ndarray:
    """One integer field of a ``.beton`` as an array, read through FFCV's metadata (no image decoding)."""
    with _torch_threads_kept():
        from ffcv.reader import Reader

    reader = Reader(str(path))
    return np.asarray(reader.metadata[f"f{reader.field_names.index(name)}"][:n]).reshape(-1)


def ffcv_loader(cache: FFCVCache, batch_size: int, *, indices: Sequence[int] | None = None,
                shuffle_seed: int | None = None, drop_last: bool = False, workers: int | None = None):
    """An FFCV ``Loader`` over the cache yielding ``(uint8 N×3×S×S, label, gray, ok)`` CPU batches, in row
    order, or shuffled by FFCV's permutation of ``shuffle_seed`` + epoch. Its batches are FFCV's reused
    buffers: use or copy them before asking for the next one."""
    with _torch_threads_kept():
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

    def ints():
        return [IntDecoder(), ToTensor(), Squeeze(1)]

    with _torch_threads_kept():
        return Loader(str(cache.path), batch_size=batch_size, num_workers=workers or default_workers(),
                  order=OrderOption.SEQUENTIAL if shuffle_seed is None else OrderOption.RANDOM,
                  seed=shuffle_seed, drop_last=drop_last,
                  indices=None if indices is None else np.asarray(indices, dtype=np.int64),
                  pipelines={"image": [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage(channels_last=False)],
                             "label": ints(), "gray": ints(), "ok": ints()})


def _ffcv_pass(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    threads = torch.get_num_threads()
    with _torch_threads_kept():
        batches = iter(loader)
    first = True
    for images, labels, gray, ok in batches:
        if first:  # by the first batch FFCV's epoch thread has set the count: set it back
            _restore_threads(threads)
            first = False
        yield images, labels.long().reshape(-1), gray.bool().reshape(-1), ok.bool().reshape(-1)


def ffcv_batches(cache: FFCVCache, batch_size: int, **options):
    """One pass of :func:`ffcv_loader` (same arguments)."""
    return _ffcv_pass(ffcv_loader(cache, batch_size, **options))


# --------------------------------------------------------------------------------------------------
# a whole working set through any loader


def load_working_set(listing: FolderListing, entries: Sequence[FolderEntry], size: int, loader: str = "memory", *,
                     max_pixels: int = DEFAULT_MAX_PIXELS, cache_dir: str | os.PathLike | None = None,
                     workers: int | None = None,
                     on_error: Callable[[FolderEntry, ImageReadError], None] | None = None,
                     on_progress: Callable[[], None] | None = None,
                     spill: str | os.PathLike | None = None) -> tuple[WorkingSet, list[FolderEntry]]:
    """:func:`load_folder_working_set` through ``loader`` (a concrete name: memory, torch or ffcv): the
    same working set, decoded by a thread pool, DataLoader workers, or read from the FFCV cache.

    ``spill`` (torch and ffcv only): a ``.npy`` file the images are decoded into instead of memory.
    The working set's images are then that file, memory-mapped (:attr:`WorkingSet.backing`): the
    methods read their batches from it by index and the operating system pages them in and out, so a
    set larger than memory is protected without holding it. Only labels and flags stay in memory."""
    if loader == "memory":
        return load_folder_working_set(listing, entries, size, max_pixels=max_pixels, on_error=on_error,
                                       on_progress=on_progress)
    entries = list(entries)
    if loader == "ffcv":
        cache = ffcv_cache(listing, entries, size, max_pixels=max_pixels, cache_dir=cache_dir, workers=workers)
        failures = {row: reason for row, reason in cache.failed}
        batches = ffcv_batches(cache, 256, workers=workers)
    elif loader == "torch":
        dataset = FolderImages(listing, entries, size, max_pixels)
        failures = None
        batches = iter(torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=_torch_workers(workers, len(dataset)),
                                                   collate_fn=_stack))
    else:
        raise UsageError(f"invalid loader {loader!r}; choose one of {', '.join(LOADERS[1:])}")
    if spill is not None:
        mapped = np.lib.format.open_memmap(spill, mode="w+", dtype=np.uint8, shape=(len(entries), 3, size, size))
        images = torch.from_numpy(mapped)
    else:
        images = torch.empty(len(entries), 3, size, size, dtype=torch.uint8)
    labels = torch.empty(len(entries), dtype=torch.long)
    gray = torch.empty(len(entries), dtype=torch.bool)
    ok = torch.empty(len(entries), dtype=torch.bool)
    start = 0
    for x, y, g, good in batches:
        stop = start + len(y)
        images[start:stop], labels[start:stop], gray[start:stop], ok[start:stop] = x, y, g, good
        if on_progress is not None:
            for _ in range(len(y)):
                on_progress()
        start = stop
    kept = [e for e, good in zip(entries, ok.tolist()) if good]
    for row in np.flatnonzero(~ok.numpy()).tolist():
        if on_error is not None:
            error = (ImageReadError(listing.root / entries[row].relpath, failures[row]) if failures is not None
                     and row in failures else dataset.error(row))
            on_error(entries[row], error)
    keep = ok.nonzero().flatten()
    ids = [str(e.relpath) for e in kept]
    if spill is None:
        return WorkingSet(images[keep].contiguous(), labels[keep], gray[keep], listing.classes, ids), kept
    _compact(images, keep)  # drop the unreadable rows in place: the file is never copied into memory
    mapped.flush()
    working = WorkingSet(images[:len(keep)], labels[keep], gray[keep], listing.classes, ids, backing=Path(spill))
    return working, kept


def _compact(images: torch.Tensor, keep: torch.Tensor, rows: int = 1024) -> None:
    """``images[:len(keep)] = images[keep]`` in place, ``rows`` at a time. ``keep`` is increasing, so
    ``keep[j] >= j``: a chunk's writes land below every row a later chunk reads."""
    if len(keep) == len(images):
        return
    for start in range(0, len(keep), rows):
        stop = min(start + rows, len(keep))
        images[start:stop] = images[keep[start:stop]]  # (the gather copies before the write)


#: Below this many images the torch loader decodes in-process: starting worker processes (each imports
#: torch) costs more than decoding that many working-size images.
TORCH_WORKER_MIN_IMAGES = 2048


def _torch_workers(workers: int | None, n: int) -> int:
    if workers is not None:
        return workers
    return default_workers() if n >= TORCH_WORKER_MIN_IMAGES else 0


# --------------------------------------------------------------------------------------------------
# streamed training batches


class StreamedSet:
    """A training set that is read batch by batch instead of held: ``len``, and :meth:`epochs`, shuffled
    passes of ``(uint8 images, labels)`` batches on ``device``.

    ``torch``: the batch order is the caller's ``BatchSampler`` permutation (same order as the memory
    loop, so a run matches the memory loop's exactly); ``ffcv``: FFCV's permutation of a seed drawn from
    the caller's generator. ``problems`` lists unreadable files (``"<path>: <reason>"``): known up front
    with ``ffcv`` (the conversion decoded everything), found during the first epoch with ``torch``,
    whose batches then simply lack them. ``held`` is for a caller that loads the set whole after all."""

    def __init__(self, listing: FolderListing, entries: Sequence[FolderEntry], size: int, loader: str, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS, cache_dir: str | os.PathLike | None = None,
                 workers: int | None = None) -> None:
        self.loader, self.size, self.workers, self.listing = loader, size, workers, listing
        self.held: WorkingSet | None = None
        self.problems: list[str] = []
        entries = list(entries)
        self.entries = entries
        if loader == "ffcv":
            self.cache = ffcv_cache(listing, entries, size, max_pixels=max_pixels, cache_dir=cache_dir,
                                    workers=workers)
            bad = {row for row, _ in self.cache.failed}
            self.rows = [i for i in range(len(entries)) if i not in bad]
            self.problems.extend(f"{listing.root / entries[row].relpath}: {reason}" for row, reason in self.cache.failed)
        elif loader == "torch":
            self.dataset = FolderImages(listing, entries, size, max_pixels)
            self.rows = list(range(len(entries)))
            self._failed_rows: set[int] = set()
        else:
            raise UsageError(f"only the ffcv and torch loaders stream; got {loader!r}")
        self.ids = [str(entries[i].relpath) for i in self.rows]
        self.classes = listing.classes

    def __len__(self) -> int:
        return len(self.rows)

    def epochs(self, sampler, generator: torch.Generator,
               device: torch.device | str) -> Iterator[Iterator[tuple[torch.Tensor, torch.Tensor]]]:
        """Endless passes, each ``sampler.steps_per_epoch()`` batches of ``sampler.batch_size``. One FFCV
        loader serves all passes of a run (FFCV compiles its pipeline once per loader)."""
        if self.loader == "torch":
            while True:
                yield self._torch_epoch(sampler, device)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        loader = ffcv_loader(self.cache, sampler.batch_size, indices=self.rows, shuffle_seed=seed,
                             drop_last=sampler.drop_last, workers=self.workers)
        while True:
            yield ((x.to(device, copy=True), y.to(device, copy=True)) for x, y, _, _ in _ffcv_pass(loader))

    def _torch_epoch(self, sampler, device):
        order = [[self.rows[i] for i in idx.tolist()] for idx in sampler.epoch()]
        batches = torch.utils.data.DataLoader(self.dataset, batch_sampler=order, collate_fn=_stack,
                                              num_workers=_torch_workers(self.workers, len(self.dataset)),
                                              pin_memory=torch.device(device).type == "cuda")
        for rows, (x, y, _, ok) in zip(order, batches):
            if not bool(ok.all()):
                self._record_failures([r for r, good in zip(rows, ok.tolist()) if not good])
                x, y = x[ok], y[ok]
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def _record_failures(self, rows: list[int]) -> None:
        for row in rows:
            if row not in self._failed_rows:
                self._failed_rows.add(row)
                self.problems.append(str(self.dataset.error(row)))
