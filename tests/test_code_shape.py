"""The package's functions fit on a screen: no function in ueguard/ is longer than 80 lines (a command is a
pipeline of named stages, each testable alone)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ueguard"
LIMIT = 80


def test_no_function_in_the_package_is_longer_than_a_screen():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LIMIT:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == [], "split these into named stages: " + ", ".join(long)
