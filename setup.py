"""Build and packaging for ueguard.

The C++ CPU kernels in csrc/ become the extension module ``ueguard._C`` (it registers the
``torch.ops.ueguard`` operators). It is compiled against the torch already installed, so build
without isolation:

    pip install --no-build-isolation -e .
"""

import re
import sys
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent


def read_version() -> str:
    """The ``__version__`` string of ueguard/__init__.py, read without importing the package."""
    text = (ROOT / "ueguard" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.MULTILINE)
    if match is None:
        raise RuntimeError("ueguard/__init__.py does not define __version__")
    return match.group(1)


def compiler_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags for the extension: optimised, OpenMP, no FMA contraction.

    No ``-march``: the wheel must run on any CPU of its architecture. The hot loops are compiled
    again for AVX2 and AVX-512 under ``#pragma GCC target`` (csrc/isa_*.cpp) and chosen at run time. Floating-point contraction is off so that ``a * b + c``
    rounds twice, exactly like the eager PyTorch reference the kernels are tested against.
    Apple clang has no built-in OpenMP: on macOS the kernels build serial (still vectorised).
    """
    if sys.platform == "win32":
        return ["/O2", "/openmp", "/fp:precise"], []
    if sys.platform == "darwin":
        return ["-O3", "-ffp-contract=off"], []
    return ["-O3", "-fopenmp", "-ffp-contract=off"], ["-fopenmp"]


compile_args, link_args = compiler_flags()

setup(
    name="ueguard",
    version=read_version(),
    description="Make image datasets unlearnable with small L-infinity perturbations, and verify it honestly.",
    packages=find_packages(include=["ueguard", "ueguard.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm",
        "numpy",
        "click>=8",
        "pillow>=10",
        "scikit-learn",
        "matplotlib",
        "safetensors",
        "kornia>=0.8",  # differentiable JPEG for generation through the squeezing defenses (ueguard.engine.eot)
        'triton; platform_system=="Linux"',
    ],
    # ffcv: the --loader ffcv path. Built from source: needs libopencv-dev libturbojpeg0-dev pkg-config
    # (.ci/install installs them). Checked: ffcv 1.0.2 with numba 0.68.1 and numpy 2.4 on Python 3.11.
    extras_require={"test": ["pytest", "hypothesis"], "ffcv": ["ffcv>=1.0.2", "numba"]},
    entry_points={"console_scripts": ["ueguard=ueguard.cli:main"]},
    ext_modules=[
        CppExtension(
            name="ueguard._C",
            sources=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp")),
            extra_compile_args={"cxx": compile_args},
            extra_link_args=link_args,
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
