"""One ``protect`` run over several processes: ``torchrun --nproc-per-node N -m ueguard protect ...``.

torchrun starts N copies of the command and sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``;
:func:`setup` reads them and joins the process group (gloo on CPU, NCCL on CUDA with one GPU per local
rank). Nothing here schedules work itself: ranks split the work by sample id and meet in collectives.

How a model-based method splits its work (EMN; see :class:`~ueguard.methods.emn.EMN`):

* **Surrogate steps** (outer): every rank draws the same global batch of ``batch_size`` ids from the
  shared seed, takes its contiguous part (``batch_size / N`` ids, ±1), and steps a
  ``DistributedDataParallel`` surrogate. Gradients are averaged weighted by part size, so the update is
  that of the global batch's mean loss — the single-process step — whatever N. Train-mode BatchNorm
  normalises with the statistics of the rank's part (``SyncBatchNorm`` would need CUDA; on CUDA it is
  used); the running statistics are averaged over ranks after each round's steps, which for the running
  mean equals the global batch's exactly.
* **Sample-wise PGD** (inner): each rank optimises δ of its own contiguous block of sample ids, in
  batches of ``batch_size`` (eval mode: every sample's gradient is independent of its batch mates), and
  the blocks are all-gathered after the pass so every rank holds the whole δ for the next outer steps.
* **Class-wise PGD**: the batches are the single-process ones, each split over the ranks; the per-class
  gradient sums are all-reduced before each signed step, so δ_k follows the same trajectory.
* **Stop criterion**: each rank evaluates its part of the check set; correct counts are all-reduced.
* **``--store disk``**: rank 0 keeps δ in the on-disk store (it alone writes files), the other ranks in
  memory; the all-gather after each pass writes every block into each rank's δ, store or tensor.
* **Round checkpoints** (``protect --resume``): after each round every rank sends rank 0 what is its
  own — the augmentation generator and the global torch RNG — and rank 0 writes one checkpoint with the
  shared state (surrogate, optimiser, sampler, shared generator, δ, which every rank holds whole after
  the all-gather) and the per-rank states. On resume rank 0 reads it, decides for every rank whether it
  applies (same settings and the same number of processes), broadcasts the state, and each rank takes
  its own part; δ is broadcast from rank 0 in row blocks. The run then continues as the uninterrupted
  one would have.

Failures: collectives time out after ``UEGUARD_DIST_TIMEOUT`` seconds (default 1800), so a rank that
died mid-run cannot leave the others waiting forever (torchrun also stops the others when one exits
with an error). Before generation, rank 0 sends the other ranks one :class:`Handoff`: the working set,
or why it stopped — so a usage error on rank 0 ends every rank at once.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from ueguard.errors import PeerStopped

ENV_KEYS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
TIMEOUT_ENV = "UEGUARD_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: ``rank`` of ``world_size`` (``local_rank`` picks its GPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def record(self) -> dict[str, Any]:
        """What the manifest stores about the run's processes."""
        backend = tdist.get_backend() if self.enabled else None
        return {"world_size": self.world_size, "backend": backend}

    # -- splitting work by sample id ------------------------------------------------------------

    def shard(self, n: int) -> slice:
        """This rank's contiguous block of the ids ``0..n-1`` (blocks differ in size by at most one)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def part(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a batch of ids that every rank holds."""
        return index[self.shard(index.numel())]

    # -- collectives (no-ops in a single process) ----------------------------------------------

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place."""
        if self.enabled:
            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor

    def all_gather_shards(self, rows):
        """Make every rank's copy of ``rows`` (``n×...``: a tensor, or anything indexed like one — rank 0's
        on-disk :class:`~ueguard.data.store.PerturbationStore`) whole: rank r's block ``shard(n)`` is the
        valid one; the blocks are exchanged (padded to equal size, as the collective requires) and written
        in place."""
        if not self.enabled:
            return rows
        n = rows.shape[0]
        width = -(-n // self.world_size)
        mine = rows[self.shard(n)]
        padded = torch.zeros(width, *mine.shape[1:], dtype=mine.dtype, device=mine.device)
        padded[:mine.shape[0]] = mine
        blocks = [torch.empty_like(padded) for _ in range(self.world_size)]
        tdist.all_gather(blocks, padded)
        for r, block in enumerate(blocks):
            span = Distributed(r, self.world_size).shard(n)
            rows[span] = block[:span.stop - span.start]
        return rows

    def broadcast_rows(self, rows, chunk: int = 4096):
        """Make every rank's ``rows`` (a tensor, or rank 0's on-disk store) equal rank 0's, ``chunk`` rows
        at a time (a resumed run's δ, which only rank 0 read back)."""
        if not self.enabled:
            return rows
        n = rows.shape[0]
        for start in range(0, n, chunk):
            span = slice(start, min(n, start + chunk))
            block = rows[span].contiguous() if self.is_main else torch.empty_like(rows[span])
            _broadcast_tensor(block)
            if not self.is_main:
                rows[span] = block
        return rows

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's picklable ``obj`` on every rank (tensors inside travel as part of the pickle)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def data_parallel(self, model: nn.Module, device: torch.device) -> "DataParallel":
        return DataParallel(self, model, device)

    def generator_for_rank(self, generator: torch.Generator, seed: int) -> torch.Generator:
        """The generator for draws each rank makes for its own samples (augmentation): ``generator``
        itself in a single process (runs stay as they were), else one seeded by (seed, rank), so that
        the shared ``generator`` — which picks the global batches — stays in step on every rank."""
        if not self.enabled:
            return generator
        return torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (self.rank + 1))


