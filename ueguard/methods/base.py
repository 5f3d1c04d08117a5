"""The protection-method base: configuration, presets, and the bookkeeping every method shares.

A method is a frozen dataclass config plus a small class (torchattacks' shape). The base owns the
budget presets, seeding, the ε-ball / valid-range projection and the grayscale constraint, so a
subclass writes only its own optimisation steps. Every method maps a :class:`WorkingSet` to a
:class:`Perturbation` — sample-wise δ keyed by sample index, or class-wise δ keyed by label.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from ueguard.data.store import PerturbationStore, RoundCheckpoint, StoreError
from ueguard.data.working_set import WorkingSet
from ueguard.engine import distributed
from ueguard.engine.augment import crop_flip, roll_rows
from ueguard.engine.eot import squeeze_kinds, squeezed
from ueguard.engine.loops import BatchSampler, OptimConfig, Trainer, batch_ranges, predict
from ueguard.engine.progress import SILENT, Progress
from ueguard.engine.runtime import Runtime
from ueguard.budgets import BUDGETS
from ueguard._registry import Registry


#: The norms a method's budget can be stated in. ``linf``: every value moves by at most ε (the CLI's
#: ``--eps``); ``l2``: the Euclidean length of each image's δ at the working resolution is at most the
#: method's ``l2_eps``; ``l0``: at most that many pixel positions change.
NORMS = ("linf", "l2", "l0")

#: Names in a method's checkpointed ``tracked`` states that differ per torchrun rank (each rank's own
#: augmentation generator); under torchrun they are saved and restored per rank.
RANK_LOCAL = ("augment_generator",)


class RankFollower:
    """A non-zero torchrun rank's stand-in for rank 0's :class:`RoundCheckpoint`: it reads and writes
    nothing (rank 0 alone holds the file) but tells the method to take part in checkpointing, whose
    collectives every rank must join."""

    path = "rank 0's round checkpoint"

    def load(self) -> None:
        return None

    def save(self, state: dict[str, Any], delta: Any) -> None:  # pragma: no cover - rank 0 writes
        raise RuntimeError("a non-zero rank does not write the round checkpoint")

    def remove(self) -> None:
        pass

    def log(self, message: str) -> None:
        pass


#: One grey level of 8-bit output in [0, 1] units: a budget below it changes no value by a full level,
#: so saving the image rounds (nearly) all of the change away.
GREY_LEVEL = 1 / 255


#: Why an L2 budget (``-o l2_eps``) has the bounds it has: ‖δ‖₂ bounds every value of δ, so below 1/255
#: none reaches a grey level; above 2000 it exceeds ‖1‖₂ of a 3×1024×1024 image (≈ 1774), the most a
#: working image of the largest size can change.
L2_BUDGET_WHY = ("below 1/255 every value of δ is under one grey level, which 8-bit output rounds away; "
                 "above 2000 it exceeds the change any working image (at most 1024 px) can take")


class OptionError(ValueError):
    """A config field given a value of the wrong type or outside its declared :class:`Bounds`; the
    message names the field, the value and what is valid."""


@dataclass(frozen=True)
class Bounds:
    """The valid values of a config field, declared with :func:`option`: a closed range ``low``..``high``
    (``low`` itself excluded when ``above``) for numbers, or ``choices`` for text. ``why`` explains a
    bound that is not obvious (shown in the error). Upper bounds are what a run can afford: a step
    count, a width or a size beyond them would run for days or allocate more memory than any machine
    has, so they are refused before anything is written."""

    low: float | None = None
    high: float | None = None
    above: bool = False
    choices: tuple[str, ...] = ()
    why: str = ""

    def admits(self, value: float | str) -> bool:
        if self.choices:
            return value in self.choices
        low_ok = self.low is None or (value > self.low if self.above else value >= self.low)
        return low_ok and (self.high is None or value <= self.high)

    def describe(self, kind: str) -> str:
        """``'an integer from 1 to 10000'``-style text for a field of ``kind`` (int, float, str)."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        noun = {"int": "an integer", "float": "a number"}.get(kind, kind)
        if self.low is not None and self.high is not None and not self.above:
            return f"{noun} from {_number(self.low)} to {_number(self.high)}"
        parts = ([] if self.low is None else [f"{'above' if self.above else 'at least'} {_number(self.low)}"]) + \
                ([] if self.high is None else [f"at most {_number(self.high)}"])
        return " ".join([noun, " and ".join(parts)]) if parts else noun


