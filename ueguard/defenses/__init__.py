"""Defense and paradigm registries used by ``verify`` (importing this package registers every defense)."""

from ueguard.defenses.base import (DEFENSES, PARADIGMS, Defense, DefenseConfig, FitState, Paradigm, create_defense,
                                   create_paradigm, defense_names, list_defenses,
                                   paradigm_names)
from ueguard.defenses import adversarial, classmean, earlystop, squeeze, staged, ueraser  # noqa: F401  (registration)

__all__ = ["DEFENSES", "PARADIGMS", "Defense", "DefenseConfig", "FitState", "Paradigm", "create_defense",
           "create_paradigm", "defense_names", "list_defenses", "paradigm_names"]
