"""Shared pytest setup for ueguard.

Triton decides at ``@triton.jit`` time whether kernels are compiled or interpreted, from
``TRITON_INTERPRET``; it must therefore be set before anything imports triton. With it set, the
Triton kernels run on CPU tensors through the interpreter (docs/extending.md, kernels).
A GPU job can export ``TRITON_INTERPRET=0`` to test the compiled kernels instead.
"""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
# ueguard's cache (FFCV files, protect's private resume state) goes to a folder of this test session, not
# the developer's ~/.cache; subprocesses the tests start inherit it.
os.environ.setdefault("UEGUARD_CACHE", tempfile.mkdtemp(prefix="ueguard-test-cache-"))


#: Where the ``slow`` marker goes: every test of a benchmark script, the full demo, and tests that run
#: protect in subprocesses that are killed, interrupted or started by torchrun (each tens of seconds on
#: a 2-core CPU). ``python -m pytest -q -m "not slow"`` is the fast subset; plain ``pytest`` runs all.
SLOW_MARKER = "slow: takes tens of seconds or more (benchmark scripts, the full demo, killed subprocess runs)"


def pytest_configure(config):
    config.addinivalue_line("markers", SLOW_MARKER)


def resume_state(out):
    """The private folder where ``protect`` keeps the resume state of output folder ``out``."""
    from ueguard.data.run_state import state_path

    return state_path(out)


def installed_from_this_checkout() -> bool:
    """True when the imported ueguard is this checkout *and* pip-installed (what CI and the README's
    commands do). Then its C++ extension and console script must exist: tests that would skip without
    them fail instead, so a broken build cannot pass as a skip."""
    import importlib.metadata
    from pathlib import Path

    try:
        importlib.metadata.distribution("ueguard")
    except importlib.metadata.PackageNotFoundError:
        return False
    import ueguard

    return Path(ueguard.__file__).resolve().parents[1] == Path(__file__).resolve().parents[1]


def load_bench(name: str):
    """``bench/<name>.py`` as a module (bench/ is not a package; its scripts import each other by name,
    so bench/ goes on ``sys.path``), registered in ``sys.modules`` for dataclasses to find it."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "bench"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
