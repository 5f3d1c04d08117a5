"""Protection methods: one registry (``METHODS``), ``create_method(name, ...)``, ``list_methods()``.

Importing this package registers every built-in method.
"""

from ueguard.methods.base import (BUDGETS, METHODS, NORMS, MethodConfig, Perturbation, ProtectionMethod, apply_delta,
                                  create_method, gray_project, list_methods, norm_of)
from ueguard.methods import bait as _bait, ssc as _ssc  # noqa: F401  (pretrained-prior methods)
from ueguard.methods import emn as _emn  # noqa: F401  (registers "emn")
from ueguard.methods import dune as _dune  # noqa: F401  (registers "dune")
from ueguard.methods import ar as _ar, lsp as _lsp, ops as _ops, rem as _rem, tap as _tap, uc as _uc  # noqa: F401
from ueguard.methods import pil as _pil  # noqa: F401  (registers "pil")

__all__ = ["BUDGETS", "METHODS", "NORMS", "MethodConfig", "Perturbation", "ProtectionMethod", "apply_delta",
           "create_method", "gray_project", "list_methods", "norm_of"]
