"""Budgets have one home (ueguard/budgets.py): every command, method and defense reads it."""

import re
from pathlib import Path

from ueguard.budgets import BUDGET, BUDGETS, SIZE_CAP, VERIFY_EPOCHS, default_arch
from ueguard.methods import METHODS

PACKAGE = Path(__file__).resolve().parents[1] / "ueguard"


def test_budget_names_are_written_once():
    spelled = re.compile(r"""["']quick["']\s*,\s*["']standard["']\s*,\s*["']thorough["']""")
    places = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if spelled.search(p.read_text())]
    assert places == [], f"budget names spelt out again in {places}; import BUDGETS from ueguard.budgets"


def test_what_each_budget_sets():
    assert BUDGETS == ("quick", "standard", "thorough")
    assert SIZE_CAP == {"quick": 64, "standard": 128, "thorough": 224}
    assert VERIFY_EPOCHS == {"quick": 10, "standard": 30, "thorough": 60}
    assert [default_arch(32, b) for b in BUDGETS] == ["resnet18_cifar_slim", "resnet18_cifar", "resnet18_cifar"]
    assert default_arch(128, "quick") == "resnet18"
    for name in METHODS.names():
        assert set(METHODS.get(name).presets) <= set(BUDGET)


def test_the_cli_offers_exactly_the_budgets():
    from click.testing import CliRunner

    from ueguard.cli import main

    for command in ("protect", "verify"):
        help_text = CliRunner().invoke(main, [command, "--help"]).output
        assert "[quick|standard|thorough]" in help_text.replace("\n", "").replace(" ", "")
