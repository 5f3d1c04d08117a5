"""The documentation holds together: links resolve, the README stays one page with CI's commands, nothing
points at documents outside the repository, and docs/methods.md matches the method registry."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SETUP_COMMANDS = ("bash .ci/install && ueguard demo", "bash .ci/install && python3 -m pytest -q")
#: Phrases that cite design documents kept outside the repository.
OUTSIDE = ("shared/specs", "methods spec", "style guide")

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def markdown_files() -> list[Path]:
    return [README, ROOT / "bench" / "README.md", *sorted(DOCS.rglob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if ROOT in path.parents else str(path)


def broken_links(path: Path) -> list[str]:
    """Every relative link (and #anchor into a Markdown file) in ``path`` that does not resolve."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    broken = []
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target} (no file {_shown(resolved)})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {_shown(resolved)})")
    return broken


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


def test_a_broken_link_is_caught(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading\n")
    page.write_text("[ok](there.md) [ok](there.md#a-heading) [bad](missing.md) [bad](there.md#nope) "
                    "[web](https://example.org/x.md)\n```\n[in code](ignored.md)\n```\n")
    assert [b.split(" ")[0] for b in broken_links(page)] == ["missing.md", "there.md#nope"]


def test_readme_is_one_page_with_the_set_up_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 160
    for command in SETUP_COMMANDS:
        assert command in text, command
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert SETUP_COMMANDS[1] in ci  # CI runs the README's test command


def _text_files():
    for folder in ("ueguard", "bench", "tests", "docs"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".md", ".txt", ".cpp", ".h") and path != Path(__file__):
                yield path
    yield README


def test_nothing_cites_documents_outside_the_repository():
    found = [f"{path.relative_to(ROOT)}: {phrase!r}" for path in _text_files()
             for phrase in OUTSIDE if phrase in path.read_text(encoding="utf-8", errors="replace").lower()]
    assert found == []


def _gen_methods():
    spec = importlib.util.spec_from_file_location("gen_methods", DOCS / "gen_methods.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_methods", module)
    spec.loader.exec_module(module)
    return module


def _sections(text: str) -> dict[str, str]:
    """``## name`` section bodies of docs/methods.md, by name."""
    parts = re.split(r"^## (\S+)\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_methods_doc_has_a_section_with_every_constant_of_every_registered_method():
    from ueguard.methods import BUDGETS, METHODS

    sections = _sections((DOCS / "methods.md").read_text(encoding="utf-8"))
    gen = _gen_methods()
    for name, cls in METHODS.items():
        if cls.name != name:  # an alias: documented in its method's section
            assert f"`{name}`" in sections[cls.name], name
            continue
        assert name in sections, f"docs/methods.md has no '## {name}' section"
        body = sections[name]
        for f in dataclasses.fields(cls.config_class):
            values = {gen.fmt(getattr(cls.make_config(b), f.name)) for b in BUDGETS}
            row = next((line for line in body.splitlines() if line.startswith(f"| `{f.name}` |")), None)
            assert row is not None, f"{name}: constant {f.name} missing from its section"
            assert f"`{gen.fmt(f.default)}`" in row, (name, f.name)
            assert all(f"`{v}`" in row for v in values), (name, f.name, values)


def test_methods_doc_is_what_the_generator_writes():
    gen = _gen_methods()
    text = (DOCS / "methods.md").read_text(encoding="utf-8")
    assert gen.render(text) == text, "run: PYTHONPATH=. python docs/gen_methods.py"


def test_verify_doc_has_a_row_for_every_defense_and_paradigm():
    from ueguard.defenses import DEFENSES, PARADIGMS, defense_names, paradigm_names

    text = (DOCS / "verify.md").read_text(encoding="utf-8")
    for name in defense_names():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"docs/verify.md has no row for defense {name}"
        for f in dataclasses.fields(DEFENSES.get(name).config_class):
            assert f"`{f.name}=" in row, (name, f.name)
    for name in paradigm_names():
        assert any(line.startswith(f"| `{name}` |") for line in text.splitlines()), name
    assert set(PARADIGMS.names()) >= set(paradigm_names())
