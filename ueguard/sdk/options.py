"""Protection options: one frozen dataclass, resolved once from the CLI's or the SDK's keyword arguments.

Everything downstream reads the resolved :class:`ProtectOptions`, and its :meth:`ProtectOptions.record`
is what the manifest stores, so a run can be reproduced from its manifest line.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any

from ueguard.data.images import DEFAULT_MAX_PIXELS, LOSSY_FORMATS, OUTPUT_FORMATS
from ueguard.data.loaders import LOADERS, require_ffcv
from ueguard.engine.runtime import COMPILES, DEVICES, PRECISIONS
from ueguard.errors import UsageError
from ueguard.budgets import BUDGETS
from ueguard.methods import METHODS
from ueguard.sdk.params import check_values, param
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
    """Resolved settings of a ``protect`` run: the SDK's keywords and the CLI's long options, each declared
    once below with what it means (:mod:`ueguard.sdk.params`).

    Everything downstream reads this object, and :meth:`record` is what the manifest stores. Across
    options: ``eps`` applies to L∞ methods only — another ε than the default for an L2 method (lsp, ar:
    ``-o l2_eps``) or the L0 one (ops: one pixel) is refused rather than silently ignored; ``clusters``
    needs ``labels="auto"``; ``weights`` and ``pretrained`` exclude each other. The field ``label_source``
    is the SDK's ``labels`` given as text (the CLI's ``--labels``).
    """

    method: str = param("emn", "Protection method (see `ueguard methods`).")
    eps: float = param(DEFAULT_EPS, "L∞ budget of L∞ methods: 8/255, 0.031, or 8 (meaning 8/255). L2 methods "
                       "(lsp, ar) take the method option l2_eps instead (-o l2_eps=VALUE); ops changes one pixel.",
                       parse=parse_eps, accepts=(str, numbers.Real), shown="8/255")
    seed: int = param(0, "Seeds the whole run: surrogate, sampling and the method (same seed, same bytes).",
                      low=-(2**63), high=2**64 - 1)
    budget: str = param("standard", "Steps/rounds preset of the method (and working-size cap: 64 / 128 / 224 px).",
                        choices=BUDGETS)
    device: str = param("auto", "Where to compute (auto: a GPU when there is one).", choices=DEVICES)
    precision: str = param("auto", "Autocast precision for the surrogate (auto: bf16 on GPUs, fp32 on CPU).",
                           choices=PRECISIONS)
    compile: str = param("auto", "torch.compile the surrogate's steps (auto: on for CUDA, off on CPU, where it "
                         "measured no faster).", choices=COMPILES)
    size: int | None = param(None, "Working resolution in px (default: the median short side snapped to a "
                             "standard resolution, capped per budget).", low=8, high=1024)
    surrogate: str | None = param(None, "Surrogate model: a timm name or one of ueguard's (resnet18_cifar, ...); "
                                  "default: suited to the working size and budget.")
    weights: str | None = param(None, "Local surrogate checkpoint.", path="file")
    pretrained: bool = param(False, "Surrogate weights from the timm hub (needs network).")
    format: str = param("png", "Output format; lossy ones (jpeg, webp) weaken the protection, keep writes each "
                        "file in its source format.", choices=FORMATS)
    quality: int = param(95, "JPEG/WebP quality.", low=1, high=100)
    perturbation: str | None = param(None, "Sample-wise or class-wise δ (default: the method's).",
                                     choices=("samplewise", "classwise"))
    method_options: tuple[tuple[str, Any], ...] = param(
        (), "The method's own constants, e.g. {'pgd_steps': 10} (CLI: -o pgd_steps=10, repeatable); each is "
        "type- and range-checked (see `ueguard methods`).", pairs=True, flags=("-o", "--option"), metavar="KEY=VALUE")
    max_pixels: int = param(DEFAULT_MAX_PIXELS, "Refuse images above this many pixels (decompression bombs).", low=1)
    resume: bool = param(False, "Continue an interrupted run in a non-empty output folder.")
    keep_metadata: bool = param(False, "Keep camera/date/GPS EXIF in JPEG/PNG/WebP outputs. Never kept: the EXIF "
                                "thumbnail (a copy of the unprotected image), maker notes, XMP/IPTC, orientation "
                                "(applied).")
    follow_symlinks: bool = param(False, "Follow links to folders and links that lead outside the source folder "
                                  "(default: skipped, and listed).")
    label_source: str = param("folders", "Where labels come from: class subfolders, or (auto, for a flat folder) "
                              "k-means pseudo-labels of a pretrained surrogate's features (needs weights or "
                              "pretrained).",
                              keyword="labels", choices=LABEL_SOURCES)
    clusters: int | None = param(None, "Number of pseudo-classes for labels auto (default: the best silhouette "
                                 "score over 2-10).", low=1)
    loader: str = param("auto", "How the source is decoded into the working set: a thread pool (memory), "
                        "DataLoader workers (torch), or a cached FFCV file reused by later runs (ffcv, optional "
                        "extra).", choices=LOADERS)
    cache_dir: str | None = param(None, "Where the FFCV cache and the private resume state (the perturbation, "
                                  "until the run finishes) live (default: $UEGUARD_CACHE or ~/.cache/ueguard); "
                                  "never inside the output or the source folder.", path="dir")
    store: str = param("auto", "Where sample-wise perturbations live: in memory, or memory-mapped in the private "
                       "resume state under cache_dir (resumable row by row; auto: disk when they would take over "
                       "1/8 of the machine's memory). Either gives the same bytes.", choices=STORES)

    @classmethod
    def resolve(cls, **kwargs: Any) -> "ProtectOptions":
        """Validate and normalise keyword options; every problem is a :class:`UsageError` that names the
        option and its valid values."""
        opts = cls(**check_values(cls, kwargs))
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
        if self.clusters is not None and self.label_source != "auto":
            raise UsageError("--clusters is for --labels auto (pseudo-labels of an unlabeled folder)")
        if self.loader == "ffcv":
            require_ffcv()
        if self.weights is not None and self.pretrained:
            raise UsageError("give either --weights FILE or --pretrained, not both")
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
