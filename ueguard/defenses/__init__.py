"""Defense and paradigm registries used by ``verify``."""

from ueguard.defenses.base import (DEFENSES, PARADIGMS, Defense, Paradigm, create_defense, create_paradigm,
                                   list_defenses)

__all__ = ["DEFENSES", "PARADIGMS", "Defense", "Paradigm", "create_defense", "create_paradigm", "list_defenses"]
