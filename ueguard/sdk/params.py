"""One definition per option of ``protect`` and ``verify``: its keyword, type, default, meaning and CLI flag.

Every field of :class:`~ueguard.sdk.options.ProtectOptions` and :class:`~ueguard.sdk.verify.VerifyOptions`
is declared with :func:`param`. The field's annotation and default are the SDK keyword's; its ``help`` is
the one text that ``help(ueguard.sdk.protect)``, ``ueguard protect --help`` and the docs show. From these
definitions:

* :func:`takes_options` appends the option list to the SDK function's docstring, and refuses (at import)
  a function whose keyword parameters are not exactly these, with these defaults — the two cannot drift;
* :func:`check_values` checks one call's values against the annotations, choices and ranges: a wrong
  type is an :class:`~ueguard.errors.OptionTypeError` (a ``TypeError``), a bad value a
  :class:`~ueguard.errors.UsageError` (a ``ValueError``), each naming the keyword;
* the command line builds its click options from them (``ueguard.cli``), so every SDK keyword is a long
  option (``_`` written ``-``) and the reverse, except the few :data:`CLI_ONLY` / :data:`SDK_ONLY` ones.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import os
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ueguard.errors import OptionTypeError, UsageError

#: Command-line options with no SDK keyword of the same name: ``--quiet`` is the SDK's ``progress=False``.
CLI_ONLY = frozenset({"quiet"})
#: SDK keywords with no command-line option: in-memory input (``layout``), the progress display (a bool or
#: a :class:`~ueguard.engine.progress.Progress`; the CLI's ``--quiet``) and verify's per-run callback.
SDK_ONLY = frozenset({"layout", "progress", "on_run_done"})


@dataclass(frozen=True)
class Param:
    """How one option is named, checked and shown (the field's annotation and default are its type and default).

    ``flags``: the CLI spelling (default ``--`` + the keyword with ``-`` for ``_``); ``keyword``: the SDK
    keyword when it is not the field's name; ``choices``: the valid values; ``low``/``high``: an inclusive
    range (``open_range`` makes both ends exclusive); ``path``: ``"file"`` or ``"dir"`` for a path (the SDK
    also takes ``os.PathLike``); ``parse``: converts the given value (e.g. ε's ``"8/255"``) and raises
    ``ValueError`` naming the problem, ``accepts`` the types it takes; ``pairs``: a mapping of constants
    (the CLI's repeatable ``KEY=VALUE``); ``shown``: the default as the SDK signature and ``--help`` write it.
    """

    help: str
    flags: tuple[str, ...] = ()
    keyword: str | None = None
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    open_range: bool = False
    path: str | None = None
    parse: Callable[[Any], Any] | None = None
    accepts: tuple[type, ...] = ()
    pairs: bool = False
    shown: Any = None
    metavar: str | None = None


def param(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field with its :class:`Param` (``spec``: the Param's other attributes)."""
    return dataclasses.field(default=default, metadata={"param": Param(help, **spec)})


@dataclass(frozen=True)
class Option:
    """One declared option as the SDK and the CLI see it."""

    field: str
    keyword: str
    hint: Any
    default: Any
    spec: Param

    @property
    def flags(self) -> tuple[str, ...]:
        return self.spec.flags or ("--" + self.keyword.replace("_", "-"),)

    @property
    def signature_default(self) -> Any:
        return self.default if self.spec.shown is None else self.spec.shown

    def kinds(self) -> tuple:
        """The annotation's types: ``int | None`` → ``(int, NoneType)``."""
        return _members(self.hint)

    def describe_type(self) -> str:
        """The accepted types in words, e.g. ``int | None`` or ``mapping of str to value``."""
        if self.spec.pairs:
            return "mapping of str to value"
        if self.spec.accepts:
            return " | ".join("float" if t is numbers.Real else t.__name__ for t in self.spec.accepts)
        names = ["None" if t is type(None) else getattr(t, "__name__", str(t)) for t in _members(self.hint)]
        if self.spec.path:
            names = ["str | os.PathLike" if n == "str" else n for n in names]
        return " | ".join(names)


def options_of(cls: type) -> list[Option]:
    """The declared options of an options dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    return [Option(f.name, f.metadata["param"].keyword or f.name, hints[f.name], f.default, f.metadata["param"])
            for f in dataclasses.fields(cls) if "param" in f.metadata]


def _members(hint: Any) -> tuple:
    """``int | None`` → ``(int, NoneType)``; a plain type → ``(type,)``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def check_values(cls: type, given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` (field name → value) checked and normalised: numbers of the declared kind as Python
    numbers, paths as ``str``, pairs as a tuple, parsed values parsed. Unknown names are a
    :class:`UsageError` listing the valid ones."""
    declared = {o.field: o for o in options_of(cls)}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(declared))}")
    return {name: _check(declared[name], value) for name, value in given.items()}


def _check(option: Option, value: Any) -> Any:
    spec, members = option.spec, _members(option.hint)
    if value is None:
        if type(None) in members:
            return None
        raise OptionTypeError(f"{option.keyword} must be {option.describe_type()}, not None")
    if spec.pairs:
        return _pairs(option.keyword, value)
    if spec.parse is not None:
        if spec.accepts and (not isinstance(value, spec.accepts) or isinstance(value, bool)):
            raise _type_error(option, value)
        try:
            return spec.parse(value)
        except ValueError as error:
            raise UsageError(str(error)) from None
    value = _coerce(option, value, [m for m in members if m is not type(None)][0])
    if spec.choices is not None and value not in spec.choices:
        raise UsageError(f"invalid {option.keyword} {value!r}; choose one of {', '.join(spec.choices)}")
    _check_range(option, value)
    return value


def _coerce(option: Option, value: Any, kind: type) -> Any:
    """``value`` as ``kind`` (bool, int, float, str) when it is one — NumPy numbers and scalars included."""
    if kind is bool and isinstance(value, (bool, np.bool_)):
        return bool(value)
    if kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if kind is str and (isinstance(value, str) or (option.spec.path and isinstance(value, os.PathLike))):
        return os.fspath(value)
    raise _type_error(option, value)


def _type_error(option: Option, value: Any) -> OptionTypeError:
    return OptionTypeError(f"{option.keyword} must be {option.describe_type()}, not {type(value).__name__} {value!r}")


def _check_range(option: Option, value: Any) -> None:
    low, high, open_range = option.spec.low, option.spec.high, option.spec.open_range
    below = low is not None and (value <= low if open_range else value < low)
    above = high is not None and (value >= high if open_range else value > high)
    if below or above:
        raise UsageError(f"invalid {option.keyword} {value!r}: must be {bounds_text(low, high, open_range)}")


def bounds_text(low: float | None, high: float | None, open_range: bool) -> str:
    """A range in words: ``from 8 to 1024``, ``strictly between 0 and 1``, ``≥ 1``, ``> 0``."""
    if low is not None and high is not None:
        return f"strictly between {low} and {high}" if open_range else f"from {low} to {high}"
    if low is not None:
        return f"{'>' if open_range else '≥'} {low}"
    return f"{'<' if open_range else '≤'} {high}"


def _pairs(keyword: str, value: Any) -> tuple[tuple[str, Any], ...]:
    """A mapping, or an iterable of ``(key, value)`` pairs, as a tuple of pairs in the order given."""
    items = value.items() if isinstance(value, Mapping) else value
    if isinstance(value, (str, bytes)):
        items = None
    try:
        pairs = tuple((key, item) for key, item in items)
    except (TypeError, ValueError):
        pairs = None
    if pairs is None or not all(isinstance(key, str) for key, _ in pairs):
        raise OptionTypeError(f"{keyword} must be a mapping of constant names to values, e.g. "
                              f"{{'pgd_steps': 10}}, not {type(value).__name__} {value!r}")
    return pairs


def call_options(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The options among a call's ``values`` (e.g. ``locals()`` on entry), keyed by field name."""
    return {o.field: values[o.keyword] for o in options_of(cls) if o.keyword in values}


def options_doc(cls: type) -> str:
    """The option list of a docstring: one entry per option, its type, default and meaning."""
    lines = ["", "Options (the command line's long options, ``_`` written ``-``):", ""]
    for option in options_of(cls):
        spec, limits = option.spec, ""
        if spec.choices:
            limits = "; one of " + ", ".join(map(str, spec.choices))
        elif spec.low is not None or spec.high is not None:
            limits = "; " + bounds_text(spec.low, spec.high, spec.open_range)
        lines.append(f"    {option.keyword} ({option.describe_type()}, default {option.signature_default!r}{limits})")
        lines += textwrap.wrap(spec.help, 100, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return "\n".join(lines) + "\n"


def takes_options(cls: type, own: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator of an SDK function: append :func:`options_doc` to its docstring after checking that its
    parameters, apart from its ``own`` (the inputs, documented by the function) and :data:`SDK_ONLY`, are
    exactly the options of ``cls``, with their defaults."""

    def decorate(func: Callable) -> Callable:
        declared = {o.keyword: o for o in options_of(cls)}
        params = inspect.signature(func).parameters
        mismatched = sorted(name for name, o in declared.items()
                            if name not in params or params[name].default != o.signature_default)
        extra = sorted(set(params) - set(declared) - set(own) - SDK_ONLY)
        if mismatched or extra:
            raise TypeError(f"{func.__qualname__}: parameters differ from {cls.__name__}'s options "
                            f"(missing or another default: {mismatched}; not options: {extra})")
        func.__doc__ = inspect.cleandoc(func.__doc__ or "") + "\n" + options_doc(cls)
        return func

    return decorate
