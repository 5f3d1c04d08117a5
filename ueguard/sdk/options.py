"""Protection options: one frozen dataclass, resolved once from the CLI's or the SDK's keyword arguments.

Everything downstream reads the resolved :class:`ProtectOptions`, and its :meth:`ProtectOptions.record`
is what the manifest stores, so a run can be reproduced from its manifest line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ueguard.data.images import DEFAULT_MAX_PIXELS, LOSSY_FORMATS, OUTPUT_FORMATS
from ueguard.data.loaders import LOADERS, require_ffcv
from ueguard.engine.runtime import COMPILES, DEVICES, PRECISIONS
from ueguard.errors import UsageError
from ueguard.budgets import BUDGETS, SIZE_CAP, default_arch  # noqa: F401 (re-exported)
from ueguard.methods import METHODS
from ueguard.units import parse_eps

FORMATS = OUTPUT_FORMATS

#: Where labels come from: ``folders`` — the class subfolders (the default); ``auto`` — the class
#: subfolders when there are any, else pseudo-labels by k-means of a pretrained surrogate's features.
LABEL_SOURCES = ("folders", "auto")
#: Where sample-wise δ lives (``--store``); see :class:`ProtectOptions`.
STORES = ("auto", "memory", "disk")



DEFAULT_EPS = 8 / 255

#: Constants every method config has that are the run's own options: ``-o seed=7`` would be overridden
#: by ``--seed`` without a word, so ``-o`` refuses them and names the option to use.
RUN_CONSTANTS = {"seed": "--seed (it seeds the whole run: surrogate, sampling and the method)",
                 "eps": "--eps for an L∞ method, -o l2_eps for an L2 one (see `ueguard methods`)"}


@dataclass(frozen=True)
class ProtectOptions:
    """Resolved settings of a ``protect`` run (the CLI's long options).

    ``size`` ``None`` means "suited to the data" (the median short side snapped to a standard
    resolution, capped per budget: quick 64, standard 128, thorough 224). ``surrogate`` ``None`` means
    the default for the working size and budget (see :func:`default_arch`). ``method_options``
    are the method's own constants (``-o key=value``). ``keep_metadata`` keeps a cleaned EXIF (never the
    thumbnail, maker notes or orientation; see :func:`ueguard.data.images.clean_exif`);
    ``follow_symlinks`` follows links to folders and links leading outside the source folder. ``label_source`` (``--labels``) and ``clusters``
    (``--clusters``) say where labels come from (see :data:`LABEL_SOURCES`); with ``auto`` and no
    ``clusters`` the number of pseudo-classes is chosen by silhouette score over 2–10.

    ``loader`` (``--loader``) says how the folder is decoded into the working set: ``memory`` (a thread
    pool), ``torch`` (DataLoader workers) or ``ffcv`` (through a cached FFCV file, reused by later runs on
    the same folder; ``cache_dir`` says where); see :mod:`ueguard.data.loaders`.

    ``store`` (``--store``) is where sample-wise δ lives while it is generated and saved: ``memory`` (a
    tensor), ``disk`` (the memory-mapped :class:`~ueguard.data.store.PerturbationStore` under
    the private resume state under ``cache_dir`` (see :mod:`ueguard.data.run_state`), resumable row by row, or round by round for bi-level methods) or ``auto`` (disk when float32 δ would take more than an
    eighth of the machine's memory).

    ``eps`` is an L∞ budget and applies to L∞ methods only; an L2 method (lsp, ar) takes
    ``-o l2_eps=...`` and an L0 one (ops) has its fixed pixel count, so giving them another ``eps`` than
    the default is refused rather than silently ignored.
    """

    method: str = "emn"
    eps: float = DEFAULT_EPS
    seed: int = 0
    budget: str = "standard"
    device: str = "auto"
    precision: str = "auto"
    compile: str = "auto"
    size: int | None = None
    surrogate: str | None = None
    weights: str | None = None
    pretrained: bool = False
    format: str = "png"
    quality: int = 95
    perturbation: str | None = None
    method_options: tuple[tuple[str, Any], ...] = ()
    max_pixels: int = DEFAULT_MAX_PIXELS
    resume: bool = False
    keep_metadata: bool = False
    follow_symlinks: bool = False
    label_source: str = "folders"
    clusters: int | None = None
    loader: str = "auto"
    cache_dir: str | None = None
    store: str = "auto"

    @classmethod
    def resolve(cls, **kwargs: Any) -> "ProtectOptions":
        """Validate and normalise keyword options; every problem is a :class:`UsageError` that names the
        option and its valid values."""
        values = given_options(cls, kwargs)
        if "eps" in values:
            try:
                values["eps"] = parse_eps(values["eps"])
            except ValueError as error:
                raise UsageError(str(error)) from None
        opts = cls(**values)
        opts._check()
        return opts

    def _check(self) -> None:
        try:
            METHODS.get(self.method)
        except ValueError as error:
            raise UsageError(str(error)) from None
        cls = METHODS.get(self.method)
        if cls.norm != "linf" and self.eps != DEFAULT_EPS:
            hint = "-o l2_eps=VALUE (L2 norm per image, [0, 1] units)" if cls.norm == "l2" else "nothing: its budget is one pixel"
            raise UsageError(f"method {self.method!r} has an {cls.norm.upper()} budget; --eps is the L∞ budget of L∞ "
                             f"methods and does not apply to it — give {hint}")
        if self.clusters is not None and self.clusters < 1:
            raise UsageError(f"invalid clusters {self.clusters}: must be ≥ 1")
        if self.clusters is not None and self.label_source != "auto":
            raise UsageError("--clusters is for --labels auto (pseudo-labels of an unlabeled folder)")
        for name, value, choices in (("budget", self.budget, BUDGETS), ("device", self.device, DEVICES),
                                     ("labels", self.label_source, LABEL_SOURCES),
                                     ("precision", self.precision, PRECISIONS), ("compile", self.compile, COMPILES),
                                     ("format", self.format, FORMATS), ("loader", self.loader, LOADERS),
                                     ("store", self.store, STORES)):
            if value not in choices:
                raise UsageError(f"invalid {name} {value!r}; choose one of {', '.join(choices)}")
        if self.loader == "ffcv":
            require_ffcv()
        if self.size is not None and not 8 <= self.size <= 1024:
            raise UsageError(f"invalid size {self.size}: the working resolution must be between 8 and 1024 px")
        if not 1 <= self.quality <= 100:
            raise UsageError(f"invalid quality {self.quality}: must be in 1..100")
        if self.weights is not None and self.pretrained:
            raise UsageError("give either --weights FILE or --pretrained, not both")
        if self.max_pixels < 1:
            raise UsageError("max_pixels must be positive")
        if not -(2**63) <= self.seed < 2**64:
            raise UsageError(f"invalid seed {self.seed}: torch's generators take -2**63 … 2**64 - 1")
        self._check_method_options()

    def _check_method_options(self) -> None:
        """Refuse ``-o`` keys that are run options, a ``-o perturbation`` that contradicts ``--perturbation``,
        and any constant of the wrong type or out of its declared range — before anything is written."""
        given = dict(self.method_options)
        for key, instead in RUN_CONSTANTS.items():
            if key in given:
                raise UsageError(f"-o {key}={given[key]} is not a method constant; give {instead}")
        if self.perturbation is not None and given.get("perturbation", self.perturbation) != self.perturbation:
            raise UsageError(f"--perturbation {self.perturbation} contradicts -o perturbation={given['perturbation']}; "
                             "give one of them")
        try:
            self.method_config()
        except ValueError as error:
            raise UsageError(str(error)) from None

    @property
    def lossy(self) -> bool:
        return self.format in LOSSY_FORMATS

    def method_overrides(self) -> dict[str, Any]:
        overrides = dict(self.method_options)
        overrides.update(eps=self.eps, seed=self.seed)
        if self.perturbation is not None:
            overrides["perturbation"] = self.perturbation
        return overrides

    def method_config(self, revision: int | None = None):
        """The constants these options resolve to for the method: under today's defaults, or under those of
        an earlier defaults ``revision`` (see :meth:`ueguard.methods.base.ProtectionMethod.config_at`)."""
        cls = METHODS.get(self.method)
        return cls.config_at(cls.defaults_revision if revision is None else revision, self.budget,
                             **self.method_overrides())

    def record(self) -> dict[str, Any]:
        """JSON-ready form for the manifest (ε also as ``k/255`` text)."""
        out = dataclasses.asdict(self)
        out["method_options"] = dict(self.method_options)
        out["eps_255"] = round(self.eps * 255, 4)
        return out


def given_options(options_class: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword options actually given (``None`` means "use the default"), after rejecting names that
    are not fields of ``options_class`` with a :class:`UsageError` listing the valid ones."""
    valid = {f.name for f in dataclasses.fields(options_class)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    return {k: v for k, v in kwargs.items() if v is not None}


def parse_method_options(pairs: tuple[str, ...]) -> tuple[tuple[str, Any], ...]:
    """``("pgd_steps=5", "stop_accuracy=0.9")`` → typed pairs (int, float, bool, None or str)."""
    parsed = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"invalid method option {pair!r}: write KEY=VALUE, e.g. -o pgd_steps=10")
        parsed.append((key.strip(), _coerce(raw.strip())))
    return tuple(parsed)


def _coerce(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
