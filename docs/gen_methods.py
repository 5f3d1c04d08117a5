"""Regenerate the registry-derived parts of docs/methods.md from ``ueguard.methods``, so they cannot drift.

Between ``<!-- registry:NAME -->`` and ``<!-- /registry:NAME -->`` in docs/methods.md this script writes,
for method NAME, what the registry says about it: its one-line description, budget norm, needs, defaults
revision (and the former defaults), and a table of every constant of its config class with the value each
budget preset resolves it to and the comment beside the field in the source. Everything outside the
markers is hand-written prose.

    PYTHONPATH=. python docs/gen_methods.py          # rewrite docs/methods.md in place
    PYTHONPATH=. python docs/gen_methods.py --check  # exit 1 if it is out of date (tests/test_docs.py does this)
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import sys
import tokenize
from pathlib import Path

METHODS_MD = Path(__file__).resolve().parent / "methods.md"
BLOCK = re.compile(r"(<!-- registry:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /registry:(?P=name) -->)", re.S)
NORM_TEXT = {"linf": "L∞, the CLI's `--eps`", "l2": "L2, `-o l2_eps=VALUE` (the CLI's `--eps` is refused)",
             "l0": "L0: a fixed number of pixel positions (the CLI's `--eps` does not apply)"}


def field_comments(config_class: type) -> dict[str, str]:
    """The ``# comment`` of each field of a dataclass, read from its source: the comment beside the field
    (and comment-only lines continuing below it), or, for a field with none beside it, the comment-only
    lines right above it."""
    comments: dict[str, list[str]] = {}
    for cls in reversed(config_class.__mro__):
        if not dataclasses.is_dataclass(cls) or cls is object:
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        for name, parts in _class_field_comments(source).items():
            comments[name] = parts
    return {name: " ".join(parts) for name, parts in comments.items()}


def _class_field_comments(source: str) -> dict[str, list[str]]:
    """Field name → comment parts for one class body (see :func:`field_comments`)."""
    found: dict[str, list[str]] = {}
    pending: list[str] = []  # comment-only lines not yet given to a field
    previous: str | None = None  # the last field, when it has a comment beside it (lines below continue it)
    for line in source.splitlines()[1:]:
        stripped = line.strip()
        if line.startswith("    def ") or line.startswith("    @"):
            break
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if not text or text.startswith("noqa") or text.startswith("-" * 8):
                continue
            if not line.startswith("    #") and previous is not None:  # indented deeper: continues the line above
                found[previous].append(text)
            else:
                pending.append(text)
            continue
        field = re.match(r"    (\w+)\s*:", line)
        if not field:
            pending, previous = ([], None) if not stripped else (pending, previous)
            continue
        beside = line.split("#", 1)[1].strip() if "#" in line and "option(" not in line.split("#", 1)[1] else ""
        if beside:
            if previous is not None and pending:
                found[previous].extend(pending)
            found[field.group(1)] = [beside]
            previous = field.group(1)
        else:
            if pending:
                found[field.group(1)] = pending
            previous = None
        pending = []
    if previous is not None and pending:
        found[previous].extend(pending)
    return found


def fmt(value) -> str:
    """A constant as a user would type it: ``8/255`` for a long float that is a whole number of 8-bit levels."""
    if isinstance(value, float):
        levels = value * 255
        if len(repr(value)) > 8 and abs(levels - round(levels)) < 1e-9:
            return f"{round(levels)}/255"
        return f"{value:g}"
    return str(value)


def registry_block(name: str) -> str:
    """The generated Markdown for one canonical method name."""
    from ueguard.methods import BUDGETS, METHODS

    cls = METHODS.get(name)
    aliases = [n for n, c in METHODS.items() if c is cls and n != name]
    needs = [what for what, on in (("labels", cls.needs_labels), ("a surrogate model", cls.needs_surrogate),
                                   ("pretrained surrogate weights (`--weights`/`--pretrained`)", cls.needs_pretrained))
             if on]
    lines = [f"*From the registry* (`ueguard methods`): {cls.description}.", "",
             f"- budget norm: {NORM_TEXT[cls.norm]}" + (f" — {cls.budget_text}" if cls.budget_text else ""),
             f"- needs: {', '.join(needs) if needs else 'nothing (model-free, label-free)'}"]
    if aliases:
        lines.append(f"- aliases: {', '.join(f'`{a}`' for a in aliases)}")
    lines.append(f"- checkpoints every round (`--resume` continues generation): {'yes' if cls.checkpoints_rounds else 'no'}")
    former = "; ".join(f"revision {rev}: " + ", ".join(f"`{k}={fmt(v)}`" for k, v in sorted(values.items()))
                       for rev, values in sorted(cls.former_defaults.items()))
    lines.append(f"- defaults revision: {cls.defaults_revision}" + (f" (former defaults — {former})" if former else ""))
    lines += ["", "| constant (`-o KEY=VALUE`) | config default | " + " | ".join(
        f"`{b}`" + (" (the CLI's default)" if b == "standard" else "") for b in BUDGETS) + " | meaning |",
              "|---|---|" + "---|" * len(BUDGETS) + "---|"]
    comments = field_comments(cls.config_class)
    resolved = {b: cls.make_config(b) for b in BUDGETS}
    for f in dataclasses.fields(cls.config_class):
        default = f.default if f.default is not dataclasses.MISSING else None
        per_budget = []
        for b in BUDGETS:
            value = getattr(resolved[b], f.name)
            per_budget.append(f"**`{fmt(value)}`**" if f.name in cls.presets.get(b, {}) else f"`{fmt(value)}`")
        meaning = comments.get(f.name, "").replace("|", "\\|")
        if f.name == "eps":
            meaning = meaning or "L∞ budget in [0, 1] units (`--eps`)"
        if f.name == "seed":
            meaning = meaning or "random seed (`--seed`)"
        lines.append(f"| `{f.name}` | `{fmt(default)}` | " + " | ".join(per_budget) + f" | {meaning} |")
    lines += ["", "(**Bold**: set by that budget's preset; `None`: computed from the data or from another constant, "
              "as the meaning says.)", ""]
    return "\n".join(lines)


def canonical_names() -> list[str]:
    from ueguard.methods import METHODS

    return [name for name, cls in METHODS.items() if cls.name == name]


def render(text: str) -> str:
    """``text`` with every registry block regenerated."""
    return BLOCK.sub(lambda m: m.group(1) + registry_block(m.group("name")) + m.group(4), text)


def main(argv: list[str]) -> int:
    text = METHODS_MD.read_text()
    new = render(text)
    missing = [n for n in canonical_names() if f"<!-- registry:{n} -->" not in text]
    if "--check" in argv:
        if new != text or missing:
            print(f"{METHODS_MD} is out of date: run PYTHONPATH=. python docs/gen_methods.py"
                  + (f" (no registry block for {', '.join(missing)})" if missing else ""), file=sys.stderr)
            return 1
        return 0
    METHODS_MD.write_text(new)
    if missing:
        print(f"add a section with <!-- registry:NAME --><!-- /registry:NAME --> for: {', '.join(missing)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
