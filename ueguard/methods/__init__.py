"""Protection methods: one registry (``METHODS``), ``create_method(name, ...)``, ``list_methods()``.

Importing this package registers every built-in method.
"""

from ueguard.methods.base import (BUDGETS, METHODS, MethodConfig, Perturbation, ProtectionMethod, apply_delta,
                                  create_method, gray_project, list_methods)
from ueguard.methods import bait as _bait  # noqa: F401  (registers "bait")
from ueguard.methods import emn as _emn  # noqa: F401  (registers "emn")
from ueguard.methods import ssc as _ssc  # noqa: F401  (registers "ssc")

__all__ = ["BUDGETS", "METHODS", "MethodConfig", "Perturbation", "ProtectionMethod", "apply_delta",
           "create_method", "gray_project", "list_methods"]
