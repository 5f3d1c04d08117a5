"""A registry names each component from one place: the name it is registered under."""

import re
from pathlib import Path

import pytest

from ueguard._registry import Registry
from ueguard.defenses import DEFENSES, PARADIGMS
from ueguard.engine.recipes import RECIPES
from ueguard.methods import METHODS

PACKAGE = Path(__file__).resolve().parents[1] / "ueguard"


@pytest.mark.parametrize("registry", [METHODS, DEFENSES, PARADIGMS, RECIPES], ids=lambda r: r.kind)
def test_each_class_is_named_by_its_first_registration(registry):
    for name, cls in registry.items():
        assert cls.name in registry and registry.get(cls.name) is cls
        assert name == cls.name or registry.get(name) is cls  # the others are aliases


def test_no_component_writes_its_name_a_second_time():
    written = [f"{p.relative_to(PACKAGE)}:{i}" for folder in ("methods", "defenses", "engine") for p in (PACKAGE / folder).glob("*.py")
               for i, line in enumerate(p.read_text().splitlines(), 1) if re.match(r'    name(: ClassVar\[str\])? = "', line)]
    assert written == []


def test_register_sets_the_name_and_refuses_a_second_entry():
    things = Registry("thing")

    @things.register("alpha", "a")
    class Alpha:
        pass

    assert Alpha.name == "alpha" and things.get("a") is Alpha
    with pytest.raises(ValueError, match="registered twice"):
        things.register("a")(type("Other", (), {}))