def _number(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    text = f"{value:.6g}"
    return f"{text} ({value * 255:.6g}/255)" if 0 < value < 0.1 else text


def option(default: Any, low: float | None = None, high: float | None = None, *, above: bool = False,
           choices: tuple[str, ...] = (), why: str = "") -> Any:
    """A method-config field with its valid values declared (see :class:`Bounds`); its type is the
    field's annotation (``int``, ``float``, ``bool``, ``str``, each optionally ``| None``)."""
    return field(default=default, metadata={"bounds": Bounds(low, high, above, tuple(choices), why)})


def fit_per_class_option() -> Any:
    """The ``fit_per_class`` field of a method whose δ is one row per class: optimise on a seeded,
    stratified subset of that many images per class and apply the class rows to every image (0: all).
    The rows are the same kind of object either way; what a subset costs in protection is measured,
    not assumed (docs/methods.md)."""
    return option(0, 0, 10**9)


def patch_option() -> Any:
    """The ``patch`` field of a class-wise δ: its rows are constant over ``patch``×``patch`` pixel blocks
    (1: per pixel) — a coarse pattern, whose block means JPEG's DC terms and blurs keep."""
    return option(1, 1, 4096)


def shift_option() -> Any:
    """The ``shift`` field of a class-wise δ: each image gets its class's row circularly shifted by its own
    offset in [0, ``shift``) pixels down and right (0: no shift). One pattern per class, at a different place
    in every image: a class's mean change averages the shifted copies (a high-frequency pattern averages
    out), so a defense that reads the pattern off the class mean finds little, while a convolutional
    victim detects it wherever it sits. Generation draws fresh offsets every step (an expectation over
    them); the release fixes each image's offset by its index (:func:`shift_offsets`)."""
    return option(0, 0, 4096)


def achromatic_option() -> Any:
    """The ``achromatic`` field of a class-wise δ: equal in R, G and B, a change of brightness that
    grayscale keeps whole (its luma weights sum to 1)."""
    return option(False)


@dataclass(frozen=True)
class MethodConfig:
    """Settings every method has: the L∞ budget ``eps`` in [0, 1] units and the seed.

    Every field of every method's config is checked on construction against its annotated type and its
    declared :class:`Bounds` (:meth:`check_fields`); a numeric field without declared bounds is a bug
    that a test catches. Integers given for a float field become floats."""

    eps: float = option(8 / 255, GREY_LEVEL, 1, why="below 1/255 8-bit output rounds the change away")
    seed: int = option(0, -(2**63), 2**64 - 1)  # random seed (`--seed`); any value torch's generators accept

    def __post_init__(self) -> None:
        self.check_fields()

    def check_fields(self) -> None:
        """Raise :class:`OptionError` for the first field whose value has the wrong type or is out of bounds."""
        hints = _field_types(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind, optional = hints[f.name]
            if value is None and optional:
                continue
            bounds = f.metadata.get("bounds", Bounds())
            checked = _typed(value, kind)
            if checked is _WRONG or (kind != "bool" and not bounds.admits(checked)):
                valid = "true or false" if kind == "bool" else bounds.describe(kind)
                none = " (or none for the default)" if optional else ""
                why = f": {bounds.why}" if bounds.why and checked is not _WRONG else ""
                raise OptionError(f"{f.name} must be {valid}{none}, got {value!r}{why}")
            if checked is not value:
                object.__setattr__(self, f.name, checked)
        if getattr(self, "perturbation", "classwise") != "classwise":
            for name, off in (("fit_per_class", 0), ("patch", 1), ("achromatic", False), ("shift", 0)):
                if getattr(self, name, off) != off:
                    raise OptionError(f"{name} shapes one δ per class; perturbation={self.perturbation} makes "
                                      f"one δ per image: drop {name} or use perturbation=classwise")


_WRONG = object()


def _typed(value: Any, kind: str) -> Any:
    """``value`` as a field of ``kind`` holds it (an int for a float field becomes a float, a NumPy
    number a Python one), or _WRONG: a bool is not a number, text is not a number, and a float is a
    number only when finite."""
    if kind == "bool":
        return value if isinstance(value, bool) else _WRONG
    if kind == "str":
        return value if isinstance(value, str) else _WRONG
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return _WRONG
    if kind == "int":
        return int(value) if isinstance(value, numbers.Integral) else _WRONG
    return float(value) if math.isfinite(value) else _WRONG


@functools.cache
def _field_types(config_class: type) -> dict[str, tuple[str, bool]]:
    """Field name → (base type name, whether None is allowed), from the class's annotations."""
    out = {}
    for name, hint in typing.get_type_hints(config_class).items():
        args = typing.get_args(hint) or (hint,)
        base = [a for a in args if a is not type(None)]
        if len(base) != 1 or base[0] not in (int, float, bool, str):
            raise TypeError(f"{config_class.__name__}.{name}: a method constant must be int, float, bool or "
                            f"str (optionally | None), not {hint}")
        out[name] = (base[0].__name__, len(base) < len(args))
    return out


@dataclass
class Perturbation:
    """What a method releases: δ rows at the working resolution, within the method's budget.

    ``delta`` is ``N×3×H×W`` (sample-wise, row i belongs to sample i; a tensor, or an on-disk
    :class:`~ueguard.data.store.PerturbationStore` indexed the same way) or ``K×3×H×W`` (class-wise, row
    k to class k, or to the rows of ``assignment`` — per-sample row indices — when the method groups
    samples itself, as UC's clusters do). ``norm`` and ``eps`` state the budget: for ``linf`` every
    value of δ is in [−ε, ε]; for ``l2`` every row has Euclidean norm ≤ ε (in [0, 1] units at the
    working resolution); for ``l0`` every row changes at most ε pixel positions (OPS writes ±1 there so
    that clipping sets the pixel to a corner colour). ``resample`` is how a row is resized to a file's
    native size: ``bilinear`` (a convex interpolation: it never leaves the L∞ box and does not raise the
    RMS) or ``nearest`` (one working pixel becomes the block of native pixels it covers). ``info``
    carries the method's own statistics (rounds, final surrogate accuracy, …). ``parts`` says how a
    budget made of several branches splits (DUNE: ``{"spatial": …, "colour": …}`` L∞ radii whose sum is
    ``eps``); it is recorded beside the budget, which alone is what ``within_budget`` checks. ``shift``
    (class-wise only): sample i gets its row circularly shifted by :func:`shift_offsets` of its index
    under ``shift_seed`` — a shift moves values, so every norm's budget is kept.
    """

    delta: "torch.Tensor | PerturbationStore"
    classwise: bool
    eps: float
    info: dict[str, Any] = field(default_factory=dict)
    norm: str = "linf"
    assignment: torch.Tensor | None = None
    resample: str = "bilinear"
    parts: dict[str, float] = field(default_factory=dict)
    shift: int = 0
    shift_seed: int = 0

    def __post_init__(self) -> None:
        if self.shift and not self.classwise:
            raise ValueError("shift moves class-wise rows; a sample-wise δ has a row of its own per image")
        if self.parts and not math.isclose(sum(self.parts.values()), self.eps, rel_tol=1e-6, abs_tol=1e-9):
            raise ValueError(f"the budget's parts {self.parts} must add up to its eps {self.eps}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.resample not in ("bilinear", "nearest"):
            raise ValueError(f"resample must be 'bilinear' or 'nearest', got {self.resample!r}")

    def rows_for(self, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The δ row index of each sample in ``index``."""
        if not self.classwise:
            return index
        keys = self.assignment if self.assignment is not None else labels
        return keys.to(index.device)[index]

    def for_samples(self, index: torch.Tensor, labels: torch.Tensor, grayscale: torch.Tensor) -> torch.Tensor:
        """δ for samples ``index`` (labels/grayscale given per sample of the whole set)."""
        rows = self.delta[self.rows_for(index, labels).to(self.delta.device)]
        if self.shift:
            rows = roll_rows(rows, shift_offsets(index.to(rows.device), self.shift, self.shift_seed))
        return gray_project(rows, grayscale[index].to(rows.device))

    def budget(self) -> dict[str, Any]:
        """The budget as the manifest records it: the norm and its radius (L∞ also in 1/255 levels), and
        the radius of each of its parts when it has several."""
        out: dict[str, Any] = {"norm": self.norm, "budget": self.eps}
        if self.norm == "linf":
            out["budget_255"] = round(self.eps * 255, 4)
        if self.parts:
            out["budget_parts"] = dict(self.parts)
            if self.norm == "linf":
                out["budget_parts_255"] = {name: round(value * 255, 4) for name, value in self.parts.items()}
        return out


def rows_done(delta: "torch.Tensor | PerturbationStore", span: slice) -> bool:
    """Whether the rows of ``span`` are already final (stored by an interrupted run that is resumed)."""
    return isinstance(delta, PerturbationStore) and delta.done(span.start, span.stop)


def mark_rows_done(delta: "torch.Tensor | PerturbationStore", span: slice) -> None:
    """The rows of ``span`` are final: an on-disk store checkpoints them so a resumed run skips them."""
    if isinstance(delta, PerturbationStore):
        delta.mark_done(span.start, span.stop)


def norm_of(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-row size of ``delta`` (``N×C×H×W``) in ``norm``: max |δ|, Euclidean length, or the number of
    pixel positions where any channel is non-zero."""
    flat = delta.flatten(1)
    if norm == "linf":
        return flat.abs().amax(1)
    if norm == "l2":
        return flat.norm(dim=1)
    if norm == "l0":
        return (delta != 0).any(1).flatten(1).sum(1).to(delta.dtype)
    raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")


def l2_project(delta: torch.Tensor, radius: float | torch.Tensor) -> torch.Tensor:
    """Scale every row of ``delta`` down onto the L2 ball of ``radius`` (rows inside are kept): the
    Euclidean projection onto {δ : ‖δ‖₂ ≤ r}."""
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (torch.as_tensor(radius, dtype=delta.dtype, device=delta.device) / norms).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def l2_scale(delta: torch.Tensor, radius: float | torch.Tensor) -> torch.Tensor:
    """Scale every row of ``delta`` to Euclidean length exactly ``radius`` (zero rows stay zero)."""
    norms = delta.flatten(1).norm(dim=1)
    factor = torch.where(norms > 0, torch.as_tensor(radius, dtype=delta.dtype, device=delta.device) / norms.clamp_min(1e-12),
                         torch.zeros_like(norms))
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def gray_project(delta: torch.Tensor, grayscale: torch.Tensor) -> torch.Tensor:
    """Replace the three channels of grayscale samples by their mean: the closest perturbation that keeps
    a gray image gray. The mean of values in [−ε, ε] stays in [−ε, ε], and averaging channels is an
    orthogonal projection (it never lengthens δ, nor adds changed pixels), so every budget is kept."""
    mean = delta.mean(1, keepdim=True).expand_as(delta)
    return torch.where(grayscale[:, None, None, None], mean, delta)


def shift_offsets(index: torch.Tensor, shift: int, seed: int) -> torch.Tensor:
    """``N×2`` (down, right) offsets in [0, ``shift``) for the samples ``index``: a fixed integer hash of
    each index and ``seed``, so an image's offset does not depend on which other images are in the batch,
    the subset or the run (a resumed or sharded release shifts every image as a whole run does)."""
    mask = 0xFFFFFFFF  # 32-bit mixing: every product stays inside int64, the same on every device
    h = ((index.long() + 1) * 0x9E3779B1 + (seed * 0x27D4EB2F & mask)) & mask
    for _ in range(2):
        h = ((h ^ (h >> 16)) * 0x45D9F3B) & mask
    h = h ^ (h >> 16)
    return torch.stack([h % shift, (h // shift) % shift], 1)


def random_offsets(n: int, shift: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """``n×2`` offsets drawn afresh from ``generator``: generation's expectation over the shifts."""
    return torch.randint(0, shift, (n, 2), generator=generator).to(device)


def subspace_project(delta: torch.Tensor, patch: int = 1, achromatic: bool = False) -> torch.Tensor:
    """Orthogonal projection of ``…×C×H×W`` rows onto the patterns constant over ``patch``×``patch`` blocks
    (from the top-left; edge blocks partial) and, with ``achromatic``, equal across channels. Averages of
    values in [−ε, ε] stay in it, so every L∞ budget is kept; applied to a gradient, its sign steps stay in
    the subspace."""
    if achromatic:
        delta = delta.mean(-3, keepdim=True).expand_as(delta)
    if patch > 1:
        h, w = delta.shape[-2:]
        lead = delta.shape[:-3]
        flat = delta.reshape(-1, *delta.shape[-3:])
        pooled = torch.nn.functional.avg_pool2d(flat, patch, ceil_mode=True)
        delta = pooled.repeat_interleave(patch, -2).repeat_interleave(patch, -1)[..., :h, :w].reshape(*lead, *delta.shape[-3:])
    return delta


def stratified_subset(data: WorkingSet, per_class: int, seed: int) -> WorkingSet:
    """Up to ``per_class`` images of each class, drawn by a generator of its own seeded with ``seed`` (so the
    method's own random stream is the same as on the whole set), in their original order."""
    generator = torch.Generator().manual_seed(seed)
    picks = [members[torch.randperm(len(members), generator=generator)[:per_class]]
             for members in (torch.nonzero(data.labels == k).flatten() for k in range(data.num_classes))]
    return data.subset(torch.cat(picks).sort().values)


def clean_batch(data: WorkingSet, idx: torch.Tensor, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean float images, labels and grayscale flags of samples ``idx`` on the run's device."""
    dev_idx = idx.to(data.labels.device)
    return (runtime.to_float(data.images_at(idx)), data.labels[dev_idx].to(runtime.device),
            data.grayscale[dev_idx].to(runtime.device))


def apply_delta(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x̃ = clip(x + δ, 0, 1): what the saved image holds (before 8-bit rounding)."""
    return (x + delta).clamp_(0, 1)


class ProtectionMethod(ABC):
    """Base class. Subclasses set ``name``, ``description``, ``config_class``, ``presets`` and the
    capability flags, and implement :meth:`generate`.

    ``presets`` maps each budget (``quick``/``standard``/``thorough``) to config overrides: the
    steps/epochs a budget buys. ``needs_surrogate`` methods receive a classifier to train or attack;
    ``needs_pretrained`` ones require its weights to be a real prior (``--weights``/``--pretrained``).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {b: {} for b in BUDGETS}
    needs_labels: ClassVar[bool] = True
    needs_surrogate: ClassVar[bool] = True
    needs_pretrained: ClassVar[bool] = False
    #: The norm of the method's budget (see :data:`NORMS`). Only ``linf`` methods take the CLI's ``--eps``;
    #: ``l2`` methods take ``-o l2_eps=...``, ``l0`` ones have a fixed pixel count.
    norm: ClassVar[str] = "linf"
    #: How the budget is set, where the norm's own option does not say it all (``ueguard methods`` and
    #: docs/methods.md show it in place of the norm's usual wording); None: the norm's usual wording.
    budget_text: ClassVar[str | None] = None
    #: Bi-level methods that checkpoint every round through :meth:`checkpoint_round` (see
    #: :attr:`round_checkpoint`), so that an interrupted run continues with the next round.
    checkpoints_rounds: ClassVar[bool] = False
    #: Bumped whenever a default constant changes; protect records it in the manifest, so a folder made
    #: under older defaults can be told apart (``--resume`` refuses to mix them, benchmarks re-make it).
    defaults_revision: ClassVar[int] = 1
    #: For each earlier revision, the constants whose default then differs from now's. They apply above the
    #: budget presets (one value for every budget), so a constant a preset sets cannot be listed here — a
    #: test holds every method to that; such a change would need per-budget former values.
    former_defaults: ClassVar[dict[int, dict[str, Any]]] = {}

    def __init__(self, config: MethodConfig, *, runtime: Runtime, surrogate: nn.Module | None = None,
                 progress: Progress = SILENT) -> None:
        if self.needs_surrogate and surrogate is None:
            raise ValueError(f"method {self.name!r} needs a surrogate model")
        self.config = config
        self.runtime = runtime
        self.surrogate = surrogate
        self.progress = progress
        self.generator = torch.Generator().manual_seed(config.seed)
        #: Where sample-wise δ lives: None → a tensor on the run's device; otherwise a callable
        #: ``(shape, resumable) → PerturbationStore`` (``protect --store disk``). ``resumable``: the method
        #: marks rows final as it goes and skips final rows, so a store left by a killed run is continued.
        self.delta_store: Callable[[tuple[int, ...], bool], PerturbationStore] | None = None
        #: Where a method with :attr:`checkpoints_rounds` saves its state after each round and finds the
        #: state of an interrupted run (``protect`` puts it next to the store); None: no checkpoints.
        self.round_checkpoint: RoundCheckpoint | None = None
        self._restored: dict[str, Any] | None = None
        self._restore_loaded = False
        self._resumed_after = 0

    def through_squeeze(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x`` through a fresh per-image draw of the config's ``squeeze`` defenses (the expectation over
        what a squeezing victim does to its training set), or as it is where the method has none on."""
        kinds = squeeze_kinds(getattr(self.config, "squeeze", "none"))
        return squeezed(x, self.generator if generator is None else generator, kinds)

    def new_delta(self, shape: tuple[int, ...], *, resumable: bool = False) -> "torch.Tensor | PerturbationStore":
        """Zero sample-wise δ of ``shape`` (``N×3×H×W``): a tensor on the run's device, or the on-disk
        store when one was configured (see :attr:`delta_store`). A method that checkpoints its rounds
        gets the store it checkpointed when it resumes (its rows of the last finished round), and a store
        whose rounds are committed as a whole (:meth:`PerturbationStore.start_rounds`)."""
        if self.delta_store is None:
            return torch.zeros(shape, device=self.runtime.device)
        if not (self.checkpoints_rounds and self.round_checkpoint is not None):
            return self.delta_store(tuple(shape), resumable)
        restored = self._restore_point()
        in_store = restored is not None and "store" in restored["delta"]
        store = self.delta_store(tuple(shape), in_store)
        if in_store:
            try:
                if store.meta.get("id") != restored["delta"]["store_id"]:
                    raise StoreError(f"{store.folder}: not the store the checkpoint was made with")
                store.start_rounds(restored["delta"]["store"])
                return store
            except StoreError as error:
                self.round_checkpoint.log(f"not resuming from {self.round_checkpoint.path}: {error}; generating "
                                          "from the first round")
                self._restored = None
                store.close()
                store = self.delta_store(tuple(shape), False)
        store.start_rounds()
        return store

    def _restore_point(self) -> dict[str, Any] | None:
        """The round checkpoint of an interrupted run with this run's settings (read once), or None."""
        if not self._restore_loaded:
            self._restore_loaded = True
            if self.checkpoints_rounds and self.round_checkpoint is not None:
                self._restored = self.round_checkpoint.load()
        return self._restored

    def _layout(self) -> distributed.Distributed:
        """The processes this method's generation runs over (a method that splits over torchrun's ranks
        sets ``_dist``; any other generates alone, on rank 0)."""
        return getattr(self, "_dist", distributed.SINGLE)

    def resume_rounds(self, delta: "torch.Tensor | PerturbationStore", tracked: dict[str, Any]) -> list:
        """Continue an interrupted run: load the checkpointed state into ``tracked`` (name → module,
        optimiser, scheduler, :class:`~ueguard.engine.loops.BatchSampler` or ``torch.Generator``) and a
        tensor δ, and return the history of the finished rounds (empty: start with the first round).
        Call it after everything in ``tracked`` is built, before the first round. Under torchrun every
        rank calls it: rank 0 decides and sends the state; the names in :data:`RANK_LOCAL` and the torch
        RNG are restored per rank (see :mod:`ueguard.engine.distributed`)."""
        layout = self._layout()
        restored = self._restore_point()  # rank 0's file (the other ranks have none)
        problem = None
        if restored is not None:
            shared = {n for n in tracked if not (layout.enabled and n in RANK_LOCAL)}
            made_by = restored.get("world_size", 1)
            if made_by != layout.world_size:
                problem = f"it was made by {made_by} process(es), this run has {layout.world_size}"
            elif set(restored["states"]) != shared:
                problem = f"it holds {', '.join(sorted(restored['states']))}, this run tracks {', '.join(sorted(shared))}"
            elif "store" in restored["delta"] and not isinstance(delta, PerturbationStore):
                problem = "its δ is in an on-disk store, this run keeps δ in memory (--store)"
            if problem:
                self.round_checkpoint.log(f"not resuming from {self.round_checkpoint.path}: {problem}; generating "
                                          "from the first round")
        state = None if restored is None or problem else {k: restored[k] for k in ("history", "states", "torch_rng")}
        if layout.enabled:  # rank 0's decision and state, with every rank's own part, on every rank
            if layout.is_main and state is not None:
                state["ranks"] = restored["ranks"]
            state = layout.broadcast(state if layout.is_main else None)
        if state is None:
            return []
        mine = state["ranks"][layout.rank] if layout.enabled else {}
        for name, thing in tracked.items():
            saved = mine[name] if layout.enabled and name in RANK_LOCAL else state["states"][name]
            if isinstance(thing, torch.Generator):
                thing.set_state(saved)
            else:
                thing.load_state_dict(saved)
        torch.set_rng_state(mine["torch_rng"] if layout.enabled else state["torch_rng"])
        if layout.is_main and "tensor" in restored["delta"]:
            delta[:] = restored["delta"]["tensor"].to(delta.device)
        layout.broadcast_rows(delta)  # the other ranks' δ from rank 0's (a no-op in one process)
        history = list(state["history"])
        self._resumed_after = len(history)
        self.round_checkpoint.log(f"resuming {self.name} generation after round {len(history)} "
                                  f"(checkpoint {self.round_checkpoint.path})")
        return history

    def run_rounds(self, rounds: int, delta: "torch.Tensor | PerturbationStore", tracked: dict[str, Any],
                   one_round: Callable[[int, Any], Any], *, converged: Callable[[Any], bool] = lambda record: False,
                   unit: str = "round", total: int | None = None,
                   done: Callable[[int], int] = lambda finished: finished) -> list:
        """The round loop of the bi-level (min-min) methods, written once: continue after the rounds an
        interrupted run checkpointed (:meth:`resume_rounds`), then run ``one_round(index, bar)`` — which
        returns the round's record and may report on the progress ``bar`` — until ``converged(record)``
        or ``rounds`` rounds, checkpointing after each (:meth:`checkpoint_round`). The bar counts ``unit``
        (``total`` of them; ``done(finished rounds)`` already done). Returns the history of records."""
        history = self.resume_rounds(delta, tracked)
        with self.progress.bar(rounds if total is None else total, self.name, unit=unit) as bar:
            bar.skip(done(len(history)))  # resumed: counted, but not in the ETA's pace
            for index in self.rounds_left(history, rounds, converged):
                record = one_round(index, bar)
                history.append(record)
                self.checkpoint_round(history, delta, tracked)
                if converged(record):
                    break
        return history

    def eval_subset(self, n: int, limit: int) -> torch.Tensor:
        """The samples a round's stopping check scores: all ``n``, or ``limit`` of them drawn once (sorted)."""
        return torch.randperm(n, generator=self.generator)[:limit].sort().values if n > limit else torch.arange(n)

    def rounds_left(self, history: list, max_rounds: int, converged: Callable[[Any], bool]) -> range:
        """The indices of the rounds still to run after the ``history`` :meth:`resume_rounds` returned:
        none when its last round already met the stopping criterion ``converged``."""
        if history and converged(history[-1]):
            return range(0)
        return range(len(history), max_rounds)

    def resume_record(self) -> dict[str, Any]:
        """For the method's ``info``: after which round this run resumed (nothing when it did not)."""
        return {"resumed_after_round": self._resumed_after} if self._resumed_after else {}

    def checkpoint_round(self, history: list, delta: "torch.Tensor | PerturbationStore", tracked: dict[str, Any]) -> None:
        """A round is finished (its δ pass written): save what :meth:`resume_rounds` needs to continue
        after it. A no-op without a :attr:`round_checkpoint`. Under torchrun every rank calls it: each
        sends rank 0 its own states (:data:`RANK_LOCAL`, the torch RNG), and rank 0 writes the file."""
        if self.round_checkpoint is None:
            return
        layout = self._layout()

        def state_of(thing):
            return thing.get_state() if isinstance(thing, torch.Generator) else thing.state_dict()

        payload = {"history": history, "torch_rng": torch.get_rng_state()}
        if layout.enabled:
            own = {"torch_rng": payload["torch_rng"], **{n: state_of(t) for n, t in tracked.items() if n in RANK_LOCAL}}
            payload.update(ranks=layout.all_gather_object(own), world_size=layout.world_size)
            if not layout.is_main:
                return
        payload["states"] = {n: state_of(t) for n, t in tracked.items() if not (layout.enabled and n in RANK_LOCAL)}
        self.round_checkpoint.save(payload, delta)

    @classmethod
    def make_config(cls, budget: str = "standard", **overrides: Any) -> MethodConfig:
        """The config for a budget preset with explicit overrides on top; unknown keys are an error that
        lists the valid ones."""
        if budget not in BUDGETS:
            raise ValueError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
        valid = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"method {cls.name!r} has no option {', '.join(unknown)}; its options: {', '.join(sorted(valid))}")
        values = {**cls.presets.get(budget, {}), **{k: v for k, v in overrides.items() if v is not None}}
        try:
            return cls.config_class(**values)
        except OptionError as error:
            raise OptionError(f"method {cls.name!r}, option {error}") from None

    @classmethod
    def config_at(cls, revision: int, budget: str = "standard", **overrides: Any) -> MethodConfig:
        """The config a run with these options resolved to under defaults revision ``revision`` (a
        manifest without the record is revision 1) — :meth:`make_config` with that revision's defaults."""
        if not 1 <= revision <= cls.defaults_revision:
            raise ValueError(f"method {cls.name!r}: no defaults revision {revision} (this code has 1 … "
                             f"{cls.defaults_revision}); the folder was made by a newer ueguard")
        former = cls.former_defaults.get(revision, {})
        return cls.make_config(budget, **{**former, **{k: v for k, v in overrides.items() if v is not None}})

    def __call__(self, data: WorkingSet) -> Perturbation:
        if self.needs_labels and bool((data.labels < 0).any()):
            raise ValueError(f"method {self.name!r} needs a label for every image (class subfolders)")
        per_class = getattr(self.config, "fit_per_class", 0)
        if not per_class or int(torch.bincount(data.labels).max()) <= per_class:
            return self.generate(data)
        subset = stratified_subset(data, per_class, self.config.seed)
        perturbation = self.generate(subset)
        perturbation.info.update(fit_images=len(subset), fit_per_class=per_class)
        return perturbation

    @abstractmethod
    def generate(self, data: WorkingSet) -> Perturbation:
        """Compute the perturbation for ``data`` (on ``self.runtime.device``)."""

    def train_clean(self, model: nn.Module, data: WorkingSet, epochs: int, desc: str) -> Iterator[tuple[int, Any]]:
        """Train ``model`` on the clean images (crop + flip from the method's generator; SGD with the
        config's ``lr``, ``momentum``, ``weight_decay`` and ``batch_size`` under the engine's schedule over
        ``epochs``) and yield ``(epoch, progress bar)`` after each epoch: the surrogate a method that attacks a
        fitted model (TAP, DUNE) trains first. Stop iterating to stop training."""
        if epochs <= 0:
            return
        cfg, rt = self.config, self.runtime
        sampler = BatchSampler(len(data), cfg.batch_size, self.generator)
        trainer = Trainer(model, rt, OptimConfig(cfg.lr, cfg.momentum, cfg.weight_decay),
                          total_steps=epochs * sampler.steps_per_epoch())
        with self.progress.bar(epochs, desc, unit="epoch") as bar:
            for epoch in range(1, epochs + 1):
                model.train()
                for idx in sampler.epoch():
                    x, y, _ = clean_batch(data, idx, rt)
                    trainer.step(crop_flip(x, self.generator), y)
                yield epoch, bar

    def clean_accuracy(self, model: nn.Module, data: WorkingSet) -> float:
        """``model``'s accuracy on the clean images of ``data`` (batches of 4 × the config's ``batch_size``)."""
        batches = (self.runtime.to_float(data.images[s]) for s in batch_ranges(len(data), 4 * self.config.batch_size))
        return (predict(model, batches, self.runtime) == data.labels).float().mean().item()


METHODS: Registry[ProtectionMethod] = Registry("method")


def create_method(name: str, *, budget: str = "standard", runtime: Runtime, surrogate: nn.Module | None = None,
                  progress: Progress = SILENT, **options: Any) -> ProtectionMethod:
    """Build a registered method from a budget preset plus option overrides (``eps``, ``seed``, and the
    method's own constants)."""
    cls = METHODS.get(name)
    return cls(cls.make_config(budget, **options), runtime=runtime, surrogate=surrogate, progress=progress)


def list_methods() -> list[tuple[str, str]]:
    """``(name, one-line description)`` for every registered method; an alias says whose it is."""
    return [(name, cls.description if cls.name == name else f"alias of {cls.name}") for name, cls in METHODS.items()]
