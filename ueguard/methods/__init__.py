"""Protection methods: one registry (``METHODS``), ``create_method(name, ...)``, ``list_methods()``.

Importing this package registers every built-in method.
"""

from ueguard.methods.base import (BUDGETS, METHODS, MethodConfig, Perturbation, ProtectionMethod, apply_delta,
                                  create_method, gray_project, list_methods)
from ueguard.methods import emn as _emn  # noqa: F401  (registers "emn")

__all__ = ["BUDGETS", "METHODS", "MethodConfig", "Perturbation", "ProtectionMethod", "apply_delta",
           "create_method", "gray_project", "list_methods"]
