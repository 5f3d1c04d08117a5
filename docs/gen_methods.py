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
    """The ``# comment`` beside (and continuing below) each field of a dataclass, read from its source."""
    comments: dict[str, list[str]] = {}
    for cls in reversed(config_class.__mro__):
        if not dataclasses.is_dataclass(cls) or cls is object:
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        current = None
        last_line = -1
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] != last_line:
                current = tok.string
                last_line = tok.start[0]
            elif tok.type == tokenize.COMMENT and current is not None:
                text = tok.string.lstrip("#").strip()
                if text and not text.startswith("noqa"):
                    comments.setdefault(current, []).append(text)
            elif tok.type == tokenize.NAME and tok.string == "def":
                break
    return {name: " ".join(parts) for name, parts in comments.items()}


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
             f"- budget norm: {NORM_TEXT[cls.norm]}",
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