SINGLE = Distributed()


def environment() -> Distributed:
    """The rank layout torchrun's environment describes (a single process when it is absent)."""
    if not all(key in os.environ for key in ENV_KEYS):
        return SINGLE
    try:
        world, rank, local = (int(os.environ[key]) for key in ENV_KEYS)
    except ValueError:
        raise ValueError(f"torchrun's environment is malformed: {', '.join(f'{k}={os.environ[k]!r}' for k in ENV_KEYS)}") from None
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise ValueError(f"inconsistent torchrun environment: WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local}")
    return Distributed(rank, world, local)


def current() -> Distributed:
    """This process's place in an initialised process group, or :data:`SINGLE`."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return SINGLE
    return Distributed(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw}")
    return datetime.timedelta(seconds=seconds)


def setup(device: str = "auto") -> tuple[Distributed, bool]:
    """Join the process group torchrun describes, if any; returns (layout, whether this call created the
    group — the caller then destroys it with :func:`teardown`). ``device`` is the run's ``--device``:
    CUDA ranks use NCCL and GPU ``LOCAL_RANK``; CPU ranks use gloo."""
    layout = environment()
    if not layout.enabled or tdist.is_initialized():
        return current() if layout.enabled else layout, False
    if not tdist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; run without torchrun")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if layout.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {layout.local_rank} has no GPU: {torch.cuda.device_count()} visible; "
                               "start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(layout.local_rank)
    tdist.init_process_group("nccl" if use_cuda else "gloo", rank=layout.rank, world_size=layout.world_size,
                             timeout=timeout())
    return layout, True


def teardown(created: bool, clean: bool = True) -> None:
    """Leave the process group. After a ``clean`` run every rank first waits at a barrier (rank 0 may
    still be saving files; the wait is bounded by ``UEGUARD_DIST_TIMEOUT``): a rank that tore its group
    down while a peer was still connected intermittently aborted in gloo's threads ("terminate called
    without an active exception"). After an error there is no barrier — the peers may be inside another
    collective — and the group is destroyed at once."""
    if created and tdist.is_initialized():
        try:
            if clean:
                tdist.barrier()
        finally:
            tdist.destroy_process_group()


class DataParallel:
    """The surrogate for the outer (training) steps: a ``DistributedDataParallel`` wrapper whose gradient
    average is weighted by each rank's share of the global batch, or the model itself in one process.

    ``part(ids)`` gives this rank's part of a global batch and sets its weight; ``sync_buffers()``
    averages the BatchNorm running statistics over the ranks (buffers are not broadcast at each forward,
    so the eval-mode PGD steps of every rank see the same, global-batch statistics)."""

    def __init__(self, layout: Distributed, model: nn.Module, device: torch.device) -> None:
        self.layout = layout
        self.model = model
        self.weight = 1.0
        if not layout.enabled:
            self.module: nn.Module = model
            return
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.model = model
        ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
        self.module = DistributedDataParallel(model, device_ids=ids, **_no_forward_buffer_sync())
        self.module.register_comm_hook(self, _weighted_allreduce)

    def part(self, index: torch.Tensor) -> torch.Tensor:
        if not self.layout.enabled:
            return index
        mine = self.layout.part(index)
        self.weight = mine.numel() / max(1, index.numel())
        return mine

    def sync_buffers(self) -> None:
        if not self.layout.enabled:
            return
        for buffer in self.model.buffers():
            if buffer.is_floating_point():
                tdist.all_reduce(buffer, op=tdist.ReduceOp.SUM)
                buffer.div_(self.layout.world_size)


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP's switch for "do not broadcast rank 0's buffers before each forward" (renamed in newer torch)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    names = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}


def _weighted_allreduce(state: DataParallel, bucket):
    """DDP communication hook: Σ_r (b_r / B) · ∇L_r — the gradient of the global batch's mean loss when
    rank r's loss is the mean over its b_r of the B samples."""
    tensor = bucket.buffer().mul_(state.weight)
    future = tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM, async_op=True).get_future()
    return future.then(lambda done: done.value()[0])


class Handoff:
    """Rank 0's single message to the other ranks before generation: ``work`` (a picklable header plus
    tensors, sent by broadcast rather than pickled) or ``stop`` (rank 0 finished without them, or failed:
    ``kind`` is ``usage``, ``fatal`` or ``interrupted`` so every rank exits alike). Sent exactly once;
    :meth:`stop` after a send is a no-op, so rank 0 can call it unconditionally on its way out."""

    def __init__(self, layout: Distributed) -> None:
        self.layout = layout
        self.sent = not layout.enabled

    def work(self, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        specs = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
        self._send({"action": "work", "header": header, "tensors": specs})
        for name in specs:
            _broadcast_tensor(tensors[name].contiguous())

    def stop(self, kind: str = "finished", message: str = "") -> None:
        if not self.sent:
            self._send({"action": "stop", "kind": kind, "message": message})

    def _send(self, message: dict[str, Any]) -> None:
        self.sent = True
        self.layout.broadcast(message)

    @staticmethod
    def receive(layout: Distributed) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """On a non-zero rank: rank 0's work, ``None`` if it finished without the others, or
        :class:`PeerStopped` if it failed."""
        message = layout.broadcast()
        if message["action"] == "stop":
            if message["kind"] == "finished":
                return None
            raise PeerStopped(f"rank 0 stopped ({message['kind']}): {message['message']}", message["kind"])
        tensors = {}
        for name, (shape, dtype) in message["tensors"].items():
            tensors[name] = _broadcast_tensor(torch.empty(shape, dtype=dtype))
        return message["header"], tensors


def _broadcast_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` into every rank's (same shape and dtype); through the GPU under NCCL, and as
    uint8 for bool (gloo has no bool type)."""
    staged = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
    if tdist.get_backend() == "nccl":
        staged = staged.to(torch.device("cuda", torch.cuda.current_device()))
    tdist.broadcast(staged, src=0)
    if staged is not tensor:
        tensor.copy_(staged)
    return tensor
